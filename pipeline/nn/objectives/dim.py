"""Deep InfoMax, local-global (Hjelm et al. 2019, "Learning deep representations by mutual information
estimation and maximization", Sec. 3.2).

DIM maximises the mutual information between a sample's global summary y and each of its local
features M_l: a discriminator T(M_l, y) scores (local, global) pairs of the same image high and pairs
across images low, and the local objective averages the estimate over every location (their Eq. 6).
T is a dot product of two small learned embeddings, a 1x1-conv net on the locals and an MLP on y (the
paper's "encode-and-dot-product" architecture). Two estimators, as in the paper: InfoNCE (Eq. 5) and the
Jensen-Shannon bound (Eq. 4). Here the module's output is the local feature map and y comes from a small
learned global head on its average pool; both embeddings are discarded after training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import TrainingError
from pipeline.nn.modules import grid_features, shape_text
from pipeline.nn.objectives.base import ModuleFacts, Problems


def local_features(z: torch.Tensor) -> torch.Tensor:
    """(B, C, T) -> itself; (B, C, H, W) -> (B, C, H*W); (B, P, C, h, w) -> pooled patches (B, C, P)."""
    if z.ndim == 3:
        return z
    if z.ndim in (4, 5):
        return grid_features(z).flatten(2)
    raise TrainingError(f"dim needs local features (a sequence, a feature map or a patch grid), got {tuple(z.shape)}",
                        "use a module whose output keeps its positions (no global_pool/flatten before dim)")


def local_global_scores(local: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
    """local: (B, D, L) embedded locals, glob: (B, D) embedded globals -> (B, B, L) scores T(M_{j,l}, y_i) at [i, j, l]."""
    return torch.einsum("id,jdl->ijl", glob, local)


def dim_infonce(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE local-global loss from scores (B, B, L) (Hjelm et al. 2019, Eq. 5).

    The positive of (y_i, location l) is M_{i,l}; its negatives are every location of every other image
    (j != i), as in the reference implementation. The negatives' log-sum-exp is shared by all locations of
    image i, so the cost stays O(B^2 L). Returns (loss, accuracy: positive above every same-location negative).
    """
    b = scores.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=scores.device)
    pos = scores[eye]  # (B, L): diagonal i == j
    neg = scores.masked_fill(eye[:, :, None], float("-inf")).flatten(1)  # (B, B*L), own image masked
    lse_neg = torch.logsumexp(neg, dim=1, keepdim=True)  # (B, 1)
    loss = (torch.logaddexp(pos, lse_neg) - pos).mean()  # -log softmax of the positive among [pos, negatives]
    accuracy = (pos > scores.masked_fill(eye[:, :, None], float("-inf")).amax(dim=1)).float().mean()
    return loss, accuracy


def dim_jsd(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Jensen-Shannon MI estimator as a loss (Hjelm et al. 2019, Eq. 4): E_P[sp(-T)] + E_{PxP~}[sp(T)].

    sp is softplus; positives are the diagonal (same image), negatives all other (image, location) pairs.
    """
    b = scores.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=scores.device)
    pos, neg = scores[eye], scores[~eye]  # (B, L), (B*(B-1), L)
    loss = F.softplus(-pos).mean() + F.softplus(neg).mean()
    accuracy = (pos > scores.masked_fill(eye[:, :, None], float("-inf")).amax(dim=1)).float().mean()
    return loss, accuracy


class DIMObjective(nn.Module):
    """Local-global Deep InfoMax: 1x1-conv local embedding, MLP global head on the pooled map, dot-product scores."""

    needs_pairs = False
    needs_labels = False

    def __init__(self, channels: int, *, estimator: str, projection_dim: int | None, max_locations: int) -> None:
        super().__init__()
        d = projection_dim or channels
        self.estimator, self.max_locations = estimator, max_locations
        self.global_head = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, d))
        self.local_head = nn.Sequential(nn.Conv1d(channels, channels, 1), nn.ReLU(), nn.Conv1d(channels, d, 1))

    def forward(self, z: torch.Tensor, z_pos: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                groups: torch.Tensor | None = None):
        loc = local_features(z).float()  # (B, C, L)
        if loc.shape[0] < 2:
            raise TrainingError("dim contrasts images of a batch, which has 1 sample", "raise train.batch_size")
        glob = self.global_head(loc.mean(dim=2))  # (B, D): y from the whole map
        if loc.shape[2] > self.max_locations:  # subsample the scored locations; y still sees all of them
            keep = torch.randperm(loc.shape[2], device=loc.device)[: self.max_locations]
            loc = loc[:, :, keep]
        scores = local_global_scores(self.local_head(loc), glob)  # (B, B, L)
        loss, accuracy = (dim_infonce if self.estimator == "infonce" else dim_jsd)(scores)
        return loss, {"accuracy": float(accuracy)}


def problems(cfg, facts: ModuleFacts) -> Problems:
    out = []
    if len(facts.out_shape) not in (2, 3, 4):
        out.append(("objective.kind", f"'dim' contrasts local features with a global vector, but the module "
                                      f"outputs a vector {shape_text(facts.out_shape)} with no locations; remove the "
                                      "global_pool/flatten/linear layers or use another objective on this module"))
    if facts.batch_size is not None and facts.batch_size < 2:
        out.append(("train.batch_size", "'dim' contrasts the images of a batch; use at least 2"))
    return out


def build(cfg, facts: ModuleFacts) -> nn.Module:
    return DIMObjective(facts.width, estimator=cfg.estimator, projection_dim=cfg.projection_dim,
                        max_locations=cfg.max_locations)
