"""What one sample's training step keeps in memory, from a forward on the meta device (no memory, no data)."""

from __future__ import annotations

import torch

from pipeline.nn.modules import build_module
from schemas.config import ModuleConfig


def saved_bytes(cfg: ModuleConfig, in_shape: tuple[int, ...]) -> int:
    """Bytes autograd saves for the backward of one sample's forward through the module (float32): the tensors
    its layers keep (a ReLU's output, a convolution's input), each counted once, the weights not at all.

    Measured against a stl10-gim step on CPU (batch 32): m1 saves 46 MiB a sample, and its forward grew the
    process by 1.85 GB = 32 x (46 MiB + its 12.25 MiB output)."""
    with torch.device("meta"):
        module = build_module(cfg, tuple(in_shape))
        weights = {id(p) for p in module.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in weights:
                seen[id(t)] = t.numel() * t.element_size()
            return t

        x = torch.empty(1, *in_shape, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            z = module(x)
        del z  # the tensors stay referenced by the graph until here, so no id was reused while counting
    return sum(seen.values())
