"""Where a worker runs: its node, its device in words, its peak memory (for status and summary.json)."""

from __future__ import annotations

import resource
import socket

import torch


def device_text(device: torch.device) -> str:
    if device.type != "cuda":
        return str(device)
    # Ray narrows CUDA_VISIBLE_DEVICES to the GPU(s) it assigned: cuda:0 here is the node's GPU <ray id>.
    import ray

    ids = ",".join(str(i) for i in ray.get_gpu_ids()) if ray.is_initialized() else "-"
    return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()}, Ray GPU {ids})"


def peak_memory(device: torch.device) -> int:
    """Peak bytes: the GPU's allocations on CUDA, else this process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def node_name() -> str:
    try:
        import ray

        if ray.is_initialized():
            return f"{socket.gethostname()}:{ray.get_runtime_context().get_node_id()[:8]}"
    except Exception:  # noqa: BLE001 - outside Ray the host name is enough
        pass
    return socket.gethostname()
