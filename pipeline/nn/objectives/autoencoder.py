"""Local reconstruction: each module learns to reconstruct its own input through a decoder that is discarded.

The greedy layer-wise autoencoder (Bengio et al. 2007) as a local loss: MSE between the module's input x
and decoder(z). The decoder is built from the input and output shapes:

- a map to a map (or a sequence to a sequence): conv -> ReLU -> resize to the input's size -> conv
  (resize-convolution rather than a transposed convolution, so any size ratio works without
  checkerboard artefacts);
- anything else (a vector, a patch grid, a map to a vector): a 2-layer MLP on the flattened output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError, TrainingError
from pipeline.nn.objectives.base import ModuleFacts, Problems

# The MLP decoder's weights grow with prod(in_shape) * hidden; beyond this the plan refuses it.
MLP_DECODER_MAX_PARAMS = 32_000_000


def decoder_kind(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> str:
    """'conv2d' (map -> map), 'conv1d' (sequence -> sequence) or 'mlp'."""
    if len(in_shape) == 3 and len(out_shape) == 3:
        return "conv2d"
    if len(in_shape) == 2 and len(out_shape) == 2:
        return "conv1d"
    return "mlp"


def mlp_decoder_params(in_shape: tuple[int, ...], out_shape: tuple[int, ...], hidden: int) -> int:
    return math.prod(out_shape) * hidden + hidden + hidden * math.prod(in_shape) + math.prod(in_shape)


class ResizeConvDecoder(nn.Module):
    """(B, C_out, *size_out) -> (B, C_in, *size_in) for 1-D or 2-D maps."""

    def __init__(self, c_out: int, c_in: int, size_in: tuple[int, ...], hidden: int) -> None:
        super().__init__()
        conv = nn.Conv2d if len(size_in) == 2 else nn.Conv1d
        self.size = tuple(size_in)
        self.mode = "bilinear" if len(size_in) == 2 else "linear"
        self.conv1 = conv(c_out, hidden, 3, padding=1)
        self.conv2 = conv(hidden, c_in, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(z))
        h = F.interpolate(h, size=self.size, mode=self.mode, align_corners=False)
        return self.conv2(h)


class MLPDecoder(nn.Module):
    def __init__(self, out_shape: tuple[int, ...], in_shape: tuple[int, ...], hidden: int) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(out_shape), hidden), nn.ReLU(),
                                 nn.Linear(hidden, math.prod(in_shape)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).reshape(len(z), *self.in_shape)


class AutoencoderObjective(nn.Module):
    """MSE(decoder(z), x) on the module's own input x (passed by the trainer: needs_input)."""

    needs_pairs = False
    needs_labels = False
    needs_input = True

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], *, hidden: int) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        kind = decoder_kind(self.in_shape, tuple(out_shape))
        if kind == "mlp":
            self.decoder = MLPDecoder(tuple(out_shape), self.in_shape, hidden)
        else:
            self.decoder = ResizeConvDecoder(out_shape[0], in_shape[0], self.in_shape[1:], hidden)

    def forward(self, z: torch.Tensor, z_pos: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                groups: torch.Tensor | None = None, *, x: torch.Tensor | None = None, **_unused):
        if x is None:
            raise TrainingError("autoencoder reconstructs the module's input, which was not passed",
                                "call the objective with x= (the trainer does so for objectives with needs_input)")
        if tuple(x.shape[1:]) != self.in_shape:
            raise TrainingError(f"autoencoder was built for inputs {self.in_shape}, got {tuple(x.shape[1:])}",
                                "rebuild the objective with the module's input shape")
        recon = self.decoder(z.float())
        loss = F.mse_loss(recon, x.detach().float())
        return loss, {"mse": float(loss.detach())}


def problems(cfg, facts: ModuleFacts) -> Problems:
    if facts.in_shape is None or decoder_kind(tuple(facts.in_shape), facts.out_shape) != "mlp":
        return []
    params = mlp_decoder_params(tuple(facts.in_shape), facts.out_shape, cfg.hidden)
    if params <= MLP_DECODER_MAX_PARAMS:
        return []
    return [("objective.hidden", f"the autoencoder's MLP decoder from {tuple(facts.out_shape)} back to the input "
                                 f"{tuple(facts.in_shape)} would have {params:,} parameters (limit "
                                 f"{MLP_DECODER_MAX_PARAMS:,}); lower objective.hidden, or make the "
                                 "module output a feature map of the input's rank")]


def build(cfg, facts: ModuleFacts) -> nn.Module:
    return AutoencoderObjective(tuple(need_input_shape(cfg, facts)), facts.out_shape, hidden=cfg.hidden)


def need_input_shape(cfg, facts: ModuleFacts) -> tuple[int, ...]:
    """The module's input shape, which objectives that reconstruct or transform the input cannot build without."""
    if facts.in_shape is None:
        raise ConfigError([("objective.kind", f"{cfg.kind!r} needs the module's input shape; "
                                              "call build_objective(..., in_shape=in_shape)")])
    return tuple(facts.in_shape)
