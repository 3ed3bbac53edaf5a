"""Tensor codecs: how one row of an activation tensor becomes one ``fixed_size_binary`` value.

A codec is built for one per-row shape and turns ``(N, *shape)`` tensors into an
Arrow ``FixedSizeBinaryArray`` of N values and back. Its name and ``params`` go
into every shard's schema metadata, so a reader rebuilds the codec from the
shard alone. A codec with learned parameters (int8 with a per-channel scale)
fixes them on its first ``encode`` and reports them through ``params``. The
writer builds a fresh codec for every shard, so such parameters are *per
shard*: calibrated on the shard's first written rows and recorded in that
shard's schema (the reader rebuilds the codec shard by shard). A codec may also
offer ``stats() -> dict`` (clipping, error); the writer sums it into the
manifest's ``codec_stats``. To add one: write a class with the ``Codec``
members and ``register_codec`` it.

torch is imported by the functions that touch tensors, not when this module loads: the run driver
imports the store for its bookkeeping (manifests, JSON files, leases) and stays free of torch while
the module actors train (its memory is a Ray driver's, not a trainer's).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Protocol

import numpy as np
import pyarrow as pa

from pipeline.errors import StoreError


class Codec(Protocol):
    """Encodes rows of shape ``shape`` to fixed-size byte strings and back."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # what the bytes hold ("float16", "uint8", ...), recorded in the manifest
    row_bytes: int
    params: dict[str, Any]  # JSON-able; needed to decode (empty for plain dtypes)

    def encode(self, tensor: torch.Tensor) -> pa.FixedSizeBinaryArray:
        """``tensor: (N, *shape)`` on any device -> N values (may share memory with a CPU ``tensor``)."""
        ...

    def decode(self, buffer: pa.Buffer, n: int) -> torch.Tensor:
        """The ``n * row_bytes`` bytes of ``buffer`` -> ``(n, *shape)`` tensor.

        May be a read-only view on ``buffer`` (no copy); callers copy it into
        their own memory, casting on the way.
        """
        ...


def as_tensor(data: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A torch view of ``data`` (numpy arrays are wrapped, not copied)."""
    import torch

    if isinstance(data, torch.Tensor):
        return data.detach()
    if isinstance(data, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(data))
    raise StoreError(f"cannot store a tensor of type {type(data).__name__}", "pass a torch.Tensor or a numpy.ndarray")


def view_readonly(buffer: pa.Buffer | np.ndarray, np_dtype: np.dtype, count: int) -> torch.Tensor:
    """A 1-D torch tensor over ``count`` items of ``buffer`` without copying.

    Arrow buffers are read-only; torch warns about that on every view. The
    callers never write through the view (they copy out of it), so the
    warning is noise here.
    """
    import torch

    arr = np.frombuffer(buffer, dtype=np_dtype, count=count)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


_INT_OF_SIZE = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


class PlainCodec:
    """Rows stored as the raw little-endian values of one torch dtype (float16, bfloat16, float32, uint8).

    The bytes travel through numpy as an integer type of the same width, so
    dtypes numpy lacks (bfloat16) work the same way.
    """

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str,
                 check: Callable[[torch.Tensor], None] | None = None) -> None:
        import torch

        torch_dtype = getattr(torch, dtype)  # "float16" -> torch.float16
        self.name = name
        self.dtype = dtype
        self.shape = tuple(int(s) for s in shape)
        self.params: dict[str, Any] = {}
        self._torch_dtype = torch_dtype
        self._check = check
        self._numel = math.prod(self.shape)
        self._itemsize = torch.empty((), dtype=torch_dtype).element_size()
        self.row_bytes = self._numel * self._itemsize

    def encode(self, tensor: torch.Tensor) -> pa.FixedSizeBinaryArray:
        import torch

        src = tensor
        if self._check is not None:
            self._check(src)
        # Cast on the source device: for float16 that halves a GPU->CPU copy.
        out = src.to(self._torch_dtype) if src.dtype != self._torch_dtype else src
        out = out.to("cpu").contiguous()
        n = out.shape[0]
        data = out.reshape(-1).view(torch.uint8).numpy()
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(self.row_bytes), n, [None, pa.py_buffer(data)])

    def decode(self, buffer: pa.Buffer, n: int) -> torch.Tensor:
        raw = view_readonly(buffer, _INT_OF_SIZE[self._itemsize], n * self._numel)
        return raw.view(self._torch_dtype).view(n, *self.shape)


def _check_float16(src: torch.Tensor) -> None:
    """float16 tops out at 65504: larger finite activations would silently become inf."""
    import torch

    if src.dtype in (torch.float16, torch.uint8, torch.int8, torch.bool) or src.numel() == 0:
        return  # nothing these hold overflows float16
    big = src.abs().amax()
    if torch.isinf(big):  # the source has infs of its own; look only at its finite values
        big = torch.where(torch.isfinite(src), src.abs(), 0).amax()
    if big > 65504:
        raise StoreError(f"activations up to {big.item():.4g} exceed the float16 range (65504)",
                         "set store.codec: float32, or normalise the module's output")


def _check_uint8(src: torch.Tensor) -> None:
    import torch

    if src.dtype != torch.uint8:
        raise StoreError(f"codec 'uint8' stores uint8 pixels, got a {src.dtype} tensor",
                         "convert the images to uint8 (0..255) first, or use codec float16/float32")


def channel_axis(shape: tuple[int, ...]) -> int | None:
    """The per-row dimension that holds channels: dim 0 of a ``(C, H, W)`` map or a ``(D,)`` vector,
    dim 1 of ``(P, C, h, w)`` patch rows and of ``(T, D)`` sequences; None for a scalar row."""
    if len(shape) == 0:
        return None
    return 1 if len(shape) in (2, 4) else 0


class Int8Codec:
    """Rows stored as one byte per value: per-channel affine quantization.

    ``q = clamp(round((x - offset_c) / scale_c), 0, 255)`` stored as uint8, decoded as
    ``offset_c + q * scale_c`` in float32, with ``c`` the channel (``channel_axis``:
    dim 0 of ``(C, H, W)``, dim 1 of ``(P, C, h, w)`` patch rows, the only dim of
    ``(D,)``). ``offset_c`` (the zero point, as the value code 0 stands for) and
    ``scale_c`` come from the channel's min and max over the **first batch this
    codec encodes**; the writer makes one codec per shard, so every shard is
    calibrated on its own first rows (more accurate than one calibration per
    version, and a shard stays decodable alone). ReLU outputs have ``offset 0``,
    so their zeros stay exact.

    Later batches are clipped to the calibrated ``[offset, offset + 255 scale]``;
    ``stats()`` counts the clipped values. Every encode checks the bound: for
    in-range values ``|decode(encode(x)) - x| <= scale/2`` (plus float32 rounding of
    the decode itself); NaN/inf inputs and ranges float32 cannot hold are refused.
    """

    name = "int8"
    dtype = "uint8"

    def __init__(self, shape: tuple[int, ...], params: dict[str, Any]) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.row_bytes = math.prod(self.shape)
        self.axis = channel_axis(self.shape)
        self.channels = self.shape[self.axis] if self.axis is not None else 1
        self.params: dict[str, Any] = {}
        self._scale = self._offset = None  # float32, broadcastable against (N, *shape)
        self._clipped = self._values = 0
        self._max_error = 0.0
        if params:
            self._set_params(params)

    def stats(self) -> dict[str, Any]:
        """Values encoded, values clipped to the calibrated range, and the largest in-range error seen."""
        return {"values": self._values, "clipped": self._clipped, "max_abs_error": self._max_error}

    def encode(self, tensor: torch.Tensor) -> pa.FixedSizeBinaryArray:
        import torch

        x = tensor.detach().to(torch.float32)  # on the source device: only uint8 crosses to the CPU
        n = x.shape[0]
        # One reduction finds NaN/inf (they poison the sum); the elementwise look only when it is not finite.
        if x.numel() and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            bad = (~torch.isfinite(x)).sum().item()
            raise StoreError(f"codec 'int8' got {bad} NaN/inf activation values in a batch of {n} rows; "
                             "an affine int8 code has no value for them",
                             "fix the module's output (a diverged module: lower its lr), or store it with "
                             "stack.<module>.store.codec: float32")
        if self._scale is None:
            self._calibrate(x)
        scale, offset = self._scale.to(x.device), self._offset.to(x.device)
        q = torch.sub(x, offset).div_(scale)  # codes before rounding
        # Outside the calibrated range by more than half a step: clipped to the end codes.
        outside = (q - 127.5).abs_() > 128
        clipped = int(outside.sum())
        q.round_().clamp_(0, 255)
        if x.numel():
            # The bound, per channel: half a step, plus the float32 rounding of offset + q * scale itself.
            err = torch.addcmul(offset, q, scale).sub_(x).abs_()
            if clipped:
                err.masked_fill_(outside, 0)
            dims = tuple(d for d in range(x.dim()) if self.axis is None or d != 1 + self.axis)
            worst = err.amax(dim=dims)  # (channels,)
            mag = torch.maximum(offset.abs(), (offset + 255 * scale).abs()).reshape(-1)
            bound = scale.reshape(-1) / 2 * (1 + 1e-3) + 2 * mag * torch.finfo(torch.float32).eps
            if bool((worst > bound).any()):
                where = int((worst - bound).argmax())
                raise StoreError(f"codec 'int8': reconstruction error {worst[where].item():.4g} exceeds half a "
                                 f"quantization step (channel {where}, scale {scale.reshape(-1)[where].item():.4g})",
                                 "store this module with stack.<module>.store.codec: float16 or float32")
            self._max_error = max(self._max_error, float(worst.max()))
            self._clipped += clipped
            self._values += x.numel()
        out = q.to(torch.uint8).cpu().contiguous()
        data = out.reshape(-1).numpy()
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(self.row_bytes), n, [None, pa.py_buffer(data)])

    def decode(self, buffer: pa.Buffer, n: int) -> torch.Tensor:
        import torch

        if self._scale is None:
            raise StoreError("codec 'int8' has no scale/offset to decode with",
                             "the shard's schema metadata lacks codec_params; re-create the version")
        q = view_readonly(buffer, np.uint8, n * self.row_bytes).view(n, *self.shape)
        return torch.addcmul(self._offset, q.to(torch.float32), self._scale)

    # ------------------------------------------------------------ internals

    def _bshape(self) -> tuple[int, ...]:
        """Per-channel values -> a shape that broadcasts against (N, *shape)."""
        b = [1] * (1 + len(self.shape))
        if self.axis is not None:
            b[1 + self.axis] = self.channels
        return tuple(b)

    def _calibrate(self, x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            raise StoreError("codec 'int8' cannot calibrate on an empty batch", "write at least one row")
        import torch

        dims = tuple(d for d in range(x.dim()) if self.axis is None or d != 1 + self.axis)
        lo, hi = x.amin(dim=dims), x.amax(dim=dims)
        scale = (hi - lo) / 255
        if not bool(torch.isfinite(scale).all()):
            raise StoreError(f"codec 'int8': a channel spans [{lo.min().item():.4g}, {hi.max().item():.4g}], "
                             "wider than float32 can hold", "store this module with codec float32")
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant channel: code 0 is its value
        self._set_params({"axis": self.axis, "scale": scale.cpu().reshape(-1).tolist(),
                          "offset": lo.cpu().reshape(-1).tolist()})

    def _set_params(self, params: dict[str, Any]) -> None:
        import torch

        scale = torch.tensor(params.get("scale", []), dtype=torch.float32)
        offset = torch.tensor(params.get("offset", []), dtype=torch.float32)
        if params.get("axis") != self.axis or scale.numel() != self.channels or offset.numel() != self.channels:
            raise StoreError(f"codec 'int8' params (axis {params.get('axis')}, {scale.numel()} scales, "
                             f"{offset.numel()} offsets) do not fit rows of shape {list(self.shape)} "
                             f"(axis {self.axis}, {self.channels} channels)",
                             "the shard's metadata is damaged or from another writer; re-create the version")
        # JSON floats of float32 values convert back exactly, so decode uses the very numbers encode did.
        self.params = {"axis": self.axis, "scale": scale.tolist(), "offset": offset.tolist()}
        self._scale, self._offset = scale.view(self._bshape()), offset.view(self._bshape())


_CODECS: dict[str, Callable[[tuple[int, ...], dict[str, Any]], Codec]] = {
    "float16": lambda shape, params: PlainCodec("float16", shape, "float16", _check_float16),
    "bfloat16": lambda shape, params: PlainCodec("bfloat16", shape, "bfloat16"),
    "float32": lambda shape, params: PlainCodec("float32", shape, "float32"),
    "uint8": lambda shape, params: PlainCodec("uint8", shape, "uint8", _check_uint8),
    "int8": Int8Codec,
}


def register_codec(name: str, factory: Callable[[tuple[int, ...], dict[str, Any]], Codec]) -> None:
    """Make ``name`` usable in ``begin_version(codec=...)``; ``factory(shape, params)``."""
    _CODECS[name] = factory


def codec_names() -> list[str]:
    return sorted(_CODECS)


def get_codec(name: str, shape: tuple[int, ...] | list[int], params: dict[str, Any] | None = None) -> Codec:
    """The codec ``name`` for rows of ``shape`` (``params`` as recorded by a writer)."""
    try:
        factory = _CODECS[name]
    except KeyError:
        raise StoreError(f"unknown tensor codec {name!r}", f"use one of {codec_names()}") from None
    return factory(tuple(int(s) for s in shape), dict(params or {}))
