"""Learning quality: what each preset's stack learns, against raw input, the untrained stack and one process.

    python -m benchmarks.quality                        # norb-synthetic, digits, pose, audio-gim; a markdown table
    python -m benchmarks.quality --presets digits --set train.epochs=2   # one preset, config overrides
    python -m benchmarks.quality --isostack             # also `isostack run` each preset (slow) and score its summary
    python -m benchmarks.quality --quick                # digits, 1 epoch of the reference: a smoke test (< 60 s)
    python -m benchmarks.quality --presets norb-synthetic --loop async [--schedule stale] [--codec]
                                                        # the reference trained as an async run trains (see below)

Rows per preset: ``raw`` (the input flattened, pixels in [0, 1]), ``untrained`` (the stack with its initial
weights), ``reference`` (``benchmarks.quality_reference``: the same modules, objectives, pairings, epochs and
seeds trained in one process; ``--loop sequential``, the default, is the same training as an isostack run with
``schedule.mode: sequential``, ``--loop async`` the epochs of ``schedule.mode: async`` replayed under a
``--schedule``, ``--loop simultaneous`` GIM's lock-step loop; ``--codec`` rounds every module's output to its
store codec), and with --isostack ``isostack``
(the final stage's own numbers from the run's summary.json). Every row is scored by the final stage's
functions on the top module's pooled output (``pipeline.final.evaluation.classify``: nearest centroid, linear
probe, kNN on the test split, with the config's ``evaluate.standardize``) and, where the data have a pose,
``pipeline.final.pose.pose_metrics`` plus ``ring``: the fraction of azimuth centroids (mean test embedding per
azimuth) whose two nearest other centroids are its two azimuth neighbours (1.0 = a closed ring ordered by
azimuth).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.quality_reference import (LOOPS, SCHEDULES, as_float, build_stack, embed, meta_columns,
                                          schedule_from_run, train_reference)
from pipeline.data import load_dataset
from pipeline.final.evaluation import classify, standardize
from pipeline.final.pose import pose_metrics
from pipeline.planning.config import load_config

PRESETS = ["norb-synthetic", "digits", "pose", "audio-gim"]
ROOT = Path(__file__).resolve().parents[1]


def ring_score(emb: np.ndarray, azimuth: np.ndarray) -> float:
    """Fraction of azimuth centroids whose two nearest other centroids are its circular azimuth neighbours."""
    values = np.unique(azimuth[np.isfinite(azimuth)])
    if len(values) < 4:
        return float("nan")
    centroids = np.stack([emb[azimuth == v].mean(axis=0) for v in values])  # (A, D), azimuths sorted
    d = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    n = len(values)
    hits = [set(np.argsort(d[i])[:2].tolist()) == {(i - 1) % n, (i + 1) % n} for i in range(n)]
    return float(np.mean(hits))


def score(cfg, emb: np.ndarray, cols: dict) -> dict:
    """The final stage's readings of one (N, D) embedding: classification (when >= 2 classes) and pose."""
    tr, te = cols["split"] == "train", cols["split"] == "test"
    out: dict = {}
    if len(np.unique(cols["label"][tr])) >= 2:
        xtr, xte = emb[tr], emb[te]
        if cfg.evaluate.standardize:
            xtr, xte = standardize(xtr, xte)
        c = classify(xtr, cols["label"][tr], xte, cols["label"][te], knn_k=cfg.evaluate.knn_k,
                     knn_metric=cfg.evaluate.knn_metric,
                     probe_iters=cfg.evaluate.linear_probe_epochs, seed=cfg.train.seed)
        out.update(nc=c["nearest_centroid"]["test_accuracy"], probe=c["linear_probe"]["test_accuracy"],
                   knn=c["knn"]["test_accuracy"])
    if np.isfinite(cols["azimuth"]).all():
        p = pose_metrics(emb[tr], cols["azimuth"][tr], cols["elevation"][tr], emb[te], cols["azimuth"][te],
                         cols["elevation"][te], cols["instance"][te], k=cfg.evaluate.knn_k, label_test=cols["label"][te],
                         metric=cfg.evaluate.knn_metric)
        out.update(az_mae=p["azimuth_mae_deg"], ridge_r2=p["ridge_r2"], ring=ring_score(emb[te], cols["azimuth"][te]))
    return out


def isostack_row(preset: str, overrides: list[str]) -> dict:
    """`isostack run` of the preset in a fresh store; the final stage's numbers from summary.json."""
    with tempfile.TemporaryDirectory(prefix="isostack-quality-") as store:
        cmd = [sys.executable, "-m", "pipeline", "run", preset, "--store", store, "--run-id", "q",
               *[a for o in overrides for a in ("--set", o)]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        summary = json.loads((Path(store) / "q" / "summary.json").read_text())
    row: dict = {"seconds": time.perf_counter() - t0}
    ev = summary.get("evaluation", {})
    if "nearest_centroid" in ev:
        row.update(nc=ev["nearest_centroid"]["test_accuracy"], probe=ev["linear_probe"]["test_accuracy"],
                   knn=ev["knn"]["test_accuracy"])
    if "pose" in summary:
        row.update(az_mae=summary["pose"]["azimuth_mae_deg"], ridge_r2=summary["pose"]["ridge_r2"])
    return row


def evaluate_preset(preset: str, overrides: list[str], *, isostack: bool = False, epochs: int | None = None,
                    max_steps: int | None = None, rows=("raw", "untrained", "reference"),
                    per_module: bool = False, loop: str = "sequential", schedule="pipelined",
                    codec: bool = False) -> dict[str, dict]:
    """{row name: scores} for one preset (see the module docstring for the rows); ``loop``, ``schedule`` and
    ``codec`` as ``quality_reference.train_reference``'s (``codec`` also rounds what is scored)."""
    cfg = load_config(preset, overrides)
    torch.set_num_threads(1)
    ds = load_dataset(cfg.dataset)
    x, cols = as_float(ds), meta_columns(ds)
    out: dict[str, dict] = {}
    if "raw" in rows:
        out["raw"] = score(cfg, x.reshape(len(x), -1).numpy(), cols)
    if "untrained" in rows:
        out["untrained"] = score(cfg, embed(build_stack(cfg)[1], x)[-1], cols)
    if "reference" in rows:
        t0 = time.perf_counter()
        modules = train_reference(cfg, ds, epochs=epochs, max_steps=max_steps, loop=loop, schedule=schedule,
                                  codec=codec)
        seconds = time.perf_counter() - t0
        feats = embed(modules, x, cfg=cfg if codec else None)
        out["reference"] = {**score(cfg, feats[-1], cols), "seconds": seconds}
        if per_module:
            for name, f in list(zip(cfg.stack, feats))[:-1]:
                out[f"reference {name}"] = score(cfg, f, cols)
    if isostack:
        out["isostack"] = isostack_row(preset, overrides)
    return out


COLUMNS = [("nc", "nearest centroid %", 100), ("probe", "linear probe %", 100), ("knn", "kNN %", 100),
           ("az_mae", "azimuth MAE °", 1), ("ridge_r2", "pose ridge R²", 1), ("ring", "ring", 1),
           ("seconds", "train s", 1)]


def table(results: dict[str, dict[str, dict]]) -> str:
    lines = ["| preset | row | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|---|" + "---:|" * len(COLUMNS)]
    for preset, rows in results.items():
        for name, s in rows.items():
            cells = [f"{s[k] * f:.1f}" if k in s and k != "ring" and k != "ridge_r2" else
                     (f"{s[k]:.2f}" if k in s else "-") for k, _, f in COLUMNS]
            lines.append(f"| {preset} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0])
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated preset names")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every preset (as `isostack run --set`)")
    p.add_argument("--isostack", action="store_true", help="also run each preset with `isostack run` (slow)")
    p.add_argument("--epochs", type=int, default=None, help="reference epochs (default: the config's train.epochs)")
    p.add_argument("--loop", choices=LOOPS, default="sequential",
                   help="reference loop: sequential (greedy, as `schedule.mode: sequential`), async (the epochs of "
                   "`schedule.mode: async` replayed) or simultaneous (GIM's)")
    p.add_argument("--schedule", default="pipelined", metavar="|".join(SCHEDULES) + "|RUN_DIR",
                   help="--loop async: which upstream version each early epoch reads (see quality_reference); a "
                   "finished run's folder (<store>/<run_id>) replays that run's own")
    p.add_argument("--codec", action="store_true", help="round every module's output to its store codec (float16)")
    p.add_argument("--quick", action="store_true", help="digits only, 1 reference epoch: the smoke test")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    presets = ["digits"] if args.quick else [s for s in args.presets.split(",") if s]
    epochs = 1 if args.quick else args.epochs
    results = {}
    for preset in presets:
        results[preset] = evaluate_preset(preset, args.overrides, isostack=args.isostack, epochs=epochs,
                                           loop=args.loop, codec=args.codec,
                                           schedule=args.schedule if args.schedule in SCHEDULES else
                                           schedule_from_run(args.schedule))
        print(f"{preset}: " + json.dumps({k: {m: round(v, 4) for m, v in s.items()} for k, s in results[preset].items()}),
              file=sys.stderr, flush=True)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
