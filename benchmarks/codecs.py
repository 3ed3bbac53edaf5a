"""Activation codecs per stage (issue 8): bytes per sample, write and read MB/s and reconstruction error of
each codec (with and without zstd) on ReLU conv outputs, against float32; and the nearest-centroid accuracy
of the digits preset's 2-module stack run for real (``pipeline.run.driver.run``) with every module stored in each
codec.

MB/s count the float32 activations going in (write) and coming out (read, a warm page cache), so the codecs
compare on the work they do for a trainer, not on their own smaller bytes.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import torch

from benchmarks import Row, goal_row

CODECS = [("float32", None), ("float16", None), ("bfloat16", None), ("int8", None),
          ("float16", 3), ("int8", 3)]


def relu_activations(rows: int, seed: int = 0) -> torch.Tensor:
    """(rows, 32, 16, 16) outputs of a ReLU 5x5 conv on smooth random images: half zeros, channel scales differ."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.avg_pool2d(torch.rand(rows, 1, 32, 32, generator=g), 3, 1, 1)
    conv = torch.nn.Conv2d(1, 32, 5, padding=2)
    torch.nn.init.normal_(conv.weight, std=0.3, generator=g)
    with torch.no_grad():
        return torch.relu(torch.nn.functional.max_pool2d(conv(images), 2))


def _meta(n: int, start: int) -> pa.Table:
    ids = np.arange(start, start + n, dtype=np.int64)
    return pa.table({"sample_id": ids, "split": ["train"] * n})


def measure_codecs(workdir: str, rows: int, repeats: int) -> dict:
    from pipeline.store import Store

    x = relu_activations(rows)
    logical_mb = x.numel() * 4 / 1e6
    store = Store(workdir, "codecs")
    out = {}
    for codec, level in CODECS:
        tag = codec + (f"+zstd{level}" if level else "")
        best_w = best_r = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            w = store.begin_version("bench", codec=codec, zstd_level=level, rows_per_shard=1024)
            for lo in range(0, rows, 256):
                w.write(_meta(min(256, rows - lo), lo), x[lo:lo + 256])
            m = w.commit()
            best_w = min(best_w, time.perf_counter() - t0)
            t0 = time.perf_counter()
            y = store.read("bench", m.version).tensor(dtype=torch.float32)
            best_r = min(best_r, time.perf_counter() - t0)
        stored = sum(s.bytes for s in m.shards)
        err = (y - x).abs()
        out[tag] = {"bytes_per_sample": stored / rows, "stored_mb": stored / 1e6, "write_mb_s": logical_mb / best_w,
                    "read_mb_s": logical_mb / best_r, "max_abs_error": float(err.max()),
                    "rel_rms_error": float(err.pow(2).mean().sqrt() / x.pow(2).mean().sqrt()),
                    "clipped_fraction": m.codec_stats.get("clipped_fraction")}
    return {"rows": rows, "row_shape": list(x.shape[1:]), "logical_mb": logical_mb, "repeats": repeats,
            "zero_fraction": float((x == 0).float().mean()), "codecs": out}


def accuracy_by_codec(workdir: str, quick: bool) -> dict:
    from benchmarks import quiet
    from benchmarks.schedules import NO_EXPORTS, start_ray, timed_run
    from pipeline.planning.config import load_config

    # The digits preset (2 modules): a stack well above chance, so a codec that hurt would show.
    start_ray()
    os.makedirs(workdir, exist_ok=True)
    n = 2
    base = ["train.epochs=1"] if quick else ["train.epochs=4"]
    out = {}
    for codec in (["float16", "int8"] if quick else ["float32", "float16", "bfloat16", "int8"]):
        sets = base + NO_EXPORTS + ["train.seed=0"] + [f"stack.m{i}.store.codec={codec}" for i in range(1, n + 1)]
        cfg = load_config("digits", sets, store=os.path.join(workdir, "store"))
        log = os.path.join(workdir, "runs.log")
        with quiet(log):
            res = timed_run(cfg, f"codec-{codec}", log)
        top = res["store"].final(f"m{n}")
        out[codec] = {"nearest_centroid": res["nearest_centroid"], "seconds": res["seconds"],
                      "top_bytes": sum(s.bytes for s in top.shards), "top_codec": top.codec}
    return out


def run(quick: bool, workdir: str) -> dict:
    io = measure_codecs(os.path.join(workdir, "io"), rows=512 if quick else 2048, repeats=2 if quick else 3)
    acc = accuracy_by_codec(os.path.join(workdir, "acc"), quick)
    c, rows = io["codecs"], []
    ref = c["float32"]
    shape = "x".join(str(s) for s in io["row_shape"])
    for tag, m in c.items():
        note = (f"{io['rows']} ReLU conv rows {shape} ({io['zero_fraction']:.0%} zeros); "
                f"max abs err {m['max_abs_error']:.2g}, rel RMS err {m['rel_rms_error']:.2g}")
        if m["clipped_fraction"] is not None:
            note += f", clipped {m['clipped_fraction']:.2%}"
        rows.append(Row("codecs", f"{tag}: bytes/sample (vs float32)", m["bytes_per_sample"], ref["bytes_per_sample"],
                        m["bytes_per_sample"] / ref["bytes_per_sample"], note=note))
        rows.append(Row("codecs", f"{tag}: write MB/s (vs float32)", m["write_mb_s"], ref["write_mb_s"],
                        m["write_mb_s"] / ref["write_mb_s"], note="float32 activations in, best of repeats"))
        rows.append(Row("codecs", f"{tag}: read MB/s (vs float32)", m["read_mb_s"], ref["read_mb_s"],
                        m["read_mb_s"] / ref["read_mb_s"], note="decoded to float32, warm page cache"))
    base = acc.get("float32") or acc["float16"]
    for codec, a in acc.items():
        rows.append(goal_row("codecs", f"{codec}: nearest-centroid test acc (vs {'float32' if 'float32' in acc else 'float16'})",
                             a["nearest_centroid"], base["nearest_centroid"], at_least=0.95 if codec == "int8" else None,
                             note=f"digits preset (2 modules), every module stored as {codec}, {a['seconds']:.0f} s run"))
    return {"rows": rows, "details": {"io": io, "accuracy": acc}}
