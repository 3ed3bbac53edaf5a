"""Out of core: a module trains on an upstream version many times its own peak memory, and its memory stays flat.

    python -m benchmarks.out_of_core --gb 0.05            # toy size (seconds)
    python -m benchmarks.out_of_core --gb 10 --scales 1,2,4   # the README row: m1's version >= 10 GB at 1x

A 2-module stack: m1 is cheap and wide (its version is written directly as float16 activations of shape
(64, 32, 32), 128 KB a sample, in bounded chunks: "a cheap, wide m1"), m2 (conv 64->16 3x3 stride 2 +
max-pool, infonce_pair on same-instance pairs) trains one epoch on it in a fresh process through the real
``ModuleTrainer.run`` (streaming feed, then its final version published) and reports its peak RSS.
Table: samples, m1's version on disk, m2's peak RSS, m2's wall time, at 1x / 2x / 4x the samples.
Goals (issue 15): version >= 4x m2's peak RSS; peak RSS at 2x and 4x within 10% of 1x; and, at 1x,
store-fed streamed training samples/s >= 0.9 of the same steps fed from the version held in memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from pipeline.feed import PairedBatches, StreamingBatches, load_upstream, open_source, plan_epoch
from pipeline.nn.modules import build_module
from pipeline.nn.objectives import build_objective, local_loss
from pipeline.planning.config import load_config
from pipeline.planning.plan import build_plan
from pipeline.store import Store

M1_SHAPE = (64, 32, 32)  # float16: 128 KiB a sample
BATCH = 32


def config(samples: int, buffer: int | None, readahead: int | None = None) -> dict:
    cfg = load_config(None, [
        "dataset.image_size=32", "train.epochs=1", "train.batch_size=32", "schedule.settle_epochs=0",
        "schedule.poll_seconds=0.05", "stack.m1.layers.0.channels=64", "stack.m1.layers=[{type: conv, channels: 64, "
        "kernel: 3, padding: same}]", "stack.m2.layers=[{type: conv, channels: 16, kernel: 3, stride: 2}, "
        "{type: maxpool, kernel: 2}]", "store.rows_per_shard=512", "resources.memory_per_module=64",
        "resources.cpus_per_module=1",  # one thread, as every number in out_of_core.md was measured
        "evaluate.baselines=false", *([f"feed.buffer_samples={buffer}"] if buffer else []),
        *([f"feed.readahead={readahead}"] if readahead is not None else [])], None)
    cfg = cfg.model_copy(update={"stack": {k: cfg.stack[k] for k in ("m1", "m2")}})
    return cfg.model_dump(mode="json")


def write_m1(store: Store, samples: int, chunk: int = 256, split_row_groups: bool = True) -> int:
    """m1's final version: NORB-like metadata (5 classes x 10 instances x 18 azimuths), random activations.

    One chunk of random rows is drawn and written rotated at every offset: drawing 10 GB of normals on
    a shared 2-core machine takes longer than the training measured, and m2's cost does not depend on
    the values (the tensor column is stored uncompressed, so the bytes on disk are the same).
    """
    writer = store.begin_version("m1", codec="float16", final=True, rows_per_shard=512, split_row_groups=split_row_groups,
                                 producer={"module": "m1", "epoch": 1, "generation": 0})
    pool = torch.randn((chunk, *M1_SHAPE), generator=torch.Generator().manual_seed(0)).half()
    for lo in range(0, samples, chunk):
        i = np.arange(lo, min(samples, lo + chunk))
        meta = {"sample_id": i, "split": np.where(i % 5 == 4, "test", "train"), "label": (i // 180) % 5,
                "instance": (i // 18) % 10 + 10 * ((i // 900) % 2), "azimuth": (i % 18) * 20.0,
                "elevation": np.full(len(i), 30.0), "lighting": (i // 1800) % 6}
        writer.write(meta, torch.roll(pool, shifts=(lo // chunk) % chunk, dims=0)[:len(i)])
    manifest = writer.commit()
    return sum(s.bytes for s in manifest.shards)


def train_m2(workdir: str, samples: int, buffer: int | None, readahead: int | None = None) -> dict:
    """m2's ``run()`` in a fresh process (its own peak RSS): wall seconds, peak RSS, samples/s."""
    code = (
        "import json, sys, time, torch; torch.set_num_threads(1)\n"
        "from workers.trainer import ModuleTrainer\n"
        "cfg = json.loads(sys.argv[3]); t0 = time.perf_counter()\n"
        "t = ModuleTrainer(sys.argv[1], sys.argv[2], 'm2', cfg); t.run()\n"
        "s = t.status(); held = [r['value'] for r in t.metrics.rows if r['name'] == 'm2/feed/rows_held']\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and exec, so the child would report the
        # benchmark's own peak (the version it held in memory for the throughput comparison) as its own.
        "hwm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print(json.dumps({'seconds': time.perf_counter() - t0, 'rss': hwm, "
        "'samples_per_second': s['samples_per_second'], 'rows_held': max(held or [0]), 'state': s['state']}))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code, workdir, f"ooc{samples}", json.dumps(config(samples, buffer, readahead))],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"m2 failed at {samples} samples:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def throughput(store: Store, cfg: dict, steps: int, rounds: int = 3) -> dict:
    """samples/s of the same m2 steps fed streamed from the store and from the version held in memory.

    The sides alternate ``rounds`` times in this process (a shared machine's load moves between runs;
    each side's best counts, and every run is kept with its load average). Besides wall-clock samples/s
    each run records samples per CPU second of the whole process (every thread: training, feed, reads),
    which the other sessions' load distorts far less, and the wait for the first batch. The streamed clock
    includes opening the source and reading the first window; the in-memory one starts with the version
    already decoded.
    """
    torch.set_num_threads(1)
    rc = load_config(None, [], None).model_validate(cfg)
    plan = build_plan(rc, check_paths=False, local_cluster=False)
    mp = plan.module("m2")
    version = store.final("m1").version
    runs = []
    for side in ("memory", "streamed") * rounds:
        torch.manual_seed(0)
        module = build_module(rc.stack["m2"], tuple(mp.in_shape))
        objective = build_objective(rc.stack["m2"].objective, tuple(mp.out_shape), plan.num_classes,
                                    in_shape=tuple(mp.in_shape), module=module)
        opt = torch.optim.Adam(list(module.parameters()) + list(objective.parameters()), lr=1e-3)
        rng = np.random.default_rng([0, 1])
        if side == "memory":
            up = load_upstream(store, "m1", version)  # decoded before the clock: the version is in memory
        t0, cpu0 = time.perf_counter(), time.process_time()
        if side == "memory":
            batches = PairedBatches(up, batch_size=BATCH, pairing="same_instance", rng=rng, device=torch.device("cpu"),
                                    max_steps=steps)
        else:
            src = open_source(store, "m1", version, cfg, torch.device("cpu"))
            ep = plan_epoch(src.pairing_meta(), src.train_rows(), src.unit, pairing="same_instance", batch_size=BATCH,
                            buffer=mp.buffer_samples, rng=rng, max_steps=steps)
            batches = StreamingBatches(src, ep, device=torch.device("cpu"), pairing="same_instance",
                                       readahead=rc.feed.readahead)
        n, first = 0, None
        for b in batches:
            first = time.perf_counter() - t0 if first is None else first
            loss, _ = local_loss(objective, module, b.x, b.x_pos, b.labels, b.groups)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(b.x)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        runs.append({"side": side, "samples_per_second": n / wall, "samples_per_cpu_second": n / cpu,
                     "first_batch_seconds": first, "load_average": os.getloadavg()[0]})
        if side == "streamed":
            fetch_rate = ep.fetch_rate
        del batches
        up = None
    best = {side: max(r["samples_per_second"] for r in runs if r["side"] == side) for side in ("memory", "streamed")}
    per_cpu = {side: max(r["samples_per_cpu_second"] for r in runs if r["side"] == side) for side in ("memory", "streamed")}
    return {**best, "fetch_rate": fetch_rate, "cpu_ratio": per_cpu["streamed"] / per_cpu["memory"], "runs": runs,
            "pair_ratios": [s["samples_per_second"] / m["samples_per_second"] for m, s in zip(runs[::2], runs[1::2])]}


def run(gb: float, scales: list[int], workdir: str, buffer: int | None = None, compare: bool = True,
        readahead: int | None = None, split_row_groups: bool = True) -> dict:
    per_sample = math.prod(M1_SHAPE) * 2
    base = max(4 * BATCH, int(gb * 1e9 / per_sample))
    rows, tp = [], {}
    for s in scales:
        n = base * s
        store = Store(workdir, f"ooc{n}")
        t0 = time.perf_counter()
        disk = write_m1(store, n, split_row_groups=split_row_groups)
        write_s = time.perf_counter() - t0
        m2 = train_m2(workdir, n, buffer, readahead)
        rows.append({"scale": s, "samples": n, "version_bytes": disk, "write_seconds": write_s, **m2})
        if s == scales[0] and compare:
            tp = throughput(store, config(n, buffer, readahead), steps=max(4, (n * 4 // 5) // BATCH))
        store.delete("store")  # the next scale's version is written fresh; free the disk
    first = rows[0]["rss"]
    return {"rows": rows, "throughput": tp, "split_row_groups": split_row_groups, "load_average": os.getloadavg(),
            "goals": {"version_over_rss_at_1x": rows[0]["version_bytes"] / first,
                      "rss_spread_vs_1x": max(abs(r["rss"] - first) / first for r in rows),
                      "streamed_over_memory_at_1x": tp["streamed"] / tp["memory"] if tp else None}}


def table(result: dict) -> str:
    lines = [f"{'scale':>5} {'samples':>9} {'m1 version GB':>14} {'m2 peak RSS GB':>15} {'version/RSS':>12} "
             f"{'m2 seconds':>11} {'m2 samples/s':>13} {'rows held':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['scale']:>4}x {r['samples']:>9,} {r['version_bytes'] / 1e9:>14.3f} {r['rss'] / 1e9:>15.3f} "
                     f"{r['version_bytes'] / r['rss']:>12.2f} {r['seconds']:>11.1f} {r['samples_per_second'] or 0:>13.1f} "
                     f"{int(r['rows_held']):>10,}")
    g, tp = result["goals"], result["throughput"]
    lines += [f"peak RSS spread vs 1x: {g['rss_spread_vs_1x']:.1%} (goal <= 10%)",
              f"version / peak RSS at 1x: {g['version_over_rss_at_1x']:.2f} (goal >= 4)"]
    if tp:
        lines += [f"streamed vs in-memory samples/s at 1x: {tp['streamed']:.1f} / {tp['memory']:.1f} = "
                  f"{g['streamed_over_memory_at_1x']:.2f} (goal >= 0.9; partner fetch rate {tp['fetch_rate']:.1%})",
                  f"  per pair of runs: {', '.join(f'{r:.2f}' for r in tp['pair_ratios'])}; samples per CPU second, "
                  f"streamed / in-memory: {tp['cpu_ratio']:.2f}"]
        lines += [f"  {r['side']:>8}: {r['samples_per_second']:8.1f} samples/s, {r['samples_per_cpu_second']:7.1f} per CPU s, "
                  f"first batch {r['first_batch_seconds']:.2f} s, load {r['load_average']:.1f}" for r in tp["runs"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=0.05, help="m1's version size at 1x, in GB (the README row: >= 10)")
    ap.add_argument("--scales", default="1,2,4", help="sample multiples to run (comma separated)")
    ap.add_argument("--buffer", type=int, default=None, help="feed.buffer_samples (default: automatic)")
    ap.add_argument("--readahead", type=int, default=None, help="feed.readahead (default: the config default)")
    ap.add_argument("--workdir", default=None, help="where the store goes (default: a temporary directory)")
    ap.add_argument("--no-compare", action="store_true", help="skip the streamed vs in-memory throughput comparison")
    ap.add_argument("--mixed-row-groups", action="store_true",
                    help="write m1 in the old layout, train and test rows mixed in row groups in the order written "
                         "(the store's default keeps each split in row groups of its own, so a streamed train "
                         "epoch reads no test row)")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    scales = [int(s) for s in args.scales.split(",")]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        result = run(args.gb, scales, tmp, args.buffer, compare=not args.no_compare, readahead=args.readahead,
                     split_row_groups=not args.mixed_row_groups)
    print(table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
