"""The C heap of a worker process (glibc): freed memory kept for reuse (a feed's batches; a training step in
the single-process loop's ``retain`` option), and free pages handed back to the OS when an actor goes idle.
All are no-ops where libc is not glibc, and leave a user's own malloc tuning (environment) alone."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from pipeline.malloc import KEPT_HEAP, malloc_environment


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
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8
# free memory at the heap's top kept up to 1 GiB (2 GiB: a higher step peak, 5.2 vs 4.7 GB): the CPU actors' policy
_KEEP_TOP = int(KEPT_HEAP["MALLOC_TRIM_THRESHOLD_"])
_retaining = False


def _user_tuned() -> bool:
    env = malloc_environment()
    return "glibc.malloc." in env.get("GLIBC_TUNABLES", "") or any(k.startswith("MALLOC_") for k in env)


@functools.cache
def retain_freed_memory() -> bool:
    """Serve every allocation from the heap and keep what is freed there, for a module actor training on CPU.

    torch's CPU tensors come from malloc, and glibc gives each block over 32 MiB its own ``mmap``, returned to
    the kernel on free: a training step's activations were page-faulted in (and zeroed by the kernel) anew at
    every step. Measured on one stl10-gim m2 step (batch 32, 2 threads): 4.06 million minor faults and 6.2 s of
    its 16.1 s CPU in the kernel; with every block on the heap and freed memory kept, 0.2-0.4 million faults
    and 10.0 s of CPU (-38%), at a peak RSS of 4.67 GB instead of 3.60 (the heap keeps the step's high-water
    mark, with some fragmentation). Module actors that share a node's cores hand their free pages back when
    they yield (``workers.runtime.CoreTurns``), so only the stepping actor holds a step's heap. Process-wide,
    once; returns whether it was applied."""
    global _retaining
    libc = _libc()
    if _user_tuned() or libc is None or not hasattr(libc, "mallopt"):
        return False
    _retaining = bool(libc.mallopt(_M_ARENA_MAX, 1)) and bool(libc.mallopt(_M_MMAP_MAX, 0)) and \
        bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TOP))
    return _retaining


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
    libc = _libc()
    if _user_tuned() or libc is None or not hasattr(libc, "mallopt"):
        return False
    if _retaining:
        return True  # the whole heap is kept already (retain_freed_memory): do not lower its trim threshold
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20))
