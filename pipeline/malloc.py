"""The user's C heap settings (glibc's malloc environment variables), torch-free: read by the driver, which hands
them to the module actors it starts, and by ``pipeline.feed.heap``, which leaves a tuned heap alone."""

from __future__ import annotations

import os

MALLOC_VARIABLES = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                    "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def malloc_environment() -> dict[str, str]:
    """The malloc settings in this process's environment, for the module actors a driver starts: on a cluster they
    run under the nodes' raylets, which do not inherit the driver's environment. Keeping the freed heap
    (``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824``) buys CPU steps speed with memory
    (README, Performance)."""
    return {k: os.environ[k] for k in MALLOC_VARIABLES if os.environ.get(k)}
