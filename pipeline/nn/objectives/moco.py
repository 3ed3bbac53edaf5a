"""Momentum contrast (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning").

A query q = f_q(x) is matched against its key k+ = f_k(x+) from a **momentum copy** of the encoder,
with the negatives taken from a **queue** of the keys of past batches (their Eq. 1 and Algorithm 1):
loss = -log exp(q.k+/t) / (exp(q.k+/t) + sum_queue exp(q.k/t)). The key encoder is never trained by
gradient: after each optimizer step theta_k <- m theta_k + (1 - m) theta_q (Eq. 2). Here f_q is the
module being trained (plus an optional projection head), f_k a copy of both, and the loss is symmetrised
over the pair (x, x+). The queue and the key encoder are state of this objective (buffers and frozen
parameters), so checkpoints keep them and a restarted actor resumes with the same negatives; like every
objective they are discarded after training. isostack modules have no batch norm, so MoCo's shuffling BN
is not needed. Queue keys of the same pairing group (e.g. the same object) as a query are masked out of its
negatives, as in-batch negatives are for infonce_pair.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError, TrainingError
from pipeline.nn.modules import pool_to_vector
from pipeline.nn.objectives.base import ModuleFacts, Problems
from pipeline.nn.objectives.infonce import projection_head


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (N, D), k: (N, D) positives, queue: (K, D) negatives, all L2-normalised -> (loss, accuracy).

    Logits (N, 1 + K) with the positive at index 0 (He et al. 2020, Algorithm 1). mask: (N, K) True where a
    queue entry must not count as a negative (another view of the query's own object).
    """
    pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    neg = q @ queue.T  # (N, K)
    if mask is not None:
        neg = neg.masked_fill(mask, float("-inf"))
    logits = torch.cat([pos, neg], dim=1) / temperature
    target = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target), (logits.argmax(dim=1) == 0).float().mean()


@torch.no_grad()
def momentum_update(key: nn.Module, query: nn.Module, momentum: float) -> None:
    """theta_k <- m theta_k + (1 - m) theta_q, parameter by parameter (He et al. 2020, Eq. 2)."""
    for pk, pq in zip(key.parameters(), query.parameters()):
        pk.mul_(momentum).add_(pq.detach(), alpha=1 - momentum)


class MoCoObjective(nn.Module):
    """MoCo on pooled outputs: the trainer passes the pair's inputs and the module; keys come from a momentum copy."""

    needs_labels = False
    needs_input = True  # the trainer passes x=, x_pos= and module= (the keys are f_k of the inputs)

    def __init__(self, module: nn.Module, width: int, *, temperature: float, momentum: float, queue_size: int,
                 projection_dim: int | None) -> None:
        super().__init__()
        self.temperature, self.momentum = temperature, momentum
        self.needs_pairs = True
        self.head = projection_head(width, projection_dim)
        d = projection_dim or width
        # Frozen copies: never in the optimizer's way (no grad), moved only by after_step.
        self.key_encoder = copy.deepcopy(module).requires_grad_(False)
        self.key_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, d), dim=1))  # (K, D)
        self.register_buffer("queue_groups", torch.full((queue_size,), -1, dtype=torch.long))  # -1: no group
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, z: torch.Tensor, z_pos: torch.Tensor | None, labels: torch.Tensor | None = None,
                groups: torch.Tensor | None = None, *, x: torch.Tensor | None = None,
                x_pos: torch.Tensor | None = None, module: nn.Module | None = None):
        if z_pos is None or x is None or x_pos is None:
            raise TrainingError("moco needs each sample's positive view and the inputs of both views",
                                "set objective.pairing to same_instance, neighbor_pose or augment, and call it with "
                                "x= and x_pos= (the trainer does so for objectives with needs_input)")
        q = F.normalize(self.head(pool_to_vector(z).float()), dim=1)  # (B, D)
        q_pos = F.normalize(self.head(pool_to_vector(z_pos).float()), dim=1)
        with torch.no_grad():
            keys = self.key_encoder(torch.cat([x_pos, x]))  # (2B, ...): the key of q is f_k(x+), of q_pos f_k(x)
            k = F.normalize(self.key_head(pool_to_vector(keys).float()), dim=1)
        queries = torch.cat([q, q_pos])  # (2B, D)
        mask = None
        if groups is not None:
            both = torch.cat([groups, groups])
            mask = both[:, None] == self.queue_groups[None, :]  # (2B, K)
        loss, accuracy = moco_loss(queries, k, self.queue.clone(), self.temperature, mask)
        if self.training:
            self._enqueue(k, torch.cat([groups, groups]) if groups is not None else None)
        return loss, {"accuracy": float(accuracy)}

    def after_step(self, module: nn.Module) -> None:
        """The momentum update of the key encoder and head, after the optimizer has moved the query side."""
        momentum_update(self.key_encoder, module, self.momentum)
        momentum_update(self.key_head, self.head, self.momentum)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor, groups: torch.Tensor | None) -> None:
        size = self.queue.shape[0]
        keys = keys[-size:]
        idx = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_groups[idx] = groups[-size:] if groups is not None else -1
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)


def problems(cfg, facts: ModuleFacts) -> Problems:
    if cfg.pairing == "patch_grid":
        return [("objective.pairing", "'moco' encodes a second view of each sample with its key encoder, so it "
                                      "needs sample pairs: use same_instance, neighbor_pose or augment "
                                      "(first module), not patch_grid")]
    return []


def build(cfg, facts: ModuleFacts) -> nn.Module:
    if facts.module is None:
        raise ConfigError([("objective.kind", "'moco' copies the module as its key encoder, but no module was "
                                              "given; call build_objective(..., module=module)")])
    return MoCoObjective(facts.module, facts.width, temperature=cfg.temperature, momentum=cfg.momentum,
                         queue_size=cfg.queue_size, projection_dim=cfg.projection_dim)
