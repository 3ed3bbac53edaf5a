"""The new local objectives train in a stack through the real CLI: m1 autoencoder, m2 dim, m3 moco."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import TINY_NORB
from tests.test_run_e2e import _sets, isostack

pytestmark = [pytest.mark.slow, pytest.mark.ray]

STACK = {
    "name": "mixed-objectives",
    "dataset": {"kind": "synthetic_norb"},
    "stack": {
        "m1": {"layers": [{"type": "conv", "channels": 8, "kernel": 5}, {"type": "maxpool", "kernel": 2}],
               "objective": {"kind": "autoencoder", "hidden": 8}},
        "m2": {"layers": [{"type": "conv", "channels": 16, "kernel": 3}, {"type": "maxpool", "kernel": 2}],
               "objective": {"kind": "dim", "projection_dim": 16}},
        "m3": {"layers": [{"type": "conv", "channels": 16, "kernel": 3}],
               "objective": {"kind": "moco", "pairing": "same_instance", "queue_size": 128, "momentum": 0.9}},
    },
}


def test_mixed_stack_of_new_objectives_runs_end_to_end(tmp_path):
    config = tmp_path / "mixed.yaml"
    config.write_text(yaml.safe_dump(STACK))
    sets = TINY_NORB + ["train.epochs=2", "train.batch_size=32", "schedule.poll_seconds=0.1",
                        "export.plots=false", "export.model=false"]
    proc = isostack("run", str(config), *_sets(sets), "--store", str(tmp_path / "store"), "--run-id", "mixed")
    root = tmp_path / "store" / "mixed"
    summary = json.loads((root / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert list(summary["modules"]) == ["m1", "m2", "m3"]
    for name, m in summary["modules"].items():
        for key in ("final_version", "epochs", "final_loss", "train_seconds", "samples_per_second",
                    "peak_memory_bytes", "started_at", "finished_at", "node"):
            assert m[key] is not None, (name, key)
        assert m["epochs"] >= 2
    ev = summary["evaluation"]
    for clf in ("nearest_centroid", "linear_probe", "knn", "kmeans", "gmm"):
        assert 0 <= ev[clf]["test_accuracy"] <= 1, clf
    assert 0 <= ev["nearest_centroid"]["train_accuracy"] <= 1
    raw = ev["baselines"]["raw_pixels"]
    assert 0 <= raw["nearest_centroid"]["test_accuracy"] <= 1 and 0 <= raw["gmm"]["test_accuracy"] <= 1
    assert {"azimuth_mae_deg", "elevation_mae_deg", "trustworthiness"} <= set(summary["pose"])
    assert "Gaussian mixture" in (root / "report.html").read_text()
    # moco's queue and key encoder were checkpointed with the objective (they survive a restart).
    from safetensors.numpy import load_file

    last = sorted((root / "checkpoints" / "m3").glob("*.safetensors"))[-1]
    keys = set(load_file(str(last)))
    assert {"objective.queue", "objective.queue_ptr"} <= keys and any(k.startswith("objective.key_encoder.") for k in keys)
    assert "GMM" in proc.stdout
