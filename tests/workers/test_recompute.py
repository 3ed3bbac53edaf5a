"""Recompute at a boundary (``stack.<m>.store.materialize: false``), with the trainers run in this process.

The same tiny stack is trained twice with the same seeds, once with m1 materialized and once with
m1 publishing only its weights: m1 trains identically (its input is the same), m2's recomputed input
matches m1's stored activations within float16's rounding, and m1's stage shrinks to its weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.planning.config import load_config
from pipeline.run.driver import prepare_run
from pipeline.errors import ConfigError, StoreError
from pipeline.feed import load_source, load_upstream
from pipeline.planning.plan import build_plan
from tests.conftest import TINY_NORB, split_default_config
from workers.trainer import ModuleTrainer

# m1 small (8 and 16 channels, ~3.4k parameters) as a module is that a stage skips storing: its weights are a
# small fraction of its activations.
STACK = TINY_NORB + ["train.epochs=1", "train.batch_size=32", "schedule.poll_seconds=0.05",
                     "schedule.settle_epochs=1", "train.max_steps_per_epoch=3", "stack.m1.layers.0.channels=8",
                     "stack.m1.layers.2.channels=16", "stack.m2.layers.0.channels=16", "stack.m2.layers.3.features=16"]


def _train(tmp_path, materialize: bool):
    cfg = load_config(None, STACK + [f"stack.m1.store.materialize={str(materialize).lower()}"], str(tmp_path / "store"))
    store, _, _ = prepare_run(cfg, "r")
    config = cfg.model_dump(mode="json")
    for name in ("m1", "m2"):
        ModuleTrainer(store.uri, "r", name, config).run()
    return store, config


def _bytes(store, stage: str) -> int:
    return sum(s.bytes for v in store.versions(stage) for s in store.manifest(stage, v).shards)


def test_recomputed_input_matches_materialized_activations(tmp_path):
    torch.set_num_threads(1)
    stored, _ = _train(tmp_path / "a", materialize=True)
    weights_only, config = _train(tmp_path / "b", materialize=False)

    final = weights_only.final("m1")
    assert final.codec == "weights" and final.rows == 0 and final.upstream["stage"] == "input"
    up = load_source(weights_only, "m1", final.version, config, torch.device("cpu"))
    assert up.manifest.version == final.version and up.source.stage == "input" and len(up.chain) == 1
    recomputed = up.features(up.x, torch.device("cpu"))

    materialized = load_upstream(stored, "m1", stored.final("m1").version)
    # Rows matched by sample_id: the input and m1's version store them in different orders.
    assert sorted(materialized.sample_id.tolist()) == sorted(up.sample_id.tolist())
    at = np.argsort(up.sample_id)[np.searchsorted(up.sample_id, materialized.sample_id, sorter=np.argsort(up.sample_id))]
    assert np.array_equal(up.sample_id[at], materialized.sample_id)
    assert recomputed.shape == materialized.x.shape
    torch.testing.assert_close(recomputed[torch.from_numpy(at)].half().float(), materialized.x.float(),
                               rtol=2e-3, atol=2e-3)
    # m1's stage holds its weights (a few KB) instead of every sample's activations.
    assert _bytes(weights_only, "m1") * 10 < _bytes(stored, "m1")
    # m2 trained on the recomputed input and names the weights version it used.
    assert weights_only.final("m2").upstream == {"stage": "m1", "version": final.version}
    assert weights_only.verify() == []
    with pytest.raises(StoreError, match="weights version"):
        weights_only.read("m1", final.version)


def test_plan_records_the_chain_and_refuses_what_cannot_work(tmp_path):
    # The default's layers in four modules: a chain of two recomputed ones, then a materialized one below the top.
    four = str(split_default_config(tmp_path / "four.yaml", cuts=(2, 4, 6)))
    cfg = load_config(four, ["stack.m1.store.materialize=false", "stack.m2.store.materialize=false"], None)
    plan = build_plan(cfg, check_paths=False)
    assert [(m.source, m.recompute) for m in plan.modules] == [("", []), ("input", ["m1"]), ("input", ["m1", "m2"]),
                                                               ("", [])]
    with pytest.raises(ConfigError) as top:
        build_plan(load_config(None, ["stack.m2.store.materialize=false"], None), check_paths=False)
    assert "stack.m2.store.materialize" in str(top.value) and "top module" in str(top.value)
    small = ["stack.m1.store.materialize=false", "resources.device_memory_gb=0.001"]
    with pytest.raises(ConfigError) as tight:
        build_plan(load_config(None, small, None), check_paths=False)
    assert "stack.m1.store.materialize" in str(tight.value) and "would recompute m1" in str(tight.value)
