"""Store I/O against the raw disk: the same float16 bytes through the store (Parquet shards, sha256, fsync,
rename, manifest) and through one plain file write + fsync / read, measured back to back
(``pipeline.store.bench.measure_io``; reads from a cold page cache where posix_fadvise can evict)."""

from __future__ import annotations

import glob
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks import Row, goal_row
from pipeline.store.bench import measure_io
from pipeline.store.store import Store


def run(quick: bool, workdir: str) -> dict:
    m = measure_io(workdir, mb=48 if quick else 256, repeats=2 if quick else 3)
    note = f"{m['mb']:.0f} MB float16, {m['shards']:.0f} shards, best of {m['repeats']:.0f}"
    rows = [
        goal_row("store I/O", "write MB/s (store vs write+fsync)", m["store_write_mb_s"], m["file_write_mb_s"],
                 at_least=0.5, note=note),
        goal_row("store I/O", "read MB/s (store vs plain read)", m["store_read_mb_s"], m["file_read_mb_s"],
                 at_least=0.5, note="cold cache; decoded to one float16 tensor"),
        Row("store I/O", "read + sha256 verify MB/s", m["store_verify_mb_s"], m["file_read_mb_s"],
            m["store_verify_mb_s"] / m["file_read_mb_s"], note="`isostack verify` path, context only"),
    ]
    c = checksum_cost(workdir, mb=32 if quick else 128)
    m.update(c)
    rows.append(Row("store I/O", "read MB/s with page CRC32 check (vs without)", c["crc_read_mb_s"],
                    c["nocrc_read_mb_s"], c["crc_read_mb_s"] / c["nocrc_read_mb_s"],
                    note=f"{c['crc_mb']:.0f} MB warm cache, best of 5: the check every normal read now does"))
    return {"rows": rows, "details": m}


def checksum_cost(workdir: str, mb: int = 128) -> dict[str, float]:
    """Warm-cache MB/s of reading one version's shards with and without Parquet page checksum verification."""
    n = mb * 1_000_000 // (64 * 16 * 16 * 2)
    x = torch.randn((n, 64, 16, 16), generator=torch.Generator().manual_seed(0)).to(torch.float16)
    store = Store(workdir, "crc-bench")
    w = store.begin_version("bench", codec="float16", rows_per_shard=1024)
    w.write(pa.table({"sample_id": np.arange(n, dtype=np.int64), "split": ["train"] * n}), x)
    m = w.commit()
    paths = sorted(glob.glob(os.path.join(store.root_uri, "store", "bench", f"v{m.version:04d}", "*.parquet")))
    best = {}
    for _ in range(5):
        for check in (True, False):
            t0 = time.perf_counter()
            for p in paths:
                pq.read_table(p, memory_map=False, page_checksum_verification=check)
            best[check] = min(best.get(check, float("inf")), time.perf_counter() - t0)
    store.delete("")
    mbytes = x.numel() * 2 / 1e6
    return {"crc_mb": mbytes, "crc_read_mb_s": mbytes / best[True], "nocrc_read_mb_s": mbytes / best[False]}
