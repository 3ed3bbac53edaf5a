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
    assert (root / "embeddings.parquet").is_file() and "nearest centroid" in proc.stdout
