"""The C heap settings of a module actor (glibc's malloc environment variables), torch-free: the user's own, read
by the driver, which hands them to the module actors it starts, and by ``pipeline.feed.heap``, which leaves a tuned
heap alone; where the user has none, a CPU actor's policy (``actor_environment``)."""

from __future__ import annotations

import os

MALLOC_VARIABLES = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                    "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

# One arena, no block of its own ``mmap``, up to 1 GiB freed at the heap's top kept: a step's activations reuse the
# last step's pages instead of being faulted in and zeroed by the kernel anew (benchmarks/results/heap-policy-dec03.md).
KEPT_HEAP = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def malloc_environment() -> dict[str, str]:
    """The malloc settings in this process's environment, for the module actors a driver starts: on a cluster they
    run under the nodes' raylets, which do not inherit the driver's environment. Set, they replace the CPU actors'
    kept heap (``actor_environment``)."""
    return {k: os.environ[k] for k in MALLOC_VARIABLES if os.environ.get(k)}


def actor_environment(on_cpu: bool) -> dict[str, str]:
    """A module actor's malloc settings: the user's where they set any; else, training on CPU, the kept heap.

    Measured on the stl10-gim modules in one process (batch 32, 2 threads, micro-batches of 8 as the planner picks
    on CPU): m1 5.3 s a step at a 3.0 GB peak RSS against glibc's defaults' 6.5 s and 3.5 GB for the whole batch (9.2 s
    micro-batched); m2 7.5 s, 3.5 GB against 8.1 s, 3.9 GB. Between its turns an actor hands the kept pages back
    (``workers.runtime.CoreTurns``). On a GPU the step's memory is the device's: the host heap is left as it is."""
    user = malloc_environment()
    return user if user or not on_cpu else dict(KEPT_HEAP)
