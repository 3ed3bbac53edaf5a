"""The final stage as the driver runs it: `run`'s last step, `evaluate`, `export`, `embed`, `load_encoder`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.errors import DataError, RunError
from pipeline.runs import open_run, run_config
from pipeline.store import Store
from schemas.config import RunConfig


def final_stage(store: Store, info: dict, cfg: RunConfig, *, evaluate: bool = True, export: bool = True) -> dict:
    """Evaluate and export; merge the results into summary.json; print the headline."""
    from workers.evaluator import Evaluator

    names = list(cfg.stack)
    missing = [n for n in names if store.final(n) is None]
    if missing:
        raise RunError(f"module(s) {', '.join(missing)} of run {info['run_id']} have no final version",
                       f"finish training first: `isostack resume {info['run_id']}`")
    worker = Evaluator(store.uri, store.run_id, info["config"])
    try:
        results = worker.run(evaluate=evaluate, export=export)
    finally:
        worker.shutdown()
    summary = store.read_json("summary.json") or {}
    summary.update(results)
    store.write_json("summary.json", summary)
    _print_headline(summary, store)
    return summary


def _print_headline(summary: dict, store: Store) -> None:
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
        print(f"pose (held out): azimuth error {pose['azimuth_mae_deg']:.1f} deg, elevation error "
              f"{pose['elevation_mae_deg']:.1f} deg, trustworthiness {pose['trustworthiness']:.3f}")
    report = summary.get("exports", {}).get("report")
    if report:
        print(f"report: {report}")


def evaluate_run(run: str, store_uri: str | None = None) -> int:
    store, info = open_run(run, store_uri)
    final_stage(store, info, run_config(info), evaluate=True, export=False)
    return 0


def export_run(run: str, store_uri: str | None = None) -> int:
    store, info = open_run(run, store_uri)
    final_stage(store, info, run_config(info), evaluate=True, export=True)
    return 0


def load_encoder(run: str, store_uri: str | None = None):
    """The composed encoder of a run as an ``nn.Module`` (eval mode); ``.embed(x)`` gives (B, D)."""
    from pipeline.encoder import compose_from_store, load_model

    store, info = open_run(run, store_uri)
    cfg = run_config(info)
    exported = store.read_json("model/config.json")
    current = {n: (store.final(n).version if store.final(n) else None) for n in cfg.stack}
    if exported is not None and exported.get("final_versions") == current:
        return load_model(store)
    # No export yet, or a module was retrained since: build from the current final checkpoints.
    return compose_from_store(store, cfg)[0]


def read_signals(path: str, shape: tuple[int, int], sample_rate: int) -> np.ndarray:
    """A .npy of signals (N, T) / (N, C, T) or a folder of .wav files -> float32 (N, C, T) of the encoder's input shape."""
    from pipeline.data.audio import read_wav

    c, t = shape
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("*.wav"))
        if not files:
            raise DataError(f"no .wav files under {path}", "point embed at a folder of .wav files or a .npy of signals")
        return np.stack([read_wav(f, sample_rate, t) for f in files])[:, None]  # mono, resampled, cropped or padded
    if p.suffix != ".npy" or not p.is_file():
        raise DataError(f"embed input {path!r} is neither a .npy file nor a folder",
                        "pass signals as .npy (N, T) or (N, C, T), or a folder of .wav files")
    arr = np.load(p)
    if arr.ndim == 2:
        arr = arr[:, None]
    if arr.ndim != 3 or tuple(arr.shape[1:]) != (c, t):
        raise DataError(f"{path} holds signals of shape {tuple(arr.shape[1:])}, the encoder expects ({c}, {t})",
                        f"crop or pad the signals to {t} samples ({sample_rate} Hz) with {c} channel(s), or pass .wav files")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{path} holds {arr.dtype} signals, the encoder expects floating-point samples in [-1, 1]",
                        "convert the signals to float32 (integer PCM divided by its full scale)")
    return arr.astype(np.float32)


def read_images(path: str, shape: tuple[int, int, int]) -> np.ndarray:
    """A .npy of images or an image folder -> uint8 (N, C, H, W) of the encoder's input shape."""
    c, h, w = shape
    p = Path(path)
    if p.is_dir():
        from PIL import Image

        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".pgm"})
        if not files:
            raise DataError(f"no images (.png, .jpg, .bmp, .pgm) under {path}", "point embed at a folder of images or a .npy")
        mode = "L" if c == 1 else "RGB"
        arr = np.stack([np.asarray(Image.open(f).convert(mode).resize((w, h))) for f in files])
        return arr[:, None] if c == 1 else arr.transpose(0, 3, 1, 2)
    if p.suffix != ".npy" or not p.is_file():
        raise DataError(f"embed input {path!r} is neither a .npy file nor a folder", "pass images as .npy (N, H, W) or (N, C, H, W), or a folder")
    arr = np.load(p)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or tuple(arr.shape[1:]) != (c, h, w):
        raise DataError(f"{path} holds images of shape {tuple(arr.shape[1:])}, the encoder expects ({c}, {h}, {w})",
                        f"resize the images to {h}x{w} with {c} channel(s), or embed with a run trained at that size")
    if arr.dtype != np.uint8:
        if arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


def embed_command(run: str, input_path: str, *, out: str | None = None, store_uri: str | None = None) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    encoder = load_encoder(run, store_uri)
    shape = encoder.input_shape
    images = read_signals(input_path, shape, encoder.sample_rate) if len(shape) == 2 else read_images(input_path, shape)
    chunks = [encoder.embed(torch.from_numpy(images[i:i + 256])).numpy() for i in range(0, len(images), 256)]
    emb = np.concatenate(chunks)
    table = pa.table({"index": pa.array(np.arange(len(emb))), **{f"e{j}": pa.array(emb[:, j]) for j in range(emb.shape[1])}})
    out = out or f"{os.path.splitext(input_path.rstrip('/'))[0]}.embeddings.parquet"
    pq.write_table(table, out)
    print(f"wrote {len(emb)} embeddings of width {emb.shape[1]} to {out}")
    return 0
