"""train.seed makes a run reproducible: a sequential run twice gives bit-identical final weights on CPU; an async
run records, for every epoch, the upstream version it trained on (what it is reproducible from besides its config).

Seeding was already complete before issue 17 (initialisation, data order, pairs, augmentation and the published
subsample all derive from train.seed), so these tests guard it rather than catch a past failure; what did break
reproducibility then, epoch counts that depended on timing, is tested in tests/workers/test_epochs.py.
"""

from __future__ import annotations

import hashlib
import threading

import pyarrow as pa
import torch
import pyarrow.parquet as pq

from pipeline.planning.config import load_config
from pipeline.store import checkpoint
from pipeline.run.driver import prepare_run
from tests.conftest import TINY_NORB
from workers.trainer import ModuleTrainer


def _sequential_run(root, seed: int, extra: tuple[str, ...] = ()) -> dict:
    """m1 to final, then m2 (schedule.mode=sequential's order), in process; sha256 of each final's weights and data."""
    cfg = load_config(None, TINY_NORB + [
        "train.epochs=2", "train.batch_size=16", "train.max_steps_per_epoch=4", "schedule.poll_seconds=0.02",
        "schedule.mode=sequential", "schedule.publish_fraction=0.5", f"train.seed={seed}", *extra], str(root))
    cfg = cfg.model_copy(update={"stack": {k: cfg.stack[k] for k in ("m1", "m2")}})
    store, _, _ = prepare_run(cfg, "r")
    out = {}
    for name in cfg.stack:
        trainer = ModuleTrainer(store.uri, "r", name, cfg.model_dump(mode="json"))
        trainer.run()
        final = store.final(name)
        weights = store.read_bytes(f"{final.producer['checkpoint']}")
        out[name] = hashlib.sha256(weights).hexdigest()
        out[f"{name}/activations"] = "".join(s.sha256 for s in final.shards)
        out[f"{name}/steps"] = checkpoint.latest(store, checkpoint.checkpoint_dir(name))["step"]
    return out


def test_a_sequential_run_twice_is_bit_identical(tmp_path):
    first = _sequential_run(tmp_path / "a", seed=3)
    assert first == _sequential_run(tmp_path / "b", seed=3)
    assert first["m1"] != _sequential_run(tmp_path / "c", seed=4)["m1"]  # the seed is what decides


def test_pair_views_change_what_the_first_module_learns_and_stay_reproducible(tmp_path):
    # Mirrored same-instance pairs at m1 (objective.pair_views), micro-batched: the views are drawn from the run's
    # seed, so twice is bit-identical, and they change m1's steps (weights unlike the unviewed run's).
    views = ("stack.m1.objective.pair_views=true", "stack.m1.objective.augment.min_scale=1",
             "stack.m1.objective.augment.jitter=0", "train.micro_batch=8")
    viewed = _sequential_run(tmp_path / "a", seed=3, extra=views)
    assert viewed == _sequential_run(tmp_path / "b", seed=3, extra=views)
    assert viewed["m1"] != _sequential_run(tmp_path / "c", seed=3, extra=("stack.m1.objective.pair_views=false",
                                                                           "train.micro_batch=8"))["m1"]
    assert viewed["m1/steps"] == 8  # every step of the budget ran: 2 epochs of 4


def test_an_async_run_records_the_upstream_version_of_every_epoch(tmp_path):
    # m2 has fewer epochs than m1 and runs beside it, so its epochs see different m1 versions depending on timing:
    # the record, not the config, says which.
    cfg = load_config(None, TINY_NORB + [
        "train.epochs=2", "stack.m1.train.epochs=3", "train.batch_size=16", "train.max_steps_per_epoch=3",
        "schedule.poll_seconds=0.02", "schedule.settle_epochs=1"], str(tmp_path))
    cfg = cfg.model_copy(update={"stack": {k: cfg.stack[k] for k in ("m1", "m2")}})
    store, _, _ = prepare_run(cfg, "r")
    trainers = [ModuleTrainer(store.uri, "r", name, cfg.model_dump(mode="json")) for name in cfg.stack]
    threads = [threading.Thread(target=t.run, daemon=True) for t in trainers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert store.final("m2") is not None, "m2 did not finish in 120 s"
    lineage = checkpoint.latest(store, checkpoint.checkpoint_dir("m2"))
    used = [tuple(e) for e in lineage["upstream_versions"]]
    assert [e for e, _ in used] == [1, 2]  # one entry per epoch, exactly the budget
    assert all(v in store.versions("m1") for _, v in used)
    assert used[-1][1] == store.final("m1").version  # the settle epoch, on m1's final
    rows = pq.read_table(pa.BufferReader(store.read_bytes("metrics/m2.parquet"))).to_pylist()
    loaded = {int(r["value"]) for r in rows if r["name"] == "m2/upstream/version"}
    assert {v for _, v in used} <= loaded  # the metrics name every version an epoch trained on


def test_a_micro_batched_trainer_learns_the_whole_batch_weights(tmp_path):
    """train.micro_batch changes how a step is computed, not what it computes: the same final weights (up to float
    summation order) as whole-batch steps, in the real trainer (pairs: 2 x 16 samples a step, micro-batches of 5)."""
    from pipeline.store.checkpoint import load_tensors, module_weights

    def final_weights(root, extra: list[str]) -> dict:
        cfg = load_config(None, TINY_NORB + [
            "train.epochs=1", "train.batch_size=16", "train.max_steps_per_epoch=3", "schedule.poll_seconds=0.02",
            "schedule.mode=sequential", "train.seed=5"] + extra, str(root))
        cfg = cfg.model_copy(update={"stack": {"m1": cfg.stack["m1"]}})
        store, _, _ = prepare_run(cfg, "r")
        trainer = ModuleTrainer(store.uri, "r", "m1", cfg.model_dump(mode="json"))
        trainer.run()
        assert trainer.plan.micro_batch == (5 if extra else 32)
        return module_weights(load_tensors(store, store.final("m1").producer["checkpoint"]))

    whole = final_weights(tmp_path / "whole", [])
    micro = final_weights(tmp_path / "micro", ["train.micro_batch=5"])
    assert whole.keys() == micro.keys()
    for name, w in whole.items():
        assert torch.allclose(micro[name], w, rtol=1e-3, atol=1e-5), name
