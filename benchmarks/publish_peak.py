"""Host memory of publishing one version of the `stl10-gim` m1 (rows of 49x256x16x16) over N images: the
path before issue 16 (chunks of max(256, 4 x batch) rows, float32 to the host, shards of store.rows_per_shard
rows buffered whole) against the current one (``plan.publish_chunk`` rows sized from memory, float16 on the
device, a writer thread, shards of at most 256 MiB). Each side runs in a fresh process; the number is its
peak RSS growth during the publish (``ru_maxrss``), so the process's own torch floor is left out.

``python -m benchmarks.publish_peak [--n 40,120]`` writes ``publish-peak-<machine>.json`` into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from benchmarks import python
from pipeline.feed import open_versions
from pipeline.nn.modules import build_module
from pipeline.planning import memory
from pipeline.planning.config import load_config
from pipeline.store import Store
from workers.publisher import write_rows

OUT_SHAPE = (49, 256, 16, 16)


def one(mode: str, n: int, root: str) -> dict:
    """Publish n random 64x64 images through a fresh m1 the ``mode`` way ("before" or "now")."""
    torch.set_num_threads(2)
    cfg = load_config("stl10-gim", ["resources.memory_per_module=10"])
    store = Store(root, "r")
    w = store.begin_version("input", codec="uint8", final=True, rows_per_shard=4096)
    w.write({"sample_id": np.arange(n), "split": ["train"] * n}, torch.randint(0, 255, (n, 1, 64, 64), dtype=torch.uint8))
    src = open_versions(store, [w.commit()])
    module = build_module(cfg.stack["m1"], (1, 64, 64))
    now = mode == "now"
    chunk = memory.publish_chunk(cfg, 64 * 64, int(np.prod(OUT_SHAPE))) if now else max(256, 4 * 32)
    shard = memory.publish_shard_rows(cfg, 2 * int(np.prod(OUT_SHAPE))) if now else cfg.store.rows_per_shard
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    writer = store.begin_version("m1", codec="float16", final=True, rows_per_shard=shard)
    t = time.perf_counter()
    write_rows(writer, src, module, torch.device("cpu"), None, chunk=chunk, dtype=torch.float16 if now else None)
    writer.commit()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "n": n, "chunk_rows": chunk, "shard_rows": shard, "seconds": time.perf_counter() - t,
            "growth_gib": (peak - base) / 2**20, "load_average": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.publish_peak", description=__doc__.splitlines()[0])
    p.add_argument("--n", default="40,120")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # mode n: one side, in this process
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    if args.one:
        with tempfile.TemporaryDirectory() as root:
            print(json.dumps(one(args.one[0], int(args.one[1]), root)))
        return 0
    results = []
    for n in (int(x) for x in args.n.split(",")):
        for mode in ("now", "before"):
            out = subprocess.run([python(), "-m", "benchmarks.publish_peak", "--one", mode, str(n)], check=True,
                                 capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(results[-1]))
    from benchmarks.__main__ import machine_name

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"publish-peak-{machine_name()}.json"), "w") as f:
        json.dump({"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
