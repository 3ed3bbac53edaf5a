"""A trainer streams its upstream: killed mid-epoch it resumes the same order; it reads from S3 the same way."""

from __future__ import annotations

import weakref

import numpy as np
import torch

from pipeline.planning.config import load_config
from pipeline.run.driver import prepare_run
from tests.conftest import TINY_NORB
from workers.trainer import ModuleTrainer

STACK = TINY_NORB + ["train.epochs=1", "train.batch_size=8", "schedule.poll_seconds=0.05", "store.rows_per_shard=16",
                     "feed.buffer_samples=32", "feed.checkpoint_every_steps=2"]


class Recording(ModuleTrainer):
    """Records the rows of every batch (each row's pixel sum identifies it) and the state of the views' generator
    at each step; stops after ``stop_after`` steps."""

    def __init__(self, *args, stop_after: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[np.ndarray] = []
        self.views: list[torch.Tensor] = []
        self.stop_after = stop_after

    def _step(self, held, pairing, gen, step, features):
        self.seen.append(features(held[0]).x.flatten(1).sum(1).numpy().round(3))
        self.views.append(gen.get_state())
        if self.stop_after is not None and len(self.seen) >= self.stop_after:
            self._stop.set()  # a kill after this step: nothing after the last mid-epoch checkpoint is kept
        return super()._step(held, pairing, gen, step, features)


def _run(tmp_path, name="m1", extra=()):
    cfg = load_config(None, STACK + list(extra), str(tmp_path / "store"))
    cfg = cfg.model_copy(update={"stack": {"m1": cfg.stack["m1"]}})
    store, _, _ = prepare_run(cfg, "r")
    return store, cfg.model_dump(mode="json")


def test_a_module_killed_mid_epoch_resumes_the_order(tmp_path):
    torch.set_num_threads(1)
    store, config = _run(tmp_path / "whole")
    whole = Recording(store.uri, "r", "m1", config)
    whole.setup()
    whole.train_until(1)
    assert len(whole.seen) >= 6

    store, config = _run(tmp_path / "killed")
    first = Recording(store.uri, "r", "m1", config, stop_after=5)
    first.setup()
    first.train_until(1)
    assert first.epoch == 0  # stopped inside epoch 1; its last mid-epoch checkpoint is at step 4
    again = Recording(store.uri, "r", "m1", config)
    again.setup()
    done = again.lineage["step"]
    assert done == 4
    again.train_until(1)
    resumed = first.seen[:done] + again.seen
    assert len(resumed) == len(whole.seen)
    for a, b in zip(whole.seen, resumed):
        np.testing.assert_array_equal(a, b)
    # The default's m1 views each pair (pair_views): the resumed steps draw the views the whole epoch drew there.
    assert config["stack"]["m1"]["objective"]["pair_views"]
    for a, b in zip(whole.views, first.views[:done] + again.views):
        assert torch.equal(a, b)
    names = {r["name"] for r in again.metrics.rows}
    assert "m1/feed/rows_held" in names and "m1/feed/partner_fetch_rate" in names


def test_the_trainer_holds_the_window_its_plan_gives(tmp_path):
    """feed.buffer_samples bounds what a trainer holds, whatever the version's size (counted rows, not RSS)."""
    torch.set_num_threads(1)
    cfg = load_config(None, STACK + ["feed.buffer_samples=16", "feed.readahead=1"], str(tmp_path / "store"))
    cfg = cfg.model_copy(update={"stack": {"m1": cfg.stack["m1"]}})
    store, _, _ = prepare_run(cfg, "r")
    trainer = ModuleTrainer(store.uri, "r", "m1", cfg.model_dump(mode="json"))
    trainer.setup()
    assert trainer.plan.buffer_samples == 16
    trainer.train_until(1)
    held = max(r["value"] for r in trainer.metrics.rows if r["name"] == "m1/feed/rows_held")
    train_rows = len(trainer._upstream.train_rows())
    # one window (16 rows: a 16-row unit) + its partners (16) + the unit in flight and one read ahead (2 x 16)
    # + a carried tail shorter than a batch (7)
    assert 0 < held <= 16 + 16 + 2 * 16 + 7, held
    assert held < train_rows / 4, (held, train_rows)


def test_a_step_holds_no_stored_copy_of_its_batch(tmp_path):
    """While the module steps on a batch's float32 features, nothing keeps the stored (pre-cast) batch alive."""
    torch.set_num_threads(1)
    store, config = _run(tmp_path)
    trainer = ModuleTrainer(store.uri, "r", "m1", config)
    trainer.setup()
    stored, alive_at_forward = [], []

    def features(batch):  # the feed's features(), watching the stored tensor it is given
        stored.append(weakref.ref(batch.x))
        return trainer._upstream_features(batch)

    trainer._upstream_features = None
    original = ModuleTrainer._step

    def step(self, held, pairing, gen, step_no, feed_features):
        self._upstream_features = feed_features
        return original(self, held, pairing, gen, step_no, features)

    trainer._step = step.__get__(trainer)
    trainer.module.register_forward_pre_hook(lambda *_: alive_at_forward.append(stored[-1]() is not None))
    trainer.train_until(1)
    assert len(alive_at_forward) >= 4 and not any(alive_at_forward), alive_at_forward


def test_a_micro_batched_step_holds_its_batch_as_stored(tmp_path):
    """Micro-batched, a step holds the batch as stored and makes each micro-batch float32 as it runs: the whole
    batch is never made float32 (the feed's features() is not called), and the module sees float32 micro-batches."""
    torch.set_num_threads(1)
    # without views: the default's m1 views each pair (pair_views), and views need the whole batch's floats
    store, config = _run(tmp_path, extra=["train.micro_batch=3", "stack.m1.objective.pair_views=false"])
    trainer = ModuleTrainer(store.uri, "r", "m1", config)
    trainer.setup()
    assert trainer.plan.micro_batch == 3
    made, seen = [], []
    original = ModuleTrainer._step

    def step(self, held, pairing, gen, step_no, feed_features):
        return original(self, held, pairing, gen, step_no, lambda b: made.append(len(b.x)) or feed_features(b))

    trainer._step = step.__get__(trainer)

    def watch(m, args) -> None:  # in training mode: the epoch's held-out loss (eval mode) runs its one batch whole
        if m.training:
            seen.append((len(args[0]), args[0].dtype))

    trainer.module.register_forward_pre_hook(watch)
    trainer.train_until(1)
    steps = [n for n, _ in seen]
    assert made == [] and len(steps) >= 4 and max(steps) <= 3, (made, seen[:8])
    assert all(dtype == torch.float32 for _, dtype in seen)
