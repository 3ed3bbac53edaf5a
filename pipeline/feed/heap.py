"""The C heap of a worker process (glibc): keep freed batch memory for reuse while streaming, and hand free
pages back to the OS when an actor goes idle. Both are no-ops where libc is not glibc."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name and "libc" in name else None
    except OSError:
        return None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc keeps freed small blocks of a finished step's
    activations in its arenas, counted in the process's RSS until reused: ~0.4 GB after a stl10-gim m3 step)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_batches() -> bool:
    """Let glibc reuse freed batch memory instead of returning it to the kernel after every batch.

    A feed allocates each batch (``x`` and ``x_pos``, float16 gathered then float32: megabytes) on its
    thread and the trainer frees it on another. With glibc's defaults the arena's top is trimmed back to
    the kernel (or the block was an mmap of its own) at every free, so the next batch page-faults its
    memory in again and the kernel zeroes it: on the out-of-core benchmark that was ~300 faults a
    sample, about half the trainer process's CPU time in the kernel. Blocks under 32 MiB now come from
    the heap, and up to 64 MiB free at its top is kept for the next batch (peak RSS measured on the
    benchmark did not move). Process-wide, once; left alone when the user tunes malloc through the
    environment or libc is not glibc. Returns whether it was applied.
    """
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
            k in os.environ for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")):
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20))
