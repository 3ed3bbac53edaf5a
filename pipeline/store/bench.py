"""Store throughput next to the raw disk, for the same bytes (DESIGN: "store read/write vs the raw disk").

The store writes float16 activations through Parquet (sha256 + fsync + rename
per shard); the baseline writes the same bytes to one plain file and fsyncs
it. Reads of both are from a cold page cache where the kernel lets us evict
the files (posix_fadvise DONTNEED), so they measure the disk, not memory.
"""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pyarrow as pa
import torch

from pipeline.store.store import Store

_ROW_SHAPE = (64, 16, 16)  # a mid-stack conv activation: 32 KiB per row in float16


def _evict(path: str) -> None:
    """Drop ``path``'s (or a directory's files') pages from the page cache, where supported."""
    if not hasattr(os, "posix_fadvise"):
        return
    paths = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs] if os.path.isdir(path) else [path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure_io(tmpdir: str, mb: int = 256, rows_per_shard: int = 4096, repeats: int = 3) -> dict[str, float]:
    """MB/s of store write/read and of a plain file write(+fsync)/read of the same bytes (1 MB = 1e6 bytes).

    Each rate is the best of ``repeats`` (shared machines are noisy; the best
    run is the one least disturbed), after one untimed warm-up of both paths.
    """
    row_bytes = int(np.prod(_ROW_SHAPE)) * 2
    n = max(1, mb * 1_000_000 // row_bytes)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((n, *_ROW_SHAPE), generator=gen).to(torch.float16)
    meta = pa.table({"sample_id": np.arange(n, dtype=np.int64), "split": np.where(np.arange(n) % 5 == 0, "test", "train")})
    store = Store(tmpdir, f"bench-{uuid.uuid4().hex[:8]}")
    plain = os.path.join(store.root_uri, "plain.bin")
    raw = x.numpy().reshape(-1).view(np.uint8)
    best: dict[str, float] = {}

    def timed(key: str, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        seconds = time.perf_counter() - t0
        best[key] = min(best.get(key, float("inf")), seconds)
        return result

    _store_write(store, meta[:8], x[:8], rows_per_shard)  # warm-up: imports, allocator, first file in the dir
    for _ in range(max(1, repeats)):
        m = timed("store_write", _store_write, store, meta, x, rows_per_shard)
        vdir = os.path.join(store.root_uri, "store", "bench", f"v{m.version:04d}")
        _evict(vdir)
        y = timed("store_read", lambda: store.read("bench", m.version).tensor(dtype=torch.float16))
        ids = store.read("bench", m.version).meta.column("sample_id").to_numpy()  # shards keep splits apart
        if not torch.equal(x[torch.from_numpy(ids)], y):
            raise RuntimeError("store round trip changed the data")
        del y
        _evict(vdir)
        timed("store_verify", lambda: store.read("bench", m.version, verify=True))
        store.delete(f"store/bench/v{m.version:04d}")

        timed("file_write", _file_write, plain, raw)
        _evict(plain)
        timed("file_read", _file_read, plain, raw.nbytes)
        os.remove(plain)

    store.delete("")
    mbytes = n * row_bytes / 1e6
    out = {"mb": mbytes, "rows": float(n), "shards": float(len(m.shards)), "repeats": float(max(1, repeats))}
    for key in ("store_write", "store_read", "store_verify", "file_write", "file_read"):
        out[f"{key}_mb_s"] = mbytes / best[key]
    out["write_ratio"] = out["store_write_mb_s"] / out["file_write_mb_s"]
    out["read_ratio"] = out["store_read_mb_s"] / out["file_read_mb_s"]
    return out


def _store_write(store: Store, meta: pa.Table, x: torch.Tensor, rows_per_shard: int):
    w = store.begin_version("bench", codec="float16", rows_per_shard=rows_per_shard)
    w.write(meta, x)
    return w.commit()


def _file_write(path: str, raw: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(memoryview(raw))
        f.flush()
        os.fsync(f.fileno())


def _file_read(path: str, nbytes: int) -> np.ndarray:
    back = np.empty(nbytes, dtype=np.uint8)
    with open(path, "rb") as f:
        f.readinto(memoryview(back))
    return back


if __name__ == "__main__":
    import json
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(measure_io(d, int(sys.argv[1]) if len(sys.argv) > 1 else 256), indent=2))
