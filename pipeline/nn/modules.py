"""The module library: a stack module is a small torch network built from its config.

Pure torch: no I/O, no Ray, no store. Shapes are per sample (no batch dim):

- ``(C, H, W)``  an image or feature map,
- ``(C, T)``     a sequence (channels x time: an audio signal, conv1d / gru outputs),
- ``(D,)``       a vector,
- ``(P, C, H, W)`` P patches, each encoded separately (GIM). Inside a patched
  module a per-patch *vector* is kept as ``(D, 1, 1)`` so every patched shape
  stays 4-D and ``grid_features`` can always rebuild the grid.

``infer_shape`` walks the layers arithmetically (the parameter count comes from
building the module on the ``meta`` device, so no memory and no forward pass)
and ``build_module`` uses the same walk, so the two cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.nn.blocks import (GRU, Flatten, GlobalPool, Linear, Normalize, PreActBlock, PreActBottleneck, PatchMean, nhwc_in,
                               nhwc_out, normalize_problem)
from pipeline.errors import IsostackError, TrainingError
from schemas.config import (Conv1dLayer, ConvLayer, FlattenLayer, GlobalPoolLayer, GRULayer, LinearLayer, ModuleConfig,
                            PoolLayer, ResNetStage, StemLayer)

__all__ = [
    "ShapeError",
    "build_module",
    "grid_features",
    "infer_shape",
    "pool_to_vector",
    "shape_text",
    "to_patches",
]


class ShapeError(IsostackError):
    """The layers of a module do not compose.

    ``problems`` is a list of ``(layer_index, message)``; ``layer_index`` is
    None when the problem is the module's ``patches`` (or its input as a whole),
    so the plan can report ``stack.<name>.layers[i]: message``.
    """

    def __init__(self, problems: list[tuple[int | None, str]], fix: str = "") -> None:
        self.problems = list(problems)
        lines = [f"layers[{i}]: {m}" if i is not None else m for i, m in self.problems]
        super().__init__("; ".join(lines), fix or "change the layer (or add flatten/global_pool before a linear layer)")

    def __reduce__(self):
        return (type(self), (self.problems, self.fix))


# ---------------------------------------------------------------- shape helpers (pure functions)


def to_patches(x: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """Cut images into a grid of overlapping square patches, row-major.

    x: (B, C, H, W) -> (B, P, C, size, size) with P = gh * gw,
    gh = (H - size) // stride + 1 (16x16 stride 8 on 64x64 -> 7x7 = 49).
    Patch p sits at grid row p // gw, column p % gw.
    """
    b, c = x.shape[:2]
    p = x.unfold(2, size, stride).unfold(3, size, stride)  # (B, C, gh, gw, s, s)
    gh, gw = p.shape[2], p.shape[3]
    return p.permute(0, 2, 3, 1, 4, 5).reshape(b, gh * gw, c, size, size)


def pool_to_vector(z: torch.Tensor) -> torch.Tensor:
    """Mean over every dim except batch and channel.

    (B, D) -> (B, D); (B, C, T) -> (B, C); (B, C, H, W) -> (B, C); (B, P, C, H, W) -> (B, C).
    """
    if z.ndim == 2:
        return z
    if z.ndim == 3:  # a sequence: the time average (speaker identity does not depend on when)
        return z.mean(dim=2)
    if z.ndim == 4:
        return z.mean(dim=(2, 3))
    if z.ndim == 5:
        return z.mean(dim=(1, 3, 4))
    raise TrainingError(f"pool_to_vector got a tensor of shape {tuple(z.shape)}",
                        "pass (B, D), (B, C, T), (B, C, H, W) or (B, P, C, H, W) activations")


def grid_features(z: torch.Tensor) -> torch.Tensor:
    """The feature grid that the grid objective predicts over.

    (B, P, C, h, w) with P = g*g -> each patch mean-pooled -> (B, C, g, g)
    (as GIM pools every patch encoding before its InfoNCE loss);
    (B, C, H, W) stays as it is.
    """
    if z.ndim == 4:
        return z
    if z.ndim != 5:
        raise TrainingError(f"grid_features needs (B, C, H, W) or (B, P, C, h, w), got {tuple(z.shape)}",
                            "use a module whose output is a feature map or a patch grid")
    b, p, c = z.shape[:3]
    g = math.isqrt(p)
    if g * g != p:
        raise TrainingError(f"{p} patches do not form a square grid", "use square images for patch objectives")
    pooled = PatchMean.apply(z)  # (B, P, C)
    return pooled.reshape(b, g, g, c).permute(0, 3, 1, 2)  # (B, C, g, g)


def patch_grid_size(height: int, width: int, size: int, stride: int) -> tuple[int, int]:
    """(gh, gw) of to_patches on an H x W image."""
    return (height - size) // stride + 1, (width - size) // stride + 1


# ---------------------------------------------------------------- the shape walk


@dataclass(frozen=True)
class _Act:
    """One activation during the walk: per-patch (or per-sample) shape and whether it is a vector."""

    shape: tuple[int, ...]  # (C, H, W), (C, T) for a sequence, or (D,) for a vector (stored as (D, 1, 1) when patched)
    vector: bool

    @property
    def sequence(self) -> bool:
        return len(self.shape) == 2


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _walk(cfg: ModuleConfig, in_shape: tuple[int, ...]) -> tuple[int | None, list[_Act]]:
    """Check that the layers compose; returns (P or None, activation before each layer + the output).

    Raises ShapeError naming the first layer that does not fit (the shapes
    after it are unknown, so later layers cannot be checked).
    """
    in_shape = tuple(int(s) for s in in_shape)
    if any(s < 1 for s in in_shape) or len(in_shape) not in (1, 2, 3, 4):
        raise ShapeError([(None, f"input shape {in_shape} is not (D,), (C, T), (C, H, W) or (P, C, H, W)")])
    if cfg.normalize is not None and (problem := normalize_problem(cfg.normalize.mode, cfg.normalize.kernel, in_shape)):
        raise ShapeError([(None, problem)])
    n_patches: int | None = None
    if cfg.patches is not None:
        size, stride = cfg.patches.size, cfg.patches.stride
        if len(in_shape) != 3:
            what = {4: "already cut into patches", 2: "a sequence (C, T)"}.get(len(in_shape), "a vector")
            raise ShapeError([(None, f"patches need an image (C, H, W) but the input {in_shape} is {what}; "
                                     "only the first module can cut patches")])
        c, h, w = in_shape
        if size > h or size > w:
            raise ShapeError([(None, f"patch size {size} is larger than the {h}x{w} image")])
        gh, gw = patch_grid_size(h, w, size, stride)
        n_patches, act = gh * gw, _Act((c, size, size), False)
    elif len(in_shape) == 4:
        n_patches = in_shape[0]
        # A (D, 1, 1) patch from a patched module below is treated as a map; a conv on it still works.
        act = _Act(in_shape[1:], False)
    else:
        act = _Act(in_shape, len(in_shape) == 1)

    acts = [act]
    patched = n_patches is not None
    for i, layer in enumerate(cfg.layers):
        act = _step(i, layer, act, patched)
        acts.append(act)
    return n_patches, acts


@dataclass(frozen=True)
class _Input:
    """Layer ``i``'s input during shape inference, with the checks every layer kind shares."""

    i: int
    act: _Act
    patched: bool

    def fail(self, msg: str):
        raise ShapeError([(self.i, msg)])

    def need_map(self, what: str) -> tuple[int, int, int]:
        if self.act.vector:
            self.fail(f"{what} needs a feature map (C, H, W) but its input is a vector of {self.act.shape[0]} features")
        if self.act.sequence:
            c, t = self.act.shape
            self.fail(f"{what} needs a feature map (C, H, W) but its input is a sequence ({c}, {t}); "
                      "use conv1d (and maxpool/avgpool/global_pool, which take sequences) on sequences")
        return self.act.shape  # type: ignore[return-value]

    def need_sequence(self, what: str) -> tuple[int, int]:
        if not self.act.sequence:
            kind = f"a vector of {self.act.shape[0]} features" if self.act.vector else f"a {shape_text(self.act.shape)} map"
            self.fail(f"{what} needs a sequence (C, T) but its input is {kind}; "
                      "use it on 1-D data (dataset.kind synthetic_audio or wav_folder) or use conv/stem on images")
        return self.act.shape  # type: ignore[return-value]

    def vec(self, d: int) -> _Act:
        return _Act((d, 1, 1) if self.patched else (d,), True)


def _step(i: int, layer, act: _Act, patched: bool) -> _Act:
    for kind, infer in _SHAPE_RULES:
        if isinstance(layer, kind):
            return infer(layer, _Input(i, act, patched))
    raise ShapeError([(i, f"unknown layer type {getattr(layer, 'type', layer)!r}")])


def _padding(layer, inp: _Input) -> int:
    pad = layer.kernel // 2 if layer.padding == "same" else layer.padding
    if pad < 0:
        inp.fail(f"{layer.type} padding must be 'same' or at least 0, found {pad}")
    return pad


def _conv(layer: ConvLayer, inp: _Input) -> _Act:
    c, h, w = inp.need_map("conv")
    pad = _padding(layer, inp)
    oh, ow = _out_size(h, layer.kernel, layer.stride, pad), _out_size(w, layer.kernel, layer.stride, pad)
    if oh < 1 or ow < 1:
        inp.fail(f"conv kernel {layer.kernel} (padding {pad}) is larger than the {h}x{w} map")
    return _Act((layer.channels, oh, ow), False)


def _conv1d(layer: Conv1dLayer, inp: _Input) -> _Act:
    c, t = inp.need_sequence("conv1d")
    pad = _padding(layer, inp)
    ot = _out_size(t, layer.kernel, layer.stride, pad)
    if ot < 1:
        inp.fail(f"conv1d kernel {layer.kernel} (padding {pad}) is longer than the {t} steps of its input")
    return _Act((layer.channels, ot), False)


def _gru(layer: GRULayer, inp: _Input) -> _Act:
    c, t = inp.need_sequence("gru")
    return _Act((layer.hidden, t), False)


def _pool(layer: PoolLayer, inp: _Input) -> _Act:
    stride = layer.stride if layer.stride is not None else layer.kernel
    if stride < 1:
        inp.fail(f"{layer.type} stride must be at least 1, found {stride}")
    if inp.act.sequence:
        c, t = inp.act.shape
        if layer.kernel > t:
            inp.fail(f"{layer.type} window {layer.kernel} is longer than the {t} steps of its input")
        return _Act((c, _out_size(t, layer.kernel, stride, 0)), False)
    c, h, w = inp.need_map(layer.type)
    if layer.kernel > h or layer.kernel > w:
        inp.fail(f"{layer.type} window {layer.kernel} is larger than the {h}x{w} map")
    return _Act((c, _out_size(h, layer.kernel, stride, 0), _out_size(w, layer.kernel, stride, 0)), False)


def _global_pool(layer: GlobalPoolLayer, inp: _Input) -> _Act:
    if inp.act.sequence:
        return inp.vec(inp.act.shape[0])
    c, _, _ = inp.need_map("global_pool")
    return inp.vec(c)


def _flatten(layer: FlattenLayer, inp: _Input) -> _Act:
    return inp.vec(inp.act.shape[0] if inp.act.vector else math.prod(inp.act.shape))


def _linear(layer: LinearLayer, inp: _Input) -> _Act:
    if not inp.act.vector and inp.act.shape[1:] != (1, 1):  # a 1x1 map is a vector (e.g. per patch above a patched module)
        what = "sequence" if inp.act.sequence else "map"
        inp.fail(f"linear needs a vector but its input is a {shape_text(inp.act.shape)} {what}; "
                 "add flatten or global_pool before it")
    return inp.vec(layer.features)


def _stem(layer: StemLayer, inp: _Input) -> _Act:
    c, h, w = inp.need_map("stem")
    return _Act((layer.channels, h, w), False)


def _resnet_stage(layer: ResNetStage, inp: _Input) -> _Act:
    c, h, w = inp.need_map("resnet_stage")
    width = layer.channels * (4 if layer.block == "bottleneck" else 1)
    return _Act((width, _out_size(h, 3, layer.stride, 1), _out_size(w, 3, layer.stride, 1)), False)


_SHAPE_RULES = ((ConvLayer, _conv), (Conv1dLayer, _conv1d), (GRULayer, _gru), (PoolLayer, _pool),
                (GlobalPoolLayer, _global_pool), (FlattenLayer, _flatten), (LinearLayer, _linear), (StemLayer, _stem),
                (ResNetStage, _resnet_stage))


def shape_text(shape) -> str:
    """A per-sample shape as messages print it: ``(C, H, W)``."""
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _out_shape(n_patches: int | None, act: _Act) -> tuple[int, ...]:
    return (n_patches, *act.shape) if n_patches is not None else act.shape


def infer_shape(cfg: ModuleConfig, in_shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """(out_shape, n_params) of the module on per-sample input ``in_shape``, without real data.

    Shapes come from the arithmetic walk; the parameter count from building
    the module on the meta device (no memory, no forward). Raises ShapeError.
    """
    n_patches, acts = _walk(cfg, in_shape)
    with torch.device("meta"):
        module = _build(cfg, n_patches, acts, _map_size(in_shape))
    return _out_shape(n_patches, acts[-1]), sum(p.numel() for p in module.parameters())


def build_module(cfg: ModuleConfig, in_shape: tuple[int, ...]) -> nn.Module:
    """The module as a torch network: forward(x: (B, *in_shape)) -> (B, *out_shape). Raises ShapeError."""
    n_patches, acts = _walk(cfg, in_shape)
    return _build(cfg, n_patches, acts, _map_size(in_shape))


# ---------------------------------------------------------------- layers


def _layer(layer, act: _Act, patched: bool) -> nn.Module:
    c_in = act.shape[0]
    if isinstance(layer, ConvLayer):
        pad = layer.kernel // 2 if layer.padding == "same" else layer.padding
        conv = nn.Conv2d(c_in, layer.channels, layer.kernel, stride=layer.stride, padding=pad)
        return nn.Sequential(conv, nn.ReLU()) if layer.activation == "relu" else conv
    if isinstance(layer, Conv1dLayer):
        pad = layer.kernel // 2 if layer.padding == "same" else layer.padding
        conv = nn.Conv1d(c_in, layer.channels, layer.kernel, stride=layer.stride, padding=pad)
        return nn.Sequential(conv, nn.ReLU()) if layer.activation == "relu" else conv
    if isinstance(layer, GRULayer):
        return GRU(c_in, layer.hidden, layer.layers)
    if isinstance(layer, PoolLayer) and act.sequence:
        cls = nn.MaxPool1d if layer.type == "maxpool" else nn.AvgPool1d
        return cls(layer.kernel, stride=layer.stride if layer.stride is not None else layer.kernel)
    if isinstance(layer, PoolLayer):
        cls = nn.MaxPool2d if layer.type == "maxpool" else nn.AvgPool2d
        return cls(layer.kernel, stride=layer.stride if layer.stride is not None else layer.kernel)
    if isinstance(layer, GlobalPoolLayer):
        return GlobalPool(layer.mode, keep_map=patched)
    if isinstance(layer, FlattenLayer):
        return Flatten(keep_map=patched)
    if isinstance(layer, LinearLayer):
        return Linear(c_in, layer.features, layer.activation == "relu", keep_map=patched)
    if isinstance(layer, StemLayer):
        return nn.Conv2d(c_in, layer.channels, 3, padding=1)  # no ReLU: every pre-activation block starts with one
    if isinstance(layer, ResNetStage):
        block = PreActBottleneck if layer.block == "bottleneck" else PreActBlock
        blocks, c = [], c_in
        for j in range(layer.blocks):
            blocks.append(block(c, layer.channels, layer.stride if j == 0 else 1))
            c = layer.channels * block.expansion
        return nn.Sequential(*blocks)
    raise ShapeError([(None, f"unknown layer {layer!r}")])


class StackModule(nn.Module):
    """One module of the stack: optional input normalisation and patch cutting, then its layers per sample or per patch."""

    def __init__(self, layers: list[nn.Module], patches: tuple[int, int] | None, normalize: nn.Module | None = None) -> None:
        super().__init__()
        self.patches, self.normalize = patches, normalize
        self.layers = nn.Sequential(*layers)
        # Maps and weights channels-last inside (oneDNN's CPU convs work in NHWC without reordering each map; cuDNN
        # takes either); the input and the output's gradient turned once at the module's edges, not by every conv
        # reading them (stl10-gim: eight copies of m2's 0.4 GB maps a step; a m1 step ~5%, m2 ~10% faster).
        self.to(memory_format=torch.channels_last)
        self.nhwc = any(isinstance(m, nn.Conv2d) for m in self.modules())

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        return nhwc_in(x) if self.nhwc else x

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        return nhwc_out(y) if self.nhwc else y.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize is not None:  # per image (the whole image before cutting patches), per patch above one
            x = self.normalize(x.flatten(0, 1)).unflatten(0, x.shape[:2]) if x.ndim == 5 else self.normalize(x)
        if self.patches is not None:
            x = to_patches(x, *self.patches)  # (B, P, C, s, s)
        if x.ndim == 5:
            b, p = x.shape[:2]
            y = self.layers(self._in(x.flatten(0, 1)))  # every patch of every image as one batch: (B*P, C', h, w)
            return self._out(y).unflatten(0, (b, p))
        return self._out(self.layers(self._in(x)))


def _map_size(in_shape) -> tuple[int, int] | None:
    return tuple(int(s) for s in in_shape[-2:]) if len(in_shape) in (3, 4) else None


def _build(cfg: ModuleConfig, n_patches: int | None, acts: list[_Act], in_size: tuple[int, int] | None) -> StackModule:
    patched = n_patches is not None
    layers = [_layer(layer, act, patched) for layer, act in zip(cfg.layers, acts)]
    patches = (cfg.patches.size, cfg.patches.stride) if cfg.patches is not None else None
    norm = cfg.normalize and Normalize(cfg.normalize.kernel if cfg.normalize.mode == "local" else None, in_size)
    return StackModule(layers, patches, norm)
