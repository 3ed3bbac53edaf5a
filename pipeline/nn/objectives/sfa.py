"""Slow Feature Analysis as a local loss (the seed thesis's GIM-vs-SFA comparison).

SFA (Wiskott & Sejnowski 2002) asks for outputs that change slowly between
paired inputs under a unit-covariance, decorrelation constraint. Here the
constraint is enforced exactly per batch by whitening (differentiably, through
the Cholesky factor), so the loss is just the mean squared difference of the
whitened pair outputs, and collapse is impossible.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import TrainingError
from pipeline.nn.objectives.base import ModuleFacts, Problems, pairing_problems
from pipeline.nn.objectives.infonce import projection_head
from pipeline.nn.pairing import WITHIN_SAMPLE, paired_vectors


def whiten(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (N, D) -> (N, D) centred and whitened: cov(out) = L^-1 cov L^-T ~ I.

    L is the Cholesky factor of cov(x) + eps*I; out = (x - mean) L^-T computed
    with a triangular solve (no explicit inverse). float32 throughout, since
    Cholesky has no half-precision kernel.
    """
    x = x.float()
    xc = x - x.mean(dim=0, keepdim=True)
    cov = xc.T @ xc / (x.shape[0] - 1) + eps * torch.eye(x.shape[1], device=x.device)
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        raise TrainingError("the batch covariance is not positive definite (non-finite outputs?)",
                            "raise objective.eps or lower the learning rate")
    return torch.linalg.solve_triangular(chol, xc.T, upper=False).T


def sfa_loss(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """a, b: (N, D) outputs of N pairs -> mean squared difference after one shared whitening.

    Both members are whitened with the statistics of all 2N rows, so the
    constraint holds on the outputs as a whole; the mean is over rows and
    features (2.0 for unrelated pairs, 0 for identical ones).
    """
    w = whiten(torch.cat([a, b]), eps)
    wa, wb = w[: a.shape[0]], w[a.shape[0]:]
    return (wa - wb).pow(2).mean()


class SFAObjective(nn.Module):
    """Whitened slowness on pooled outputs (optionally through a projection head)."""

    needs_labels = False

    def __init__(self, width: int, *, eps: float, projection_dim: int | None, pairing: str) -> None:
        super().__init__()
        self.eps = eps
        self.width = projection_dim or width
        self.head = projection_head(width, projection_dim)
        self.needs_pairs = pairing not in WITHIN_SAMPLE

    def forward(self, z: torch.Tensor, z_pos: torch.Tensor | None, labels: torch.Tensor | None = None,
                groups: torch.Tensor | None = None):
        a, b = paired_vectors(z, z_pos)  # (N, D) each; grid pairs need no cap (the cost is N*D^2)
        if a.shape[0] <= self.width:
            raise TrainingError(f"SFA whitens each batch, so the {a.shape[0]} pairs per batch must exceed "
                                f"the output width {self.width}",
                                "raise train.batch_size or set objective.projection_dim lower")
        loss = sfa_loss(self.head(a), self.head(b), self.eps)
        return loss, {}


def problems(cfg, facts: ModuleFacts) -> Problems:
    out = pairing_problems(cfg, facts)
    width = cfg.projection_dim or facts.width
    if facts.batch_size is not None and facts.batch_size <= width:
        out.append(("train.batch_size", f"SFA whitens each batch, so the batch ({facts.batch_size}) must exceed "
                                        f"the output width ({width})"))
    return out


def build(cfg, facts: ModuleFacts) -> nn.Module:
    return SFAObjective(facts.width, eps=cfg.eps, projection_dim=cfg.projection_dim, pairing=cfg.pairing)
