"""A tiny audio stack through the real `isostack run`: synthetic speakers, conv1d + GRU modules, summary.json."""

from __future__ import annotations

import json

import pytest

from tests.test_run_e2e import isostack

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TINY_AUDIO = """
name: tiny-audio
dataset: {kind: synthetic_audio, categories: [0, 1, 2], length: 1024}
stack:
  enc:
    layers:
      - {type: conv1d, channels: 8, kernel: 10, stride: 5, padding: 2}
      - {type: conv1d, channels: 8, kernel: 8, stride: 4, padding: 2}
    objective: {kind: infonce_grid, pairing: temporal, steps: 3, negatives: 4}
  ar:
    layers: [{type: gru, hidden: 8}]
    objective: {kind: infonce_pair, pairing: temporal, temperature: 0.2}
train: {epochs: 1, batch_size: 16}
schedule: {poll_seconds: 0.1, settle_epochs: 0}
export: {plots: false, report: false}
evaluate: {per_module: true}
"""


def test_audio_stack_runs_to_a_complete_summary(tmp_path):
    config = tmp_path / "tiny-audio.yaml"
    config.write_text(TINY_AUDIO)
    store = tmp_path / "store"
    proc = isostack("run", str(config), "--store", str(store), "--run-id", "audio", timeout=180)
    root = store / "audio"
    summary = json.loads((root / "summary.json").read_text())
    assert summary["status"] == "finished" and list(summary["modules"]) == ["enc", "ar"]
    assert all(m["final_version"] >= 1 and m["final_loss"] is not None for m in summary["modules"].values())
    ev = summary["evaluation"]
    assert ev["embedding_dim"] == 8 and len(ev["nearest_centroid"]["labels"]) == 3  # the GRU's (8, T) pooled over time
    assert 0.0 <= ev["baselines"]["raw_pixels"]["nearest_centroid"]["test_accuracy"] <= 1.0
    assert "pose" not in summary and "pose" not in summary["exports"]  # audio has no pose metadata
    depth = ev["per_module"]  # accuracy by depth: every scorer, for each module's final version
    assert [d["module"] for d in depth] == ["enc", "ar"]
    assert all(set(d) >= {"nearest_centroid", "linear_probe", "knn", "kmeans", "gmm"} for d in depth)
    assert depth[-1]["nearest_centroid"] == ev["nearest_centroid"]["test_accuracy"]
    assert depth[-1]["gmm"] == ev["gmm"]["test_accuracy"]
    assert (root / "embeddings.parquet").is_file() and "nearest centroid" in proc.stdout

    # The run's encoder embeds new audio: stored signals as .npy reproduce embeddings.parquet,
    # and a folder of WAV files at another rate is resampled to the run's 16 kHz and embedded.
    import numpy as np
    import pyarrow.parquet as pq
    from scipy.io import wavfile

    from pipeline.store import Store

    table = pq.read_table(root / "embeddings.parquet")
    runs = Store(str(store), "audio")
    reader = runs.read("input", runs.versions("input")[-1])
    signals = reader.tensor().numpy()[:6]
    row_of = {sid: i for i, sid in enumerate(table.column("sample_id").to_pylist())}
    rows = [row_of[sid] for sid in reader.meta.column("sample_id").to_pylist()[:6]]
    stored = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))[rows]
    np.save(tmp_path / "clips.npy", signals[:, 0])  # (N, T): one channel implied
    isostack("embed", "audio", str(tmp_path / "clips.npy"), "--store", str(store), timeout=120)
    out = pq.read_table(tmp_path / "clips.embeddings.parquet")
    embedded = np.stack(out.column("embedding").to_numpy(zero_copy_only=False))
    assert np.allclose(embedded, stored, atol=1e-3), np.abs(embedded - stored).max()

    wavs = tmp_path / "wavs"
    wavs.mkdir()
    for i in range(3):
        wavfile.write(wavs / f"clip{i}.wav", 8000, (signals[i, 0, ::2] * 32767).astype(np.int16))
    isostack("embed", "audio", str(wavs), "--store", str(store), "--out", str(tmp_path / "wav.parquet"), timeout=120)
    wav_emb = pq.read_table(tmp_path / "wav.parquet")
    assert wav_emb.num_rows == 3 and wav_emb.column_names == ["index", "embedding"]
    assert np.isfinite(np.stack(wav_emb.column("embedding").to_numpy(zero_copy_only=False))).all() and embedded.shape[1] == 8
