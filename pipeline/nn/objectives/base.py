"""What every objective file shares: the module facts its checks and builder read, and the pairing-shape checks.

Each objective file owns ``problems(cfg, facts)`` (what the objective needs of its module, as
(``objective.<field>``, message) pairs, key paths relative to the module) and ``build(cfg, facts)``;
``pipeline.nn.objectives.OBJECTIVES`` maps each ``kind`` to that pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from pipeline.nn.modules import shape_text

Problems = list[tuple[str, str]]


@dataclass(frozen=True)
class ModuleFacts:
    """What a module tells its objective. None = unknown here (the check that needs it is skipped)."""

    out_shape: tuple[int, ...]  # per sample: (D,), (C, T), (C, H, W) or (P, C, h, w)
    in_shape: tuple[int, ...] | None = None
    index: int | None = None  # position in the stack; 0 reads the dataset
    batch_size: int | None = None
    num_classes: int | None = None
    module: torch.nn.Module | None = None  # moco copies it as its key encoder

    @property
    def width(self) -> int:
        """Channels of the output: D of a vector, C of a sequence, map or patch grid."""
        return self.out_shape[0] if len(self.out_shape) <= 2 else self.out_shape[-3]

    @property
    def spatial(self) -> bool:
        return len(self.out_shape) >= 3


class ObjectiveSpec(NamedTuple):
    problems: Callable[[object, ModuleFacts], Problems]
    build: Callable[[object, ModuleFacts], torch.nn.Module]


def pairing_problems(cfg, facts: ModuleFacts) -> Problems:
    """Whether the pairing fits the kind of output, for objectives that read ``objective.pairing``:
    ``patch_grid`` pairs positions of a map, ``temporal`` time steps of a sequence (C, T)."""
    out_shape, pairing, shape = facts.out_shape, getattr(cfg, "pairing", None), shape_text(facts.out_shape)
    if pairing == "patch_grid" and not facts.spatial and cfg.kind != "infonce_grid":
        what = "a sequence" if len(out_shape) == 2 else "a vector"
        fix = "; use pairing 'temporal' on sequences" if len(out_shape) == 2 else ""
        return [("objective.pairing", f"'patch_grid' pairs positions of a feature map, but the module outputs "
                                      f"{what} {shape}{fix}")]
    if pairing == "temporal" and len(out_shape) != 2:
        what = "a vector" if len(out_shape) == 1 else "a feature map or patch grid"
        fix = "'patch_grid' (positions of the map)" if len(out_shape) >= 3 else "same_instance or neighbor_pose"
        return [("objective.pairing", f"'temporal' pairs time steps of a sequence (C, T), but the module outputs "
                                      f"{what} {shape}; use {fix}, or give the module a sequence output")]
    return []
