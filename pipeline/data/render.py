"""A small vectorised ray caster for convex primitives (numpy only).

The camera is orthographic: every ray of a view has the same direction, so a
batch of views of one toy is cast at once as ``(V, P)`` arrays (V views, P
pixels). A primitive is an affine image ``x = center + M @ x_unit`` of a unit
shape (sphere, cube [-1, 1]^3, cylinder of radius 1 with |z| <= 1), so a ray is
intersected in the unit shape's frame and the normal is brought back with
``M^-T``. Every primitive is convex, so a ray meets it in one interval
[t_near, t_far]; the nearest t_near over all primitives is the visible surface.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ELLIPSOID, BOX, CYLINDER = 0, 1, 2

# Rays start this far from the origin; toys are normalised to unit radius, so t > 0 always.
CAMERA_DISTANCE = 10.0


@dataclass(frozen=True)
class Part:
    """One primitive: ``world = center + matrix @ unit``; albedo is relative to the toy's paint (1 = paint)."""

    kind: int
    center: np.ndarray  # (3,)
    matrix: np.ndarray  # (3, 3), columns = the unit shape's axes in the world
    albedo: float = 1.0


@dataclass(frozen=True)
class Views:
    """V orthographic cameras. ``toward`` points from the toy to the camera (rays travel along -toward)."""

    toward: np.ndarray  # (V, 3) unit
    right: np.ndarray  # (V, 3) unit, image +u
    up: np.ndarray  # (V, 3) unit, image +v
    half_extent: np.ndarray  # (V,) world units from the image centre to its edge
    shift: np.ndarray  # (V, 2) world-unit offset of the image centre along (right, up)


@dataclass
class Hits:
    """The visible surface of V views on a side x side grid (P = side**2 pixels, row-major, top row first).

    Only the K pixels whose ray hit the toy are kept, so shading costs K, not V * P.
    """

    shape: tuple[int, int]  # (V, P)
    view: np.ndarray  # (K,) int64 view of each hit pixel
    pixel: np.ndarray  # (K,) int64 pixel of each hit
    normal: np.ndarray  # (K, 3) float32 world unit normal
    albedo: np.ndarray  # (K,) float32 relative albedo


def pixel_grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in [-1, 1]: u grows to the right, v grows upwards. Both (side * side,), row-major."""
    t = ((np.arange(side, dtype=np.float32) + 0.5) / side) * 2.0 - 1.0
    return np.tile(t, side), np.repeat(-t, side)


def cast(parts: list[Part], views: Views, side: int) -> Hits:
    """Cast one ray per pixel of every view against every part; keep the nearest surface."""
    u, v = pixel_grid(side)
    n_views, n_pix = views.toward.shape[0], u.shape[0]
    best_t = np.full((n_views, n_pix), np.inf, dtype=np.float32)
    best_k = np.full((n_views, n_pix), -1, dtype=np.int16)
    frames = [_local_frame(p, views) for p in parts]
    for k, (part, frame) in enumerate(zip(parts, frames)):
        t = _INTERSECT[part.kind](_origin(frame, u, v), frame[3])
        closer = t < best_t
        best_t = np.where(closer, t, best_t)
        best_k[closer] = k

    view, pixel = np.nonzero(best_k >= 0)
    owner = best_k[view, pixel]
    normal = np.zeros((view.shape[0], 3), dtype=np.float32)
    albedo = np.zeros(view.shape[0], dtype=np.float32)
    for k, (part, frame) in enumerate(zip(parts, frames)):
        mine = np.flatnonzero(owner == k)
        if mine.size == 0:
            continue
        vi, pi = view[mine], pixel[mine]
        a, b, c, d = (x[vi] for x in frame)  # (n, 3) each
        t = best_t[vi, pi][:, None]
        p = a + b * u[pi, None] + c * v[pi, None] + t * d  # hit point in the unit shape's frame, (n, 3)
        n_world = _NORMAL[part.kind](p) @ np.linalg.inv(part.matrix)  # n_unit @ M^-1 == (M^-T n_unit)^T
        n_world /= np.linalg.norm(n_world, axis=1, keepdims=True) + 1e-12
        normal[mine] = n_world
        albedo[mine] = part.albedo
    return Hits(shape=(n_views, n_pix), view=view, pixel=pixel, normal=normal, albedo=albedo)


def _local_frame(part: Part, views: Views) -> tuple[np.ndarray, ...]:
    """Ray origin o(u, v) = a + u b + v c and direction d in the part's unit frame, each (V, 3)."""
    m_inv_t = np.linalg.inv(part.matrix).T.astype(np.float32)
    ext = views.half_extent[:, None]
    centre = CAMERA_DISTANCE * views.toward + views.shift[:, :1] * views.right + views.shift[:, 1:] * views.up
    a = (centre - part.center) @ m_inv_t
    b = (ext * views.right) @ m_inv_t
    c = (ext * views.up) @ m_inv_t
    d = (-views.toward) @ m_inv_t
    return a.astype(np.float32), b.astype(np.float32), c.astype(np.float32), d.astype(np.float32)


def _origin(frame, u, v) -> list[np.ndarray]:
    a, b, c, _ = frame
    return [a[:, j, None] + b[:, j, None] * u + c[:, j, None] * v for j in range(3)]  # 3 x (V, P)


def _sphere(o, d) -> np.ndarray:
    a = (d * d).sum(1)[:, None]
    b = o[0] * d[:, 0, None] + o[1] * d[:, 1, None] + o[2] * d[:, 2, None]
    c = o[0] * o[0] + o[1] * o[1] + o[2] * o[2] - 1.0
    disc = b * b - a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    return np.where(disc > 0, t, np.inf).astype(np.float32)


def _slab(o_j, d_j) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit t of the ray through the slab -1 <= x_j <= 1."""
    d_j = np.where(np.abs(d_j) < 1e-9, 1e-9, d_j)[:, None]
    t1 = (-1.0 - o_j) / d_j
    t2 = (1.0 - o_j) / d_j
    return np.minimum(t1, t2), np.maximum(t1, t2)


def _cube(o, d) -> np.ndarray:
    near, far = _slab(o[0], d[:, 0])
    for j in (1, 2):
        n_j, f_j = _slab(o[j], d[:, j])
        near = np.maximum(near, n_j)
        far = np.minimum(far, f_j)
    return np.where(near <= far, near, np.inf).astype(np.float32)


def _cylinder(o, d) -> np.ndarray:
    a = (d[:, 0] ** 2 + d[:, 1] ** 2)[:, None]
    a = np.maximum(a, 1e-12)  # a ray along the axis: the disc test below still clips it correctly
    b = o[0] * d[:, 0, None] + o[1] * d[:, 1, None]
    c = o[0] * o[0] + o[1] * o[1] - 1.0
    disc = b * b - a * c
    with np.errstate(invalid="ignore"):
        root = np.sqrt(disc)
    near, far = (-b - root) / a, (-b + root) / a
    z_near, z_far = _slab(o[2], d[:, 2])
    near = np.maximum(near, z_near)
    far = np.minimum(far, z_far)
    return np.where((disc > 0) & (near <= far), near, np.inf).astype(np.float32)


def _sphere_normal(p: np.ndarray) -> np.ndarray:
    return p


def _cube_normal(p: np.ndarray) -> np.ndarray:
    axis = np.abs(p).argmax(1)
    n = np.zeros_like(p)
    rows = np.arange(p.shape[0])
    n[rows, axis] = np.sign(p[rows, axis])
    return n


def _cylinder_normal(p: np.ndarray) -> np.ndarray:
    r = np.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2)
    on_cap = (1.0 - np.abs(p[:, 2])) < (1.0 - r)
    n = np.stack([p[:, 0], p[:, 1], np.zeros_like(r)], 1)
    n[on_cap] = 0.0
    n[on_cap, 2] = np.sign(p[on_cap, 2])
    return n


_INTERSECT = {ELLIPSOID: _sphere, BOX: _cube, CYLINDER: _cylinder}
_NORMAL = {ELLIPSOID: _sphere_normal, BOX: _cube_normal, CYLINDER: _cylinder_normal}


def shade(
    hits: Hits,
    toward: np.ndarray,
    lights: np.ndarray,
    ambient: float,
    specular: float,
    paint: float,
    background: np.ndarray,
) -> np.ndarray:
    """Lambert + Blinn-Phong under directional lights; returns (V, P) float32 radiance, background where missed.

    toward: (V, 3) direction to each camera; lights: (V, L, 4) = unit direction towards each light (3) and its
    intensity; background: (V,) radiance of the ground.
    """
    n, view = hits.normal, hits.view
    diffuse = np.full(view.shape[0], ambient, dtype=np.float32)
    shine = np.zeros(view.shape[0], dtype=np.float32)
    for j in range(lights.shape[1]):
        direction, power = lights[:, j, :3], lights[:, j, 3]
        half = direction + toward
        half /= np.linalg.norm(half, axis=1, keepdims=True) + 1e-12
        lambert = (n * direction[view]).sum(1)
        highlight = np.clip((n * half[view]).sum(1), 0.0, None)
        diffuse += power[view] * np.clip(lambert, 0.0, None)
        shine += power[view] * (highlight**24) * (lambert > 0)
    out = np.repeat(background.astype(np.float32)[:, None], hits.shape[1], axis=1)
    out[view, hits.pixel] = paint * hits.albedo * diffuse + specular * shine
    return out
