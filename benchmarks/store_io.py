"""Store I/O against the raw disk: the same float16 bytes through the store (Parquet shards, sha256, fsync,
rename, manifest) and through one plain file write + fsync / read, measured back to back
(``pipeline.store.bench.measure_io``; reads from a cold page cache where posix_fadvise can evict)."""

from __future__ import annotations

from benchmarks import Row, goal_row
from pipeline.store.bench import measure_io


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
    return {"rows": rows, "details": m}
