"""Variational InfoNCE (the Variational GIM thesis): a stochastic code z ~ q(z|x) = N(mu, sigma^2).

InfoNCE is scored on reparameterised samples of z and a KL term pulls q
towards N(0, I), a bottleneck that regularises what each module keeps.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.nn.objectives.base import ModuleFacts, Problems, pairing_problems
from pipeline.nn.objectives.infonce import GRID_PAIRS_MAX, cosine_scores, info_nce_from_scores, projection_head
from pipeline.nn.pairing import WITHIN_SAMPLE, paired_vectors


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per row, summed over latent dims.

    mu, logvar: (N, L) -> (N,); 0.5 * sum(mu^2 + sigma^2 - log sigma^2 - 1)
    (Kingma & Welling 2014, App. B).
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(dim=1)


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps, eps ~ N(0, I): (N, L) -> (N, L), differentiable in mu and logvar."""
    return mu + (0.5 * logvar).exp() * torch.randn_like(mu)


class VInfoNCEObjective(nn.Module):
    """Linear heads for mu and log sigma^2 on pooled features; InfoNCE on z + kl_weight * mean KL.

    In training z is sampled; in eval mode z = mu (the mean code).
    """

    needs_labels = False

    def __init__(self, width: int, *, latent_dim: int | None, temperature: float, kl_weight: float,
                 projection_dim: int | None, pairing: str) -> None:
        super().__init__()
        latent = latent_dim or width
        self.mu = nn.Linear(width, latent)
        self.logvar = nn.Linear(width, latent)
        self.head = projection_head(latent, projection_dim)
        self.temperature, self.kl_weight = temperature, kl_weight
        self.needs_pairs = pairing not in WITHIN_SAMPLE

    def forward(self, z: torch.Tensor, z_pos: torch.Tensor | None, labels: torch.Tensor | None = None,
                groups: torch.Tensor | None = None):
        a, b = paired_vectors(z, z_pos, GRID_PAIRS_MAX)  # (N, D) each
        x = torch.cat([a, b]).float()  # both members are encoded by the same q(z|x)
        mu, logvar = self.mu(x), self.logvar(x)  # (2N, L)
        code = reparameterise(mu, logvar) if self.training else mu
        code = self.head(code)
        scores = cosine_scores(code[: a.shape[0]], code[a.shape[0]:], self.temperature)
        nce, accuracy = info_nce_from_scores(scores, groups=groups if z_pos is not None else None)
        kl = gaussian_kl(mu, logvar).mean()
        return nce + self.kl_weight * kl, {"kl": kl.item(), "infonce": nce.item(), "accuracy": accuracy.item()}


def problems(cfg, facts: ModuleFacts) -> Problems:
    return pairing_problems(cfg, facts)


def build(cfg, facts: ModuleFacts) -> nn.Module:
    return VInfoNCEObjective(facts.width, latent_dim=cfg.latent_dim, temperature=cfg.temperature,
                             kl_weight=cfg.kl_weight, projection_dim=cfg.projection_dim, pairing=cfg.pairing)
