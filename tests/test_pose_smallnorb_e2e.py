"""The pose preset on small-NORB-format files, as a user with their own small-NORB-style data runs it.

One synthetic toy is written as a small-NORB training file (three .mat files, camera 1 a copy of camera 0,
elevation and azimuth as small-NORB's indices, 32 px to keep it quick) and the real CLI runs `pose --set dataset.kind=smallnorb`:
the run must finish with the pose readings of held-out lightings, azimuth well under a random guess's 90
degrees, and a pose.parquet whose coordinates are the spectral view (one object in the test split).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.data import load_dataset
from schemas.config import DatasetConfig
from tests.pipeline.data.test_data import TRAIN, write_mat
from tests.test_run_e2e import _sets, isostack

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def write_toy_as_smallnorb(root, category: int, instance: int, size: int) -> int:
    ds = load_dataset(DatasetConfig(kind="synthetic_norb", image_size=size, categories=[category],
                                    instances=[instance], elevations=[0, 4, 8], split="lighting"))
    col = lambda name: np.asarray(ds.meta.column(name).to_pylist(), dtype=float)  # noqa: E731
    info = np.stack([np.full(len(ds.images), instance), np.rint((col("elevation") - 30) / 5),
                     np.rint(col("azimuth") / 10), col("lighting")], axis=1)
    root.mkdir(parents=True)
    write_mat(root / TRAIN.format("dat"), 0x1E3D4C55, np.concatenate([ds.images, ds.images], axis=1))
    write_mat(root / TRAIN.format("cat"), 0x1E3D4C54, np.full(len(ds.images), category))
    write_mat(root / TRAIN.format("info"), 0x1E3D4C54, info)
    return len(ds.images)


def test_pose_preset_runs_on_smallnorb_format_files(tmp_path):
    rows = write_toy_as_smallnorb(tmp_path / "norb", 2, 8, size=32)
    assert rows == 18 * 3 * 6
    sets = ["dataset.kind=smallnorb", f"dataset.path={tmp_path / 'norb'}", "train.epochs=3", "train.batch_size=32",
            "schedule.poll_seconds=0.1", "schedule.settle_epochs=1", "export.model=false"]
    isostack("run", "pose", *_sets(sets), "--store", str(tmp_path / "store"), "--run-id", "p")
    summary = json.loads((tmp_path / "store" / "p" / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert 0.0 <= summary["pose"]["azimuth_mae_deg"] < 20.0  # 3.3 at 3 epochs here; a uniform guess averages 90
    assert 0.5 < summary["pose"]["trustworthiness"] <= 1.0
    table = pq.read_table(summary["exports"]["pose"])
    assert table.num_rows == rows // 2  # lightings 1, 3, 5 are the test split
    assert b"spectral" in table.schema.metadata[b"isostack.coordinates"]
