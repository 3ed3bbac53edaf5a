"""Local objectives: one loss per module, built from its config and its output shape.

    obj = build_objective(cfg.objective, out_shape, num_classes)
    loss, stats = obj(z, z_pos, labels)   # z, z_pos: (B, *out_shape); labels: (B,) long or None

An objective holds only the loss's learned parts (W_k, heads, projection,
classifier); the trainer optimises them with the module and discards them
after training. Pure torch: no I/O, no Ray.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch

from pipeline.errors import ConfigError
from pipeline.objectives.infonce import InfoNCEGridObjective, InfoNCEPairObjective
from pipeline.objectives.sfa import SFAObjective
from pipeline.objectives.supervised import SupervisedObjective
from pipeline.objectives.variational import VInfoNCEObjective
from schemas.config import SFA, InfoNCEGrid, InfoNCEPair, SupervisedLocal, VInfoNCE

__all__ = ["LocalObjective", "build_objective"]


@runtime_checkable
class LocalObjective(Protocol):
    """What the trainer calls. stats: extra scalars such as "accuracy" or "kl"."""

    needs_pairs: bool  # the trainer must pass z_pos (the partner rows through the same module)
    needs_labels: bool  # the trainer must pass labels

    def __call__(
        self, z: torch.Tensor, z_pos: torch.Tensor | None, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


def build_objective(cfg, out_shape: tuple[int, ...], num_classes: int | None) -> torch.nn.Module:
    """The objective for a module whose per-sample output is ``out_shape``.

    out_shape: (D,), (C, H, W) or (P, C, h, w). Raises ConfigError (key paths
    relative to the module: ``objective.<field>``) when the objective cannot
    use that output.
    """
    out_shape = tuple(out_shape)
    spatial = len(out_shape) >= 3
    width = out_shape[-3] if spatial else out_shape[0]  # channels after pooling
    pairing = getattr(cfg, "pairing", None)
    if pairing == "patch_grid" and not spatial and isinstance(cfg, (InfoNCEPair, SFA, VInfoNCE)):
        raise ConfigError([("objective.pairing", f"'patch_grid' pairs positions of a feature map, but the module "
                                                 f"outputs a vector {out_shape}")])
    if isinstance(cfg, InfoNCEPair):
        return InfoNCEPairObjective(width, temperature=cfg.temperature, bilinear=cfg.bilinear,
                                    projection_dim=cfg.projection_dim, pairing=cfg.pairing)
    if isinstance(cfg, InfoNCEGrid):
        if not spatial:
            raise ConfigError([("objective.kind", f"'infonce_grid' needs a grid (patches or a feature map), "
                                                  f"but the module outputs {out_shape}")])
        if len(out_shape) == 4:
            rows = math.isqrt(out_shape[0])
            if rows * rows != out_shape[0]:
                raise ConfigError([("objective.kind", f"{out_shape[0]} patches do not form a square grid")])
        else:
            rows = out_shape[1]
        if rows < 3:
            raise ConfigError([("objective.steps", f"the grid has {rows} rows; predicting rows below needs at least 3")])
        # projection_dim is not used: W_k (C x C) is this loss's learned part, as in GIM.
        return InfoNCEGridObjective(width, rows, steps=cfg.steps, negatives=cfg.negatives)
    if isinstance(cfg, SFA):
        return SFAObjective(width, eps=cfg.eps, projection_dim=cfg.projection_dim, pairing=cfg.pairing)
    if isinstance(cfg, VInfoNCE):
        return VInfoNCEObjective(width, latent_dim=cfg.latent_dim, temperature=cfg.temperature,
                                 kl_weight=cfg.kl_weight, projection_dim=cfg.projection_dim, pairing=cfg.pairing)
    if isinstance(cfg, SupervisedLocal):
        if not num_classes:
            raise ConfigError([("objective.kind", "'supervised_local' needs class labels, which this dataset lacks")])
        return SupervisedObjective(width, num_classes, projection_dim=cfg.projection_dim)
    raise ConfigError([("objective.kind", f"unknown objective {getattr(cfg, 'kind', cfg)!r}")])
