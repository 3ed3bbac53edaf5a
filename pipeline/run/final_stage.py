"""The final stage as the driver runs it: `run`'s last step, `evaluate`, `export`, `embed`, `load_encoder`."""

from __future__ import annotations

import os

import numpy as np

from pipeline.errors import RunError
from pipeline.store.runs import open_run, run_config, warn_stale
from pipeline.store import Store
from pipeline.final import exports
from pipeline.final.encoder import load_encoder, read_images, read_signals
from schemas.config import RunConfig
from workers.evaluator import Evaluator


def final_stage(store: Store, info: dict, cfg: RunConfig, *, evaluate: bool = True, export: bool = True) -> dict:
    """Evaluate and export; merge the results into summary.json; print the headline."""
    names = list(cfg.stack)
    missing = [n for n in names if store.final(n) is None]
    if missing:
        raise RunError(f"module(s) {', '.join(missing)} of run {info['run_id']} have no final version",
                       f"finish training first: `isostack resume {info['run_id']}`")
    warn_stale(store, names, "the final stage")
    worker = Evaluator(store.uri, store.run_id, info["config"])
    try:
        results = worker.run(evaluate=evaluate, export=export)
    finally:
        worker.shutdown()
    summary = store.read_json("summary.json") or {}
    summary.update(results)
    store.write_json("summary.json", summary)
    _print_headline(summary, store, exported=export)
    return summary


def _print_headline(summary: dict, store: Store, *, exported: bool = True) -> None:
    ev = summary.get("evaluation")
    if ev and "skipped" in ev:
        print(f"classification skipped: {ev['skipped']}")
    elif ev:
        nc = ev["nearest_centroid"]["test_accuracy"]
        line = f"nearest centroid (test): {nc:.1%}"
        base = ev.get("baselines", {}).get("raw_pixels")
        if base:
            raw = base["nearest_centroid"]["test_accuracy"]
            line += f"  vs raw pixels {raw:.1%} ({(nc - raw) * 100:+.1f} points)"
        line += f"; linear probe {ev['linear_probe']['test_accuracy']:.1%}, kNN {ev['knn']['test_accuracy']:.1%}"
        if "gmm" in ev:
            line += f", k-means {ev['kmeans']['test_accuracy']:.1%}, GMM {ev['gmm']['test_accuracy']:.1%}"
        print(line)
    pose = summary.get("pose")
    if pose:
        fmt = lambda key, spec: "undefined" if pose.get(key) is None else format(pose[key], spec)  # noqa: E731
        print(f"pose (held out): azimuth error {fmt('azimuth_mae_deg', '.1f')} deg, elevation error "
              f"{fmt('elevation_mae_deg', '.1f')} deg, trustworthiness {fmt('trustworthiness', '.3f')}")
        for key, why in pose.get("undefined", {}).items():
            print(f"  {key} undefined: {why}")
    report = summary.get("exports", {}).get("report")
    if report and exported:
        print(f"report: {report}")
    elif report:  # evaluate alone: the report on disk still shows the numbers it was written with
        print(f"report not re-written (it shows the last export's numbers): `isostack export {store.run_id}`")


def evaluate_run(run: str, store_uri: str | None = None) -> int:
    store, info = open_run(run, store_uri)
    final_stage(store, info, run_config(info), evaluate=True, export=False)
    return 0


def export_run(run: str, store_uri: str | None = None) -> int:
    store, info = open_run(run, store_uri)
    final_stage(store, info, run_config(info), evaluate=True, export=True)
    return 0


def embed_command(run: str, input_path: str, *, out: str | None = None, store_uri: str | None = None) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    encoder = load_encoder(run, store_uri)
    shape = encoder.input_shape
    images = read_signals(input_path, shape, encoder.sample_rate) if len(shape) == 2 else read_images(input_path, shape)
    emb = encoder.embed(images).numpy()  # checks the shape and preprocesses as the run's loader did
    table = exports.embeddings_table({"index": pa.array(np.arange(len(emb)))}, emb,
                                     {"run_id": run, "stage": encoder.names[-1], "input": input_path})
    out = out or f"{os.path.splitext(input_path.rstrip('/'))[0]}.embeddings.parquet"
    pq.write_table(table, out)
    print(f"wrote {len(emb)} embeddings of width {emb.shape[1]} to {out}")
    return 0
