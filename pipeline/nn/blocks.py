"""The torch blocks a module's layers are built from (``pipeline.nn.modules`` maps config layers onto them).

Shapes are with the batch dim N. Inside a patched module (GIM's patch grid) a
per-patch vector is kept as ``(N, D, 1, 1)`` (``keep_map``), so every patched
shape stays 4-D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GRU", "ContiguousOut", "Flatten", "GlobalPool", "Linear", "Normalize", "PreActBlock", "PreActBottleneck",
           "PatchMean", "blur_matrix", "nhwc_in", "nhwc_out", "normalize_problem", "window_pixels"]


class GlobalPool(nn.Module):
    """(N, C, H, W) or (N, C, T) -> (N, C), or (N, C, 1, 1) inside a patched module."""

    def __init__(self, mode: str, keep_map: bool) -> None:
        super().__init__()
        self.mode, self.keep_map = mode, keep_map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(2, x.ndim))
        y = x.amax(dim=dims) if self.mode == "max" else x.mean(dim=dims)
        return y[:, :, None, None] if self.keep_map else y


class Normalize(nn.Module):
    """Contrast normalisation of each sample, no weights (a module's ``normalize``). ``kernel`` None: the sample minus its
    mean over its standard deviation, any shape. Otherwise (N, C, H, W) maps, local contrast normalisation: minus
    the Gaussian-weighted mean of the kernel x kernel window around each pixel (all channels), over the window's
    standard deviation floored at its mean over the map (so flat regions are not blown up). The window is
    separable and the map small, so each blur is two matmuls with (H, H) and (W, W) matrices that hold the
    Gaussian and the reflected border (a 1-channel conv is ~9x slower on CPU: 37 against 4.2 ms for 256 32x32 images, one thread)."""

    def __init__(self, kernel: int | float | None, size: tuple[int, int] | None = None) -> None:
        """``size``: the (H, W) the blur matrices are made for (local mode; another size gets its own per call, with
        the window of ``size`` in pixels). ``kernel``: pixels, or a fraction of ``size``'s shorter side."""
        super().__init__()
        self.kernel = None if kernel is None else window_pixels(kernel, size)
        if self.kernel is not None:
            self.register_buffer("blur_h", blur_matrix(size[0], self.kernel), persistent=False)
            self.register_buffer("blur_w", blur_matrix(size[1], self.kernel), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.ndim))
        if self.kernel is None:
            return (x - x.mean(dim=dims, keepdim=True)) / x.std(dim=dims, keepdim=True).clamp_min(1e-5)
        h, w = x.shape[-2:]
        bh = self.blur_h if self.blur_h.shape[0] == h else blur_matrix(h, self.kernel)
        bw = self.blur_w if self.blur_w.shape[0] == w else blur_matrix(w, self.kernel)
        bh, bw = bh.to(x.device, x.dtype), bw.to(x.device, x.dtype)
        local_mean = lambda t: bh @ t.mean(dim=1, keepdim=True) @ bw.T  # noqa: E731  (N, 1, H, W)
        centred = x - local_mean(x)
        sd = local_mean(centred * centred).clamp_min(0).sqrt()
        return centred / torch.maximum(sd, sd.mean(dim=(2, 3), keepdim=True)).clamp_min(1e-4)


def blur_matrix(n: int, kernel: int) -> torch.Tensor:
    """(n, n): row i holds the weights of a 1-D Gaussian window (sigma (kernel - 1) / 4) centred on i, with the
    taps that fall outside reflected back in (``F.pad(mode="reflect")``'s border)."""
    half = kernel // 2
    r = torch.arange(kernel, dtype=torch.float64) - half
    g = torch.exp(-r**2 / (2 * ((kernel - 1) / 4) ** 2))
    g = g / g.sum()
    src = torch.arange(n)[:, None] + r.long()[None]  # (n, kernel) source index of each tap
    src = torch.where(src < 0, -src, torch.where(src >= n, 2 * (n - 1) - src, src))
    m = torch.zeros(n, n, dtype=torch.float64)
    m.scatter_add_(1, src, g.expand(n, kernel).clone())
    return m.float()


def window_pixels(kernel: int | float, size: tuple[int, int] | None) -> int:
    """A local window's side in pixels: ``kernel`` itself when whole, else that fraction of ``size``'s shorter side
    rounded to the nearest odd number (at least 3): 0.72 gives 11, 23 and 35 at 16, 32 and 48 px."""
    if isinstance(kernel, int):
        return kernel
    return max(3, 2 * round((kernel * min(size) - 1) / 2) + 1)


def normalize_problem(mode: str, kernel: int | float, in_shape: tuple[int, ...]) -> str | None:
    """Why ``Normalize`` cannot take per-sample inputs of ``in_shape`` (None when it can)."""
    if mode == "local" and len(in_shape) not in (3, 4):
        return f"normalize mode local needs images or maps (C, H, W), the input is {in_shape}; use mode image"
    if mode != "local":
        return None
    pixels = window_pixels(kernel, in_shape[-2:])
    if pixels % 2 == 0 or pixels // 2 >= min(in_shape[-2:]):
        found = f"{kernel}" if pixels == kernel else f"{kernel} ({pixels} px)"
        return f"normalize.kernel must be odd and its half smaller than the {in_shape[-2]}x{in_shape[-1]} input, found {found}"
    return None


class Flatten(nn.Module):
    """(N, ...) -> (N, D), or (N, D, 1, 1) inside a patched module."""

    def __init__(self, keep_map: bool) -> None:
        super().__init__()
        self.keep_map = keep_map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.flatten(1)
        return y[:, :, None, None] if self.keep_map else y


class Linear(nn.Module):
    """Fully connected layer (+ optional ReLU) on (N, D), or on (N, D, 1, 1) inside a patched module."""

    def __init__(self, d_in: int, d_out: int, relu: bool, keep_map: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.relu, self.keep_map = relu, keep_map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.flatten(1))
        if self.relu:
            y = F.relu(y)
        return y[:, :, None, None] if self.keep_map else y


class GRU(nn.Module):
    """(N, C, T) -> (N, H, T): every step's hidden state of a (stacked) GRU run forward in time (CPC's g_ar)."""

    def __init__(self, c_in: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.gru = nn.GRU(c_in, hidden, num_layers=layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.gru(x.transpose(1, 2))  # (N, T, C) -> (N, T, H)
        return y.transpose(1, 2)


class PreActBlock(nn.Module):
    """Pre-activation basic block without batch norm (GIM's PreActBlockNoBN): relu-conv3x3-relu-conv3x3 + shortcut."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1)
        # Projection shortcut only when the shape changes (He et al. 2016, option B).
        self.shortcut = nn.Conv2d(c_in, planes, 1, stride=stride) if stride != 1 or c_in != planes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(x)
        # As in GIM / pre-act ResNet: a projection shortcut sees the activated input, an identity the raw one.
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.conv1(out), inplace=True))
        return out.add_(skip)  # in place: no third map of the block's output size (see PreActBottleneck)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck without batch norm (GIM's PreActBottleneckNoBN): 1x1 -> 3x3 (stride) -> 1x1 (4x wider)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1)
        self.conv3 = nn.Conv2d(planes, c_out, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride) if stride != 1 or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(x)
        skip = self.shortcut(out) if self.shortcut is not None else x
        # In place where autograd allows it (a conv keeps its input, not its output): a relu of a conv's output and
        # the residual sum reuse that output's memory instead of allocating a map beside it (stl10-gim m1, batch
        # 32: a 0.39 GB map per block sum; the forward's peak 0.1 GB lower).
        out = self.conv2(F.relu(self.conv1(out), inplace=True))
        out = self.conv3(F.relu(out, inplace=True))
        return out.add_(skip)


class ContiguousOut(torch.autograd.Function):
    """y in the usual (contiguous) layout; its gradient handed back channels-last, the layout the module's
    convolutions compute in."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        return y.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


def nhwc_in(x: torch.Tensor) -> torch.Tensor:
    """A module's input map channels-last, turned once (else each conv reading it turns it, forward and backward)."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def nhwc_out(y: torch.Tensor) -> torch.Tensor:
    """A module's output map in the usual layout; under autograd its gradient comes back channels-last."""
    return ContiguousOut.apply(y) if y.ndim == 4 and y.requires_grad else y.contiguous()


class PatchMean(torch.autograd.Function):
    """(B, P, C, h, w) -> (B, P, C): each patch's map averaged, as ``z.mean((3, 4))``. Its gradient is handed back
    as a broadcast view, so the module's edge (``nhwc_out``) writes the map-sized gradient once; mean's own
    backward divides the whole map and then copies it for the module's view (two passes over m1's 0.4 GB)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        ctx.shape = z.shape
        return z.mean(dim=(3, 4))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        h, w = ctx.shape[3:]
        return (grad.contiguous() / (h * w))[..., None, None].expand(ctx.shape)
