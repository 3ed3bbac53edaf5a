"""synthetic_norb: an embedded, procedurally rendered stand-in for small-NORB (no files, no downloads).

The 50 toys of `pipeline.data.toys` (5 categories x 10 instances, small-NORB's category order and
train/test instances) are ray-cast by `pipeline.data.render` with an orthographic camera at azimuth
0..340 deg (18 steps of 20) x elevation 30..70 deg (9 steps of 5) under 6 lightings: 48,600 grayscale
images, as in small-NORB. Images are rendered directly at `image_size` (2x2 supersampled), not at a
native 96 px; the object is centred on a plain ground lit by the same lights.

Jitter makes no two images trivially identical: each (toy, azimuth, elevation) view gets a small camera
perturbation (azimuth +-3 deg, elevation +-2 deg, roll +-4 deg, scale +-8 %, shift +-0.7 px) shared by its
6 lightings (as in NORB, where the lights change and the camera stays); each image gets a gain, an offset
and pixel noise. All of it is drawn from `seed` for the full product at once, so an image does not depend
on which subset is asked for. Rendered subsets are cached as .npz keyed by (renderer version, seed, size,
selected samples).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.data import render, toys
from pipeline.data.base import CAPS, N_LIGHTINGS, Dataset, finish, norb_catalog, select
from schemas.config import DatasetConfig

RENDERER_VERSION = 1


def _renderer_digest() -> str:
    """Changes whenever the renderer's or the toys' code changes, so a stale cache is never read."""
    import hashlib
    from pathlib import Path

    here = Path(__file__).parent
    blob = b"".join((here / name).read_bytes() for name in ("render.py", "toys.py", "synthetic_norb.py"))
    return hashlib.sha256(blob).hexdigest()[:8]
SUPERSAMPLE = 2
HALF_EXTENT = 1.05  # world units from the image centre to its edge; toys have unit radius
GROUND_ALBEDO = 0.4
NOISE_SIGMA = 0.012
VIEWS_PER_BATCH = 48


# Lightings: (azimuth relative to the camera's, elevation in the world, intensity) per light, then ambient and
# specular strength. Lights turn with the camera's azimuth (the toy turns on a turntable) and stay at their
# elevation while the camera rises (the lights hang in the room).
LIGHTINGS = [
    ([(-50, 50, 0.85)], 0.22, 0.25),
    ([(60, 35, 0.9)], 0.18, 0.3),
    ([(0, 85, 0.75)], 0.3, 0.15),
    ([(0, 15, 0.6), (180, 40, 0.35)], 0.2, 0.2),
    ([(-75, 30, 0.5), (75, 30, 0.5)], 0.25, 0.2),
    ([(-150, 45, 0.8), (40, 65, 0.25)], 0.14, 0.35),
]


def load(cfg: DatasetConfig) -> Dataset:
    catalog = norb_catalog()
    selection = select(cfg, catalog, CAPS["synthetic_norb"])
    ids = catalog.sample_id[selection.rows]
    images = _cached(cfg, ids, lambda: render_samples(ids, cfg.image_size, cfg.seed))
    return finish(cfg, catalog, selection, images, CAPS["synthetic_norb"])


def render_samples(sample_ids: np.ndarray, size: int, seed: int, threads: int | None = None) -> np.ndarray:
    """Render the given sample ids (positions in the small-NORB product order): uint8 (N, 1, size, size)."""
    catalog = norb_catalog()
    jitter = _Jitter(seed, size)
    view_of = sample_ids // N_LIGHTINGS  # one view per (category, instance, elevation, azimuth)
    views = np.unique(view_of)
    tasks = []
    for toy_id in np.unique(views // (9 * 18)):
        mine = views[views // (9 * 18) == toy_id]
        tasks += [mine[i : i + VIEWS_PER_BATCH] for i in range(0, mine.shape[0], VIEWS_PER_BATCH)]
    out = np.empty((sample_ids.shape[0], 1, size, size), dtype=np.uint8)

    def run(batch: np.ndarray) -> None:
        rows = np.flatnonzero(np.isin(view_of, batch))
        first = batch[0] * N_LIGHTINGS
        category, instance = int(catalog.label[first]), int(catalog.instance[first])
        out[rows, 0] = _render_batch(category, instance, batch, sample_ids[rows], size, jitter)

    threads = threads or min(8, len(os.sched_getaffinity(0)))
    with ThreadPoolExecutor(max_workers=threads) as pool:  # numpy releases the GIL in its array loops
        list(pool.map(run, tasks))
    return out


class _Jitter:
    """Per-view camera and per-image photometric jitter for the full product, drawn once from the seed."""

    def __init__(self, seed: int, size: int) -> None:
        rng = np.random.default_rng([seed, 1234])
        n_views = 5 * 10 * 9 * 18
        self.d_azimuth = rng.uniform(-3, 3, n_views)
        self.d_elevation = rng.uniform(-2, 2, n_views)
        self.roll = rng.uniform(-4, 4, n_views)
        self.scale = rng.uniform(0.92, 1.08, n_views)
        self.shift = rng.uniform(-1, 1, (n_views, 2)) * 0.7 * (2 * HALF_EXTENT / size)  # +-0.7 px in world units
        n_images = n_views * N_LIGHTINGS
        self.gain = rng.uniform(0.9, 1.1, n_images)
        self.offset = rng.uniform(-0.03, 0.03, n_images)
        self.noise_at = rng.integers(0, size, (n_images, 2))
        self.noise = (rng.standard_normal((2 * size, 2 * size)) * NOISE_SIGMA).astype(np.float32)


def _cameras(view_ids: np.ndarray, jitter: _Jitter) -> tuple[render.Views, np.ndarray]:
    """Cameras of the given views and their azimuths in degrees (for the lights)."""
    azimuth = (view_ids % 18) * 20.0 + jitter.d_azimuth[view_ids]
    elevation = 30.0 + 5.0 * ((view_ids // 18) % 9) + jitter.d_elevation[view_ids]
    az, el = np.radians(azimuth), np.radians(elevation)
    toward = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], 1)
    right = np.cross(-toward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right, axis=1, keepdims=True)
    up = np.cross(right, -toward)
    roll = np.radians(jitter.roll[view_ids])[:, None]
    right, up = np.cos(roll) * right + np.sin(roll) * up, -np.sin(roll) * right + np.cos(roll) * up
    views = render.Views(
        toward=toward.astype(np.float32), right=right.astype(np.float32), up=up.astype(np.float32),
        half_extent=(HALF_EXTENT / jitter.scale[view_ids]).astype(np.float32), shift=jitter.shift[view_ids].astype(np.float32),
    )
    return views, azimuth


def _lights(lighting: int, camera_azimuth: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    """(V, L, 4) light directions + intensities, ambient, specular and the lit ground's radiance."""
    lamps, ambient, specular = LIGHTINGS[lighting]
    out = np.zeros((camera_azimuth.shape[0], len(lamps), 4), dtype=np.float32)
    ground = ambient
    for j, (rel_az, el, power) in enumerate(lamps):
        az, el_r = np.radians(camera_azimuth + rel_az), np.radians(el)
        out[:, j, 0], out[:, j, 1], out[:, j, 2] = np.cos(el_r) * np.cos(az), np.cos(el_r) * np.sin(az), np.sin(el_r)
        out[:, j, 3] = power
        ground += power * np.sin(el_r)
    return out, ambient, specular, GROUND_ALBEDO * ground


def _render_batch(category: int, instance: int, view_ids: np.ndarray, sample_ids: np.ndarray, size: int,
                  jitter: _Jitter) -> np.ndarray:
    """Images of the requested samples, all views of one toy: float radiance -> uint8 (n, size, size)."""
    views, camera_azimuth = _cameras(view_ids, jitter)
    side = size * SUPERSAMPLE
    hits = render.cast(list(toys.toy(category, instance)), views, side)
    paint = toys.paint(category, instance)
    out = np.empty((sample_ids.shape[0], size, size), dtype=np.uint8)
    position = np.searchsorted(view_ids, sample_ids // N_LIGHTINGS)  # view_ids are sorted
    background = np.empty(view_ids.shape[0], dtype=np.float32)
    for lighting in np.unique(sample_ids % N_LIGHTINGS):
        mine = np.flatnonzero(sample_ids % N_LIGHTINGS == lighting)
        lights, ambient, specular, ground = _lights(int(lighting), camera_azimuth)
        background[:] = ground
        # every view of the batch is shaded (cheap: only hit pixels), then the requested ones are kept
        radiance = render.shade(hits, views.toward, lights, ambient, specular, paint, background)[position[mine]]
        # (n, side*side) -> (n, size, size): average the supersamples
        image = radiance.reshape(-1, size, SUPERSAMPLE, size, SUPERSAMPLE).mean((2, 4))
        ids = sample_ids[mine]
        image = image * jitter.gain[ids, None, None] + jitter.offset[ids, None, None]
        for k, (dy, dx) in enumerate(jitter.noise_at[ids]):
            image[k] += jitter.noise[dy : dy + size, dx : dx + size]
        out[mine] = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    return out


# ---------------------------------------------------------------- cache


def cache_dir(cfg: DatasetConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("ISOSTACK_CACHE") or Path.home() / ".cache" / "isostack"
    return Path(root).expanduser() / "synthetic_norb"


def _cached(cfg: DatasetConfig, ids: np.ndarray, make) -> np.ndarray:
    digest = hashlib.sha1(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]
    path = cache_dir(cfg) / f"r{RENDERER_VERSION}-{_renderer_digest()}-seed{cfg.seed}-{cfg.image_size}px-{ids.shape[0]}-{digest}.npz"
    if path.exists():
        try:
            with np.load(path) as stored:
                if np.array_equal(stored["sample_id"], ids):
                    return stored["images"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is rendered again and replaced
    images = make()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, images=images, sample_id=ids)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not stop a run; it only costs a re-render next time
        warnings.warn(f"synthetic_norb: could not cache rendered images at {path}: {exc}", stacklevel=2)
    return images


__all__ = ["load", "render_samples"]
