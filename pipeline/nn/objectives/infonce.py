"""InfoNCE objectives: pairs with in-batch negatives, and GIM's patch-grid (or sequence) prediction.

Maths as pure functions of tensors; the nn.Modules hold only the loss's
learned parts (projection head, bilinear W, W_k), discarded after training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import TrainingError
from pipeline.nn.modules import grid_features, shape_text
from pipeline.nn.objectives.base import ModuleFacts, Problems, pairing_problems
from pipeline.nn.pairing import WITHIN_SAMPLE, paired_vectors

# Rows contrasted per step when pairing neighbouring grid positions: the score
# matrix is rows x rows, so a 64-image batch of 16x16 maps (30k pairs) is subsampled.
GRID_PAIRS_MAX = 2048
# Sequence steps scored per prediction step: a random window of this many context positions (GIM audio's
# subsample_win = 128), so a long first-layer output (800+ steps) costs what a 128-step one does.
SEQUENCE_WINDOW = 128


# ---------------------------------------------------------------- pure functions


def info_nce_from_scores(scores: torch.Tensor, symmetric: bool = True,
                         groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE with the positives on the diagonal.

    scores: (N, N), scores[i, j] = f(a_i, b_j); row i's positive is column i and
    the other N-1 columns are its in-batch negatives. Returns (loss, accuracy).
    F.cross_entropy takes log-softmax with the max subtracted, so logits of
    1e4 stay finite. symmetric=True averages the a->b and b->a directions (as
    in CLIP / SimCLR's NT-Xent), so both members of a pair are pulled alike.
    groups: (N,) optional ids; off-diagonal entries whose rows share an id are
    other positives of the same pairing group (another view of the same
    object), so they are masked out instead of being pushed away as negatives.
    """
    target = torch.arange(scores.shape[0], device=scores.device)
    if groups is not None:
        same = (groups[:, None] == groups[None, :]) & ~torch.eye(len(groups), dtype=torch.bool, device=scores.device)
        scores = scores.masked_fill(same, float("-inf"))
    loss = F.cross_entropy(scores, target)
    if symmetric:
        loss = (loss + F.cross_entropy(scores.T, target)) / 2
    accuracy = (scores.argmax(dim=1) == target).float().mean()
    return loss, accuracy


def cosine_scores(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """a: (N, D), b: (N, D) -> (N, N) cosine similarities / temperature."""
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / temperature


def grid_step_loss(context: torch.Tensor, predicted: torch.Tensor, offset: int, negatives: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One prediction step of GIM's vision InfoNCE (Löwe et al. 2019, Sec. 3/4.1).

    context:   (B, C, gh, gw)  c_t = z_t (GIM vision uses no autoregressor);
    predicted: (B, C, gh, gw)  W_k z at every position;
    offset:    rows below the context that the step predicts (k + 1 in GIM,
               which skips the overlapping row right below).
    Score f = c_{r,col} . W_k z_{r+offset,col}; ``negatives`` scores per
    positive use W_k z at random positions of random images of the batch
    (as GIM's torch.randint over all y*x*batch). Cross-entropy with the
    positive at index 0. Returns (loss, accuracy).
    """
    b, c, gh, gw = context.shape
    ctx = context[:, :, : gh - offset].permute(0, 2, 3, 1).reshape(-1, c)  # (N, C), N = B*(gh-offset)*gw
    pos = predicted[:, :, offset:].permute(0, 2, 3, 1).reshape(-1, c)  # (N, C)
    pool = predicted.permute(0, 2, 3, 1).reshape(-1, c)  # (B*gh*gw, C) candidates for negatives
    idx = torch.randint(pool.shape[0], (ctx.shape[0], negatives), device=pool.device)
    neg = pool[idx]  # (N, n, C)
    logits = torch.cat([(ctx * pos).sum(-1, keepdim=True), torch.einsum("nc,nkc->nk", ctx, neg)], dim=1)  # (N, 1+n)
    target = torch.zeros(ctx.shape[0], dtype=torch.long, device=ctx.device)
    loss = F.cross_entropy(logits, target)
    accuracy = (logits.argmax(dim=1) == 0).float().mean()
    return loss, accuracy


def projection_head(d_in: int, d_out: int | None, hidden: int | None = None) -> nn.Module:
    """SimCLR-style 2-layer MLP used only by the loss (its hidden layer ``hidden`` wide, default d_in), or
    identity when d_out is None."""
    if d_out is None:
        return nn.Identity()
    hidden = hidden or d_in
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


# ---------------------------------------------------------------- learned parts


class InfoNCEPairObjective(nn.Module):
    """Pairs (x, x+) with in-batch negatives on pooled outputs (B x B scores, symmetric)."""

    needs_labels = False

    def __init__(self, width: int, *, temperature: float, bilinear: bool, projection_dim: int | None, pairing: str,
                 flatten: bool = False, projection_hidden: int | None = None) -> None:
        super().__init__()
        self.temperature = temperature
        self.flatten = flatten  # score a pair of samples on their whole maps (C*H*W = width), not the mean over positions
        self.head = projection_head(width, projection_dim, projection_hidden)
        d = projection_dim or width
        # Bilinear scores a^T W b as in CPC/GIM (W initialised like nn.Linear), instead of cosine.
        self.w = nn.Linear(d, d, bias=False) if bilinear else None
        self.needs_pairs = pairing not in WITHIN_SAMPLE

    def forward(self, z: torch.Tensor, z_pos: torch.Tensor | None, labels: torch.Tensor | None = None,
                groups: torch.Tensor | None = None):
        if self.flatten:  # pair_problems allows it only for pairings of samples, so z_pos is given
            a, b = z.flatten(1), z_pos.flatten(1)
        else:
            a, b = paired_vectors(z, z_pos, GRID_PAIRS_MAX)  # (N, D) each
        a, b = self.head(a), self.head(b)
        if self.w is not None:
            scores = a @ self.w(b).T / self.temperature
        else:
            scores = cosine_scores(a, b, self.temperature)
        loss, accuracy = info_nce_from_scores(scores.float(), groups=groups if z_pos is not None else None)
        return loss, {"accuracy": float(accuracy)}


class InfoNCEGridObjective(nn.Module):
    """GIM's patch-grid InfoNCE: per step k, a 1x1-conv W_k predicts the patch k+1 rows below.

    With ``sequence=True`` the output is a sequence (B, C, T), scored as a grid of T rows and one column, and
    step k predicts z_{t+k} from z_t: GIM's audio loss (Löwe et al. 2019, Sec. 4.2, after CPC's 12 steps) with
    the encoder output as its own context (CPC's GRU context is the cpc_ar objective). Sequence steps are not
    shifted by one: audio frames are not half-overlapping patches.
    """

    needs_pairs = False
    needs_labels = False
    per_sample_negatives = True  # a mean over context positions, each scored against random rows of the batch

    def __init__(self, channels: int, rows: int, *, steps: int, negatives: int, sequence: bool = False) -> None:
        super().__init__()
        self.sequence = sequence
        shift = 0 if sequence else 1
        # Offsets that run past the grid (or sequence) are never scored, so their W_k are not built.
        usable = [k for k in range(1, steps + 1) if k + shift < rows]
        self.offsets = [k + shift for k in usable]
        self.negatives = negatives
        self.w_k = nn.ModuleList(nn.Conv2d(channels, channels, 1, bias=False) for _ in usable)

    def forward(self, z: torch.Tensor, z_pos: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                groups: torch.Tensor | None = None):
        if self.sequence:
            if z.ndim != 3:
                raise TrainingError(f"a sequence objective got activations of shape {tuple(z.shape)}",
                                    "feed it the module's (B, C, T) output")
            g = z.float().unsqueeze(-1)  # (B, C, T, 1): time as the rows of a one-column grid
        else:
            g = grid_features(z).float()  # (B, C, gh, gw)
        if g.shape[2] < (2 if self.sequence else 3) or not self.w_k:
            what = "steps; predicting steps ahead needs at least 2" if self.sequence else \
                "rows; predicting rows below needs at least 3"
            raise TrainingError(f"the {'sequence' if self.sequence else 'grid'} has {g.shape[2]} {what}",
                                "use more patches, a larger feature map or a longer sequence")
        total, acc = 0.0, 0.0
        used = 0
        for w, offset in zip(self.w_k, self.offsets):
            if offset >= g.shape[2]:
                continue
            step_in = g
            if self.sequence and g.shape[2] > SEQUENCE_WINDOW + offset:
                # Contexts in a random window plus the offset they predict; negatives come from the window too.
                start = int(torch.randint(g.shape[2] - SEQUENCE_WINDOW - offset + 1, ()))
                step_in = g[:, :, start:start + SEQUENCE_WINDOW + offset]
            loss, accuracy = grid_step_loss(step_in, w(step_in), offset, self.negatives)
            total, acc, used = total + loss, acc + accuracy, used + 1
        return total / used, {"accuracy": float(acc / used)}


def pair_problems(cfg, facts: ModuleFacts) -> Problems:
    if cfg.pool == "flatten" and cfg.pairing in WITHIN_SAMPLE:
        return [("objective.pool", f"'flatten' scores pairs of samples on their whole maps, but pairing "
                                   f"{cfg.pairing!r} pairs positions within one sample; use pool 'mean' (the default) "
                                   "or a pairing of samples (same_instance, neighbor_pose, augment)")]
    if cfg.projection_hidden is not None and cfg.projection_dim is None:
        return [("objective.projection_hidden", f"is {cfg.projection_hidden}, but projection_dim is null: there is no "
                                                "projection head to widen; set projection_dim or drop projection_hidden")]
    return pairing_problems(cfg, facts)


def build_pair(cfg, facts: ModuleFacts) -> nn.Module:
    flatten = cfg.pool == "flatten"
    width = math.prod(facts.out_shape) if flatten else facts.width
    return InfoNCEPairObjective(width, temperature=cfg.temperature, bilinear=cfg.bilinear,
                                projection_dim=cfg.projection_dim, pairing=cfg.pairing, flatten=flatten,
                                projection_hidden=cfg.projection_hidden)


def grid_problems(cfg, facts: ModuleFacts) -> Problems:
    """A grid to predict rows of (GIM §3.1): square patches or a feature map with at least 3 rows, or a sequence
    (C, T) of at least 2 steps paired 'temporal' (steps ahead in time)."""
    out_shape, shape = facts.out_shape, shape_text(facts.out_shape)
    if len(out_shape) == 2:
        if cfg.pairing != "temporal":
            return [("objective.pairing", f"'infonce_grid' on a sequence {shape} predicts steps ahead in time, but "
                                          f"its pairing is {cfg.pairing!r} (rows of a 2-D grid); set objective.pairing: temporal")]
        if out_shape[1] < 2:
            return [("objective.steps", f"the sequence {shape} has {out_shape[1]} step; predicting steps ahead needs "
                                        "at least 2 (use a longer dataset.length or smaller strides)")]
        return []
    if not facts.spatial:
        return [("objective.kind", f"'infonce_grid' needs a grid (patches or a feature map), but the module outputs {shape}")]
    problems = pairing_problems(cfg, facts)
    if len(out_shape) == 4 and math.isqrt(out_shape[0]) ** 2 != out_shape[0]:
        return problems + [("objective.kind", f"{out_shape[0]} patches do not form a square grid")]
    if _grid_rows(out_shape) < 3:
        problems.append(("objective.steps", f"the grid has {_grid_rows(out_shape)} rows; predicting rows below needs at least 3"))
    return problems


def build_grid(cfg, facts: ModuleFacts) -> nn.Module:
    if len(facts.out_shape) == 2:  # a sequence (C, T): k steps ahead in time
        return InfoNCEGridObjective(facts.width, facts.out_shape[1], steps=cfg.steps, negatives=cfg.negatives, sequence=True)
    # projection_dim is not used: W_k (C x C) is this loss's learned part, as in GIM.
    return InfoNCEGridObjective(facts.width, _grid_rows(facts.out_shape), steps=cfg.steps, negatives=cfg.negatives)


def _grid_rows(out_shape: tuple[int, ...]) -> int:
    return math.isqrt(out_shape[0]) if len(out_shape) == 4 else out_shape[-2]
