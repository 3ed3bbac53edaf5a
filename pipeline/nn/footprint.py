"""What one sample's training step keeps in memory: one sample's forward, on CPU (or the meta device for a
module too large to build there), with hooks that count what autograd saves."""

from __future__ import annotations

import json

import torch

from pipeline.nn.modules import build_module, infer_shape
from schemas.config import ModuleConfig


_KNOWN: dict[tuple[str, tuple[int, ...]], int] = {}  # (module config, input shape) -> saved bytes, this process


def _key(module_json: dict, in_shape) -> tuple[str, tuple[int, ...]]:
    return json.dumps(module_json, sort_keys=True), tuple(int(s) for s in in_shape)


def remember_planned(run_info: dict | None) -> None:
    """Take the footprints the run's plan measured (``run.json``: ``plan.modules[].saved_bytes``, each under its
    module's config there): a module actor then plans without a meta-device forward of its own, whose first call
    in a process imports about 2 s of torch's internals (``torch._dynamo``, sympy). A module whose config or
    input shape has changed since (a retrain's ``--set``) is not matched, and measured again."""
    stack = ((run_info or {}).get("config") or {}).get("stack") or {}
    for m in ((run_info or {}).get("plan") or {}).get("modules") or []:
        if m.get("saved_bytes") and m.get("name") in stack:
            _KNOWN[_key(stack[m["name"]], m["in_shape"])] = int(m["saved_bytes"])


def saved_bytes(cfg: ModuleConfig, in_shape: tuple[int, ...]) -> int:
    """Bytes autograd saves for the backward of one sample's forward through the module (float32): the tensors
    its layers keep (a ReLU's output, a convolution's input), each counted once, the weights not at all.

    Measured against a stl10-gim step on CPU (batch 32): m1 saves 46 MiB a sample, and its forward grew the
    process by 1.85 GB = 32 x (46 MiB + its 12.25 MiB output)."""
    key = _key(cfg.model_dump(mode="json"), in_shape)
    if key not in _KNOWN:
        _KNOWN[key] = _measure(cfg, tuple(in_shape))
    return _KNOWN[key]


# Up to this many parameters (0.25 GiB of float32 weights) a module is built and run on CPU for the count:
# milliseconds for the presets' modules, ~1 s for stl10-gim's largest. The meta device needs no memory at
# all, but its first forward in a process imports ~2 s of torch's internals (torch._dynamo, sympy), which
# every run's planning paid. The counts agree but for the GRU, whose CPU kernel saves half of what the
# meta device's decomposition does (1.3 against 2.6 MB a sample for audio-gim's).
CPU_COUNT_MAX_PARAMS = 64 * 2**20


def _measure(cfg: ModuleConfig, in_shape: tuple[int, ...]) -> int:
    _, n_params = infer_shape(cfg, in_shape)
    device = torch.device("cpu" if n_params <= CPU_COUNT_MAX_PARAMS else "meta")
    with torch.random.fork_rng(devices=[]), device:  # the weights' initialisation leaves the caller's rng alone
        module = build_module(cfg, in_shape)
        weights = {id(p) for p in module.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in weights:
                seen[id(t)] = t.numel() * t.element_size()
            return t

        x = torch.zeros(1, *in_shape, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            z = module(x)
        del z  # the tensors stay referenced by the graph until here, so no id was reused while counting
    return sum(seen.values())
