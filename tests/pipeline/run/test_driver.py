"""Driver decisions without Ray: retrain overrides stay local, gc respects live runs and a grace period,
stale stacks warn."""

from __future__ import annotations

import os
import time

import pytest
import torch

from pipeline.errors import ConfigError, RunError
from pipeline.planning.config import load_config
from pipeline.run.driver import collect_garbage, retrain_config
from pipeline.run.lease import module_lease
from pipeline.store import Store
from pipeline.store.runs import StaleStackWarning, stale_modules, warn_stale
from tests.pipeline.store.test_store import make_meta


def _cfg(tmp_path):
    return load_config(None, ["train.epochs=2"], str(tmp_path / "store"))


def test_retrain_set_changes_only_the_retrained_module(tmp_path):
    # The old retrain applied train.lr to the whole run's config, so a later resume of m1 trained with it.
    cfg = _cfg(tmp_path)
    new = retrain_config(cfg, "m2", ["train.lr=0.5", "train.epochs=7", "stack.m2.train.batch_size=16"])
    assert new.train == cfg.train
    assert new.module_train("m2").lr == 0.5 and new.module_train("m2").epochs == 7
    assert new.module_train("m2").batch_size == 16
    for name in cfg.stack:
        if name != "m2":
            assert new.stack[name] == cfg.stack[name] and new.module_train(name) == cfg.module_train(name)
    with pytest.raises(ConfigError, match="may only change"):
        retrain_config(cfg, "m2", ["stack.m1.train.lr=1"])


def _commit(store: Store, stage: str, upstream: dict | None, final: bool = True):
    w = store.begin_version(stage, codec="float32", final=final, upstream=upstream)
    w.write(make_meta(4), torch.ones(4, 2))
    return w.commit()


def test_gc_refuses_a_live_run_and_spares_young_leftovers(tmp_path):
    cfg = _cfg(tmp_path)
    store = Store(str(tmp_path / "store"), "r")
    _commit(store, "m1", None)
    young = store.begin_version("m1")  # a writer at work: its directory was just modified
    young.write(make_meta(2), torch.ones(2, 2))
    with module_lease(store, "m2"):
        with pytest.raises(RunError, match="being trained right now"):
            collect_garbage(store, cfg)
    removed, _ = collect_garbage(store, cfg)  # no lease, but inside the grace period
    assert removed == [] and store.exists("store/m1/v0002")
    old = time.time() - 3600
    for dirpath, _, files in os.walk(store.local_path("store/m1/v0002")):
        for f in files + ["."]:
            os.utime(os.path.join(dirpath, f), (old, old))
    removed, _ = collect_garbage(store, cfg)
    assert removed == ["store/m1/v0002"]


def test_a_stack_with_a_retrained_module_below_warns(tmp_path):
    store = Store(str(tmp_path / "store"), "r")
    inp = _commit(store, "input", None)
    m1 = _commit(store, "m1", {"stage": "input", "version": inp.version})
    _commit(store, "m2", {"stage": "m1", "version": m1.version})
    assert stale_modules(store, ["m1", "m2"]) == {}
    _commit(store, "m1", {"stage": "input", "version": inp.version})  # m1 retrained: m2 sits on the old one
    assert list(stale_modules(store, ["m1", "m2"])) == ["m2"]
    with pytest.warns(StaleStackWarning, match="m2 v1 was built on m1 v1, but m1's final is v2"):
        warn_stale(store, ["m1", "m2"], "load_encoder")
