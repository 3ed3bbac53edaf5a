"""Greedy supervised baseline (GIM paper, Table 1's "Greedy Supervised" row): a linear classifier per module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import TrainingError
from pipeline.nn.objectives.base import ModuleFacts, Problems
from pipeline.nn.objectives.infonce import projection_head
from pipeline.nn.modules import pool_to_vector


class SupervisedObjective(nn.Module):
    """Cross-entropy of an auxiliary classifier on pooled features (projection head first, if set)."""

    needs_pairs = False
    needs_labels = True

    def __init__(self, width: int, num_classes: int, *, projection_dim: int | None) -> None:
        super().__init__()
        self.head = projection_head(width, projection_dim)
        self.classifier = nn.Linear(projection_dim or width, num_classes)

    def forward(self, z: torch.Tensor, z_pos: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                groups: torch.Tensor | None = None):
        if labels is None:
            raise TrainingError("supervised_local needs the labels of every batch", "feed labels to the objective")
        logits = self.classifier(self.head(pool_to_vector(z).float()))  # (B, classes)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return loss, {"accuracy": float(accuracy)}


def problems(cfg, facts: ModuleFacts) -> Problems:
    if not facts.num_classes:
        return [("objective.kind", "'supervised_local' needs class labels, which this dataset lacks; "
                                   "choose a self-supervised objective (infonce_pair, sfa, ...)")]
    return []


def build(cfg, facts: ModuleFacts) -> nn.Module:
    return SupervisedObjective(facts.width, facts.num_classes, projection_dim=cfg.projection_dim)
