"""Contrastive Predictive Coding with an autoregressive context (van den Oord et al. 2018, "Representation
Learning with Contrastive Predictive Coding").

CPC summarises the steps so far into a context c_t = g_ar(z_<=t) and scores the true future z_{t+k}
against negatives with a log-bilinear model f_k = exp(z_{t+k}^T W_k c_t), one W_k per step ahead
(their Eq. 3 and Sec. 2.2); the loss is InfoNCE over those scores. Their audio model uses a GRU for g_ar
(GIM's audio top module keeps it); their vision model a PixelCNN-style masked convolution over a patch
grid that predicts rows below. Both are here:

- a per-sample sequence ``(B, C, T)`` is one lane of T steps;
- a feature map ``(B, C, H, W)`` or a patch grid ``(B, P, C, h, w)`` (patches pooled, as GIM does) has
  its rows as steps and each column as a lane.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import TrainingError
from pipeline.nn.modules import grid_features, shape_text
from pipeline.nn.objectives.base import ModuleFacts, Problems
from pipeline.nn.objectives.infonce import grid_step_loss


def step_grid(z: torch.Tensor) -> torch.Tensor:
    """The steps CPC predicts over, as (B, C, S, L): S steps along dim 2, L independent lanes.

    (B, C, T) -> (B, C, T, 1); (B, C, H, W) -> itself (rows are steps, columns lanes);
    (B, P, C, h, w) -> the pooled patch grid (B, C, g, g).
    """
    if z.ndim == 3:
        return z.unsqueeze(-1)
    if z.ndim in (4, 5):
        return grid_features(z)
    raise TrainingError(f"cpc_ar needs a sequence (B, C, T), a feature map or a patch grid, got {tuple(z.shape)}",
                        "use a module whose output keeps its steps (no global_pool/flatten before cpc_ar)")


def gru_context(gru: nn.GRU, g: torch.Tensor, bptt_steps: int | None) -> torch.Tensor:
    """g: (B, C, S, L) -> contexts (B, H, S, L), c_t from steps <= t of each lane.

    bptt_steps: truncated backprop through time: the hidden state handed from one chunk of steps to the
    next is detached, so gradients reach back at most ``bptt_steps`` steps (None = the whole sequence).
    """
    b, c, s, lanes = g.shape
    seq = g.permute(0, 3, 2, 1).reshape(b * lanes, s, c)  # (B*L, S, C), one sequence per lane
    chunk = bptt_steps or s
    outs, h = [], None
    for start in range(0, s, chunk):
        out, h = gru(seq[:, start:start + chunk], h)
        outs.append(out)
        h = h.detach() if bptt_steps else h
    ctx = torch.cat(outs, dim=1)  # (B*L, S, H)
    return ctx.reshape(b, lanes, s, -1).permute(0, 3, 2, 1)


class CausalConvContext(nn.Module):
    """PixelCNN-style context: two convolutions masked so that row t sees only rows <= t (all columns near it).

    Implemented as zero padding above and a kernel of ``kernel`` rows ending at the current row, which is the
    vertical stack of a PixelCNN; each layer adds kernel - 1 rows of context.
    """

    def __init__(self, channels: int, width: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.conv1 = nn.Conv2d(channels, width, (kernel, 3))
        self.conv2 = nn.Conv2d(width, width, (kernel, 3))

    def _causal(self, conv: nn.Conv2d, g: torch.Tensor) -> torch.Tensor:
        lanes = g.shape[3]
        pad_lr = 1 if lanes > 1 else 0  # a 1-lane sequence has no neighbours: use the kernel's centre column
        weight = conv.weight if lanes > 1 else conv.weight[..., 1:2]
        g = F.pad(g, (pad_lr, pad_lr, self.kernel - 1, 0))  # (left, right, top, bottom)
        return F.conv2d(g, weight, conv.bias)

    def forward(self, g: torch.Tensor) -> torch.Tensor:  # (B, C, S, L) -> (B, width, S, L)
        return self._causal(self.conv2, F.relu(self._causal(self.conv1, g)))


class CPCARObjective(nn.Module):
    """CPC: context c_t from an autoregressor, W_k c_t scored against z_{t+k} and sampled negatives."""

    needs_pairs = False
    needs_labels = False

    def __init__(self, channels: int, steps_in_grid: int, *, context: str, context_dim: int | None, steps: int,
                 negatives: int, bptt_steps: int | None, kernel: int) -> None:
        super().__init__()
        width = context_dim or channels
        self.kind, self.negatives, self.bptt_steps = context, negatives, bptt_steps
        if context == "gru":
            self.context = nn.GRU(channels, width, batch_first=True)
        else:
            self.context = CausalConvContext(channels, width, kernel)
        # Steps that run past the grid are never scored, so their W_k are not built. W_k maps z into the
        # context's space: c_t . (W_k z_{t+k}) is CPC's bilinear score z_{t+k}^T W_k^T c_t.
        self.offsets = [k for k in range(1, steps + 1) if k < steps_in_grid]
        self.w_k = nn.ModuleList(nn.Conv2d(channels, width, 1, bias=False) for _ in self.offsets)

    def forward(self, z: torch.Tensor, z_pos: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                groups: torch.Tensor | None = None):
        g = step_grid(z).float()  # (B, C, S, L)
        if g.shape[2] < 2 or not self.offsets:
            raise TrainingError(f"cpc_ar got {g.shape[2]} step(s); predicting ahead needs at least 2",
                                "use a longer sequence or a taller feature map")
        ctx = gru_context(self.context, g, self.bptt_steps) if self.kind == "gru" else self.context(g)
        total, acc, used = 0.0, 0.0, 0
        for w, offset in zip(self.w_k, self.offsets):
            if offset >= g.shape[2]:
                continue
            loss, accuracy = grid_step_loss(ctx, w(g), offset, self.negatives)
            total, acc, used = total + loss, acc + accuracy, used + 1
        return total / used, {"accuracy": float(acc / used)}


def steps_of(out_shape: tuple[int, ...]) -> int:
    """Steps along which cpc_ar predicts: T of (C, T), rows of (C, H, W), grid rows of (P, C, h, w)."""
    return math.isqrt(out_shape[0]) if len(out_shape) == 4 else out_shape[1]


def problems(cfg, facts: ModuleFacts) -> Problems:
    out_shape, shape, out = facts.out_shape, shape_text(facts.out_shape), []
    if len(out_shape) not in (2, 3, 4):
        out.append(("objective.kind", f"'cpc_ar' predicts later steps of a sequence (C, T), a feature map or a "
                                      f"patch grid, but the module outputs a vector {shape}; remove the "
                                      "global_pool/flatten/linear layers or put cpc_ar on a lower module"))
    elif len(out_shape) == 4 and math.isqrt(out_shape[0]) ** 2 != out_shape[0]:
        out.append(("objective.kind", f"{out_shape[0]} patches do not form a square grid; use square images and patches"))
    elif steps_of(out_shape) < 2:
        out.append(("objective.kind", f"'cpc_ar' needs at least 2 steps to predict ahead, but the module's "
                                      f"output {shape} has {steps_of(out_shape)}; pool less or use a larger input"))
    if cfg.bptt_steps is not None and cfg.context != "gru":
        out.append(("objective.bptt_steps", "truncated backprop through time applies to the 'gru' context only; "
                                            "remove bptt_steps or set objective.context: gru"))
    return out


def build(cfg, facts: ModuleFacts) -> nn.Module:
    return CPCARObjective(facts.width, steps_of(facts.out_shape), context=cfg.context, context_dim=cfg.context_dim,
                          steps=cfg.steps, negatives=cfg.negatives, bptt_steps=cfg.bptt_steps, kernel=cfg.kernel)
