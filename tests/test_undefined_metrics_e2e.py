"""A trained run is never lost to a metric the data cannot give (issue 16, point 4).

The real CLI on a 20-object test split seen once each, all at one pose: trustworthiness (needs 3 samples
per object) and ridge R² (needs the pose to vary) are undefined. The run must finish, with those two
metrics null in summary.json and their reasons beside them, and the classifiers still scored.
"""

from __future__ import annotations

import json

import pytest

from tests.test_run_e2e import _sets, isostack

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# 5 categories x instances 0-3 = 20 objects, one view each; split=lighting: lightings 0, 2, 4 train (60 images),
# lighting 1 tests (20 images, one per object).
ONE_PER_OBJECT = [
    "dataset.image_size=16", "dataset.instances=[0,1,2,3]", "dataset.azimuths=[0]", "dataset.elevations=[0]",
    "dataset.lightings=[0,1,2,4]", "dataset.split=lighting", "train.epochs=1", "train.batch_size=32",
    "schedule.poll_seconds=0.1", "stack.m1.layers.0.channels=8", "stack.m1.layers.2.channels=16",
    "stack.m2.layers.0.channels=16", "stack.m2.layers.3.features=16", "export.model=false", "export.plots=false",
    "evaluate.baselines=false",
]


def test_undefined_pose_metrics_do_not_fail_the_run(tmp_path):
    proc = isostack("run", *_sets(ONE_PER_OBJECT), "--store", str(tmp_path), "--run-id", "one-per-object")
    summary = json.loads((tmp_path / "one-per-object" / "summary.json").read_text())
    assert summary["status"] == "finished"
    pose = summary["pose"]
    assert pose["trustworthiness"] is None and pose["ridge_r2"] is None
    assert "trustworthiness is undefined" in pose["undefined"]["trustworthiness"]
    assert "share one pose" in pose["undefined"]["ridge_r2"]
    assert isinstance(pose["azimuth_mae_deg"], float)
    assert 0.0 <= summary["evaluation"]["nearest_centroid"]["test_accuracy"] <= 1.0
    assert "trustworthiness undefined" in proc.stdout
    report = (tmp_path / "one-per-object" / "report.html").read_text()
    assert "undefined: no object in the pose split" in report
