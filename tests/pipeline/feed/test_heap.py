"""The kept C heap (the single-process loop's `retain` option): freed step memory is reused, not page-faulted in again (glibc)."""

from __future__ import annotations

import multiprocessing as mp
import platform

import pytest


def _faults_of_reallocating(retain: bool, out) -> None:
    import resource

    import torch

    from pipeline.feed.heap import release_free_memory, retain_freed_memory

    applied = retain_freed_memory() if retain else False
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB: over glibc's largest mmap threshold
        del x
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    release_free_memory()  # an actor yielding its turn: the pages go back
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(64 * 2**20 // 4)
    out.put((applied, faults, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
    del x


def _run(retain: bool):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_faults_of_reallocating, args=(retain, out))
    p.start()
    got = out.get(timeout=120)
    p.join(30)
    return got


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt; a no-op elsewhere")
def test_retained_heap_reuses_freed_step_memory_and_trim_hands_it_back(monkeypatch):
    for var in ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_"):
        monkeypatch.delenv(var, raising=False)
    pages = 64 * 2**20 // 4096
    applied, kept, after_trim = _run(retain=True)
    assert applied is True
    assert all(f < pages // 10 for f in kept[-3:]), kept  # once warm, allocations reuse the freed pages
    assert after_trim > pages // 2, after_trim  # after the trim they were given back and fault in again
    _, default, _ = _run(retain=False)
    assert all(f > pages // 2 for f in default), default  # glibc's default: every allocation faults in anew
