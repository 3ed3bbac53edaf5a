"""Auto-Encoding Transformations (Zhang et al. 2019, "AET vs. AED: Unsupervised Representation Learning by
Auto-Encoding Transformations rather than Data").

AET draws a random transformation t, encodes the image x and its transformed copy t(x) with the same
encoder, and a small decoder predicts t from the pair of representations; the loss is
l(t, t^) = 1/2 ||M(t) - M(t^)||^2 on the transformation matrices (their Sec. 3.1, the affine variant:
rotation in [-180, 180] degrees, translation of +-0.2 of the image size, scale in [0.7, 1.3], shear in
[-30, 30] degrees, the defaults here). The transformed copy is made with ``affine_grid``/``grid_sample``,
so it needs the images themselves: only the first module (the one that reads them) can use it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import TrainingError
from pipeline.nn.modules import grid_features, shape_text
from pipeline.nn.objectives.autoencoder import need_input_shape
from pipeline.nn.objectives.base import ModuleFacts, Problems


def random_affine(n: int, *, rotation: float, translation: float, scale: tuple[float, float], shear: float,
                  generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(n, 2, 3) affine matrices in affine_grid's normalised coordinates ([-1, 1] on each axis).

    M = R(angle) @ Shear(s) @ scale * I, translation (tx, ty) = 2 * u, u ~ U[-translation, translation]
    (a shift of u of the image size is 2u in normalised coordinates).
    """
    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle = uniform(-rotation, rotation) * math.pi / 180
    sh = uniform(-shear, shear) * math.pi / 180
    s = uniform(*scale)
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(sh)
    # R @ [[1, tan], [0, 1]] * s
    a = torch.stack([torch.stack([cos, cos * tan - sin], -1), torch.stack([sin, sin * tan + cos], -1)], 1) * s[:, None, None]
    t = 2 * torch.stack([uniform(-translation, translation), uniform(-translation, translation)], -1)  # (n, 2)
    return torch.cat([a, t[:, :, None]], dim=2).to(device)


def transform_images(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """x: (B, C, H, W), theta: (B, 2, 3) -> t(x) (B, C, H, W), zeros outside the image."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def aet_loss(predicted: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """1/2 ||M(t) - M(t^)||^2 per sample, averaged: predicted (B, 6), theta (B, 2, 3)."""
    return 0.5 * (predicted - theta.flatten(1)).pow(2).sum(dim=1).mean()


def _layout(z: torch.Tensor, side: int) -> torch.Tensor:
    """Per-sample features that keep a coarse spatial layout (a rotation is invisible to a global average).

    (B, D) -> (B, D); (B, C, H, W) / (B, P, C, h, w) -> adaptive average pool to side x side, flattened.
    """
    if z.ndim == 2:
        return z
    return F.adaptive_avg_pool2d(grid_features(z), side).flatten(1)


class AETObjective(nn.Module):
    """Predict the 6 affine parameters of t from (z(x), z(t(x))); z(t(x)) comes from the module itself."""

    needs_pairs = False
    needs_labels = False
    needs_input = True

    def __init__(self, out_shape: tuple[int, ...], *, rotation: float, translation: float,
                 scale: tuple[float, float], shear: float, hidden: int) -> None:
        super().__init__()
        self.params = {"rotation": rotation, "translation": translation, "scale": tuple(scale), "shear": shear}
        if len(out_shape) == 1:
            self.side, features = 0, out_shape[0]
        else:
            grid = math.isqrt(out_shape[0]) if len(out_shape) == 4 else min(out_shape[1], out_shape[2])
            self.side = min(4, grid)
            features = out_shape[-3] * self.side * self.side
        self.decoder = nn.Sequential(nn.Linear(2 * features, hidden), nn.ReLU(), nn.Linear(hidden, 6))

    def forward(self, z: torch.Tensor, z_pos: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                groups: torch.Tensor | None = None, *, x: torch.Tensor | None = None,
                module: nn.Module | None = None, **_unused):
        if x is None or module is None:
            raise TrainingError("aet transforms the module's input images and encodes them with the module",
                                "call it with x= and module= (the trainer does so for objectives with needs_input)")
        if x.ndim != 4:
            raise TrainingError(f"aet needs images (B, C, H, W) as input, got {tuple(x.shape)}",
                                "use aet on the first module only")
        theta = random_affine(len(x), **self.params, device=x.device)  # (B, 2, 3)
        z_t = module(transform_images(x, theta))
        pair = torch.cat([_layout(z.float(), self.side), _layout(z_t.float(), self.side)], dim=1)
        loss = aet_loss(self.decoder(pair), theta)
        return loss, {}


def problems(cfg, facts: ModuleFacts) -> Problems:
    out = []
    if facts.index is not None and facts.index > 0:
        out.append(("objective.kind", f"'aet' transforms the input images, so only the first module (which "
                                      f"reads them) can use it, and this is module {facts.index + 1}; put aet on the "
                                      "first module or choose another objective here"))
    elif facts.in_shape is not None and len(facts.in_shape) != 3:
        out.append(("objective.kind", f"'aet' transforms images (C, H, W), but the module's input is "
                                      f"{tuple(facts.in_shape)}; use it on a module that reads images"))
    if len(facts.out_shape) == 2:
        out.append(("objective.kind", f"'aet' compares (z(x), z(t(x))) as vectors or maps, but the module "
                                      f"outputs a sequence {shape_text(facts.out_shape)}; use a map or vector output"))
    return out


def build(cfg, facts: ModuleFacts) -> nn.Module:
    need_input_shape(cfg, facts)
    return AETObjective(facts.out_shape, rotation=cfg.rotation, translation=cfg.translation, scale=cfg.scale,
                        shear=cfg.shear, hidden=cfg.hidden)
