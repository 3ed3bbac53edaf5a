"""The final stage on a store whose top module's output collapsed to one vector: the run is reported, not lost."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.planning.config import load_config
from pipeline.store import Store
from tests.conftest import TINY_NORB
from workers.evaluator import Evaluator


def test_a_collapsed_top_is_reported_with_the_module_to_retrain(tmp_path):
    cfg = load_config(None, TINY_NORB + ["evaluate.baselines=false"], str(tmp_path / "store"))
    top = list(cfg.stack)[-1]
    store = Store(cfg.store.uri, "r")
    n = 48
    ids = np.arange(n)
    w = store.begin_version(top, codec="float32", final=True, rows_per_shard=16)
    w.write({"sample_id": ids, "split": np.where(ids % 4 == 0, "test", "train"), "label": ids % 3,
             "instance": ids % 5, "azimuth": (ids * 20) % 360, "elevation": 30 + 5 * (ids % 3), "lighting": ids % 2},
            torch.full((n, 8), 0.5))  # every sample the same 8 values
    w.commit()
    out = Evaluator(store.uri, store.run_id, cfg.model_dump(mode="json")).run(evaluate=True, export=False)
    skipped = out["evaluation"]["skipped"]
    assert "collapsed to one point" in skipped and "isostack retrain" in skipped
    assert out["pose"]["azimuth_mae_deg"] > 45  # the pose readings still come, at chance for one vector
