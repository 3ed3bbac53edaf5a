"""Tensor codecs: how one row of an activation tensor becomes one ``fixed_size_binary`` value.

A codec is built for one per-row shape and turns ``(N, *shape)`` tensors into an
Arrow ``FixedSizeBinaryArray`` of N values and back. Its name and ``params`` go
into every shard's schema metadata, so a reader rebuilds the codec from the
shard alone. A codec with learned parameters (int8 with a per-channel scale)
fixes them on its first ``encode`` and reports them through ``params``; the
writer puts them in the schema of every shard after that first encode. To add one: write a class
with the ``Codec`` members and ``register_codec`` it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Protocol

import numpy as np
import pyarrow as pa
import torch

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

    def __init__(self, name: str, shape: tuple[int, ...], torch_dtype: torch.dtype,
                 check: Callable[[torch.Tensor], None] | None = None) -> None:
        self.name = name
        self.dtype = str(torch_dtype).removeprefix("torch.")
        self.shape = tuple(int(s) for s in shape)
        self.params: dict[str, Any] = {}
        self._torch_dtype = torch_dtype
        self._check = check
        self._numel = math.prod(self.shape)
        self._itemsize = torch.empty((), dtype=torch_dtype).element_size()
        self.row_bytes = self._numel * self._itemsize

    def encode(self, tensor: torch.Tensor) -> pa.FixedSizeBinaryArray:
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
    if src.dtype in (torch.float16, torch.uint8, torch.int8, torch.bool) or src.numel() == 0:
        return  # nothing these hold overflows float16
    big = src.abs().amax()
    if torch.isinf(big):  # the source has infs of its own; look only at its finite values
        big = torch.where(torch.isfinite(src), src.abs(), 0).amax()
    if big > 65504:
        raise StoreError(f"activations up to {big.item():.4g} exceed the float16 range (65504)",
                         "set store.codec: float32, or normalise the module's output")


def _check_uint8(src: torch.Tensor) -> None:
    if src.dtype != torch.uint8:
        raise StoreError(f"codec 'uint8' stores uint8 pixels, got a {src.dtype} tensor",
                         "convert the images to uint8 (0..255) first, or use codec float16/float32")


_CODECS: dict[str, Callable[[tuple[int, ...], dict[str, Any]], Codec]] = {
    "float16": lambda shape, params: PlainCodec("float16", shape, torch.float16, _check_float16),
    "bfloat16": lambda shape, params: PlainCodec("bfloat16", shape, torch.bfloat16),
    "float32": lambda shape, params: PlainCodec("float32", shape, torch.float32),
    "uint8": lambda shape, params: PlainCodec("uint8", shape, torch.uint8, _check_uint8),
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
