"""The epoch budget and the final invariant: the pure policy, then the real trainer's run loop in process (no Ray)."""

from __future__ import annotations

import itertools
import threading

import pytest

from pipeline.planning.config import load_config
from pipeline.run.driver import prepare_run
from tests.conftest import TINY_NORB, split_default_config
from workers.epochs import Boundary, Step, next_step, publishes_after, reader_may_use
from workers.trainer import ModuleTrainer


def _simulate(budget: int, settle: int, track: bool, upstream_versions: int, steps_per_version: int) -> tuple[int, list]:
    """A module against a scripted upstream that commits a new version every few loop turns, the last one final."""
    epoch, used, version, turn = 0, [], 0, 0
    while turn < 10_000:
        turn += 1
        if turn % steps_per_version == 0 and version < upstream_versions:
            version += 1
        final = version == upstream_versions
        step = next_step(Boundary(epoch=epoch, budget=budget, settle=settle, track=track, loaded=version > 0,
                                  upstream_final=final, trained_on_loaded=bool(used) and used[-1] == version))
        if step == Step.finish:
            return epoch, used + [("final on", version, final)]
        if step == Step.train:
            epoch += 1
            used.append(version)
    raise AssertionError("the module never finished")


@pytest.mark.parametrize("budget,settle,track,versions,pace", [
    (b, s, t, v, p) for b, s, t, v, p in itertools.product((1, 3, 8), (0, 1, 2, 9), (False, True), (1, 4, 20), (1, 3))])
def test_policy_trains_exactly_the_budget_and_finishes_on_the_final_upstream(budget, settle, track, versions, pace):
    epochs, used = _simulate(budget, settle, track, versions, pace)
    assert epochs == budget
    assert used[-1] == ("final on", versions, True)
    on_final = sum(1 for v in used[:-1] if v == versions)
    assert on_final >= min(settle, budget), used


def test_settle_zero_waits_for_the_final_upstream_instead_of_finishing():
    # The old loop finished here (past its epochs, epochs_on_final >= 0) with a non-final upstream loaded.
    b = Boundary(epoch=3, budget=3, settle=0, track=True, loaded=True, upstream_final=False, trained_on_loaded=False)
    assert next_step(b) == Step.wait
    assert next_step(Boundary(**{**b.__dict__, "upstream_final": True})) == Step.finish


def test_tracking_waits_for_a_new_upstream_version_and_never_exceeds_the_budget():
    b = Boundary(epoch=1, budget=4, settle=1, track=True, loaded=True, upstream_final=False, trained_on_loaded=True)
    assert next_step(b) == Step.wait
    assert next_step(Boundary(**{**b.__dict__, "track": False})) == Step.train
    assert next_step(Boundary(**{**b.__dict__, "epoch": 4, "upstream_final": True})) == Step.finish


def test_no_intermediate_publish_right_before_the_final():
    assert publishes_after(2, budget=4, publish_every=2, upstream_final=True)
    assert not publishes_after(4, budget=4, publish_every=2, upstream_final=True)
    assert publishes_after(4, budget=4, publish_every=2, upstream_final=False)  # waits for the final: publish meanwhile
    assert not publishes_after(3, budget=4, publish_every=2, upstream_final=False)


COMBOS = list(itertools.product((0, 1), (True, False), (1, 2), ("full", "stream")))


@pytest.mark.parametrize("settle,track,every,publish", COMBOS)
def test_trainer_run_loop_builds_every_final_on_the_upstream_final(tmp_path, settle, track, every, publish):
    # m2 has fewer epochs than m1, so it reaches its budget while m1 still publishes non-final versions.
    # The default's layers in three modules: a middle one (m2) both reads an upstream and has one above it.
    three = split_default_config(tmp_path / "three.yaml")
    cfg = load_config(str(three), TINY_NORB + [
        "train.epochs=1", "stack.m1.train.epochs=3", "train.batch_size=16", "train.max_steps_per_epoch=3",
        "schedule.poll_seconds=0.02", f"schedule.settle_epochs={settle}", f"schedule.track_upstream={str(track).lower()}",
        f"schedule.publish_every={every}", f"schedule.publish={publish}", "store.window_samples=96",
        "store.rows_per_shard=24",
        # no driver here to create a parked actor again: a slow machine's epoch times must not park one
        "schedule.park_seconds=null"], str(tmp_path / "store"))
    store, _, _ = prepare_run(cfg, "r")
    config = cfg.model_dump(mode="json")
    trainers = [ModuleTrainer(store.uri, "r", name, config) for name in cfg.stack]
    errors: list[BaseException] = []

    def run(trainer) -> None:
        try:
            trainer.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in trainers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a trainer did not finish in 120 s"
    below = store.final("input")
    for trainer in trainers:
        final = store.final(trainer.name)
        assert final.upstream == {"stage": below.stage, "version": below.version}, \
            f"{trainer.name} final v{final.version} built on {final.upstream}, upstream final is v{below.version}"
        assert trainer.epoch == trainer.train_cfg.epochs, f"{trainer.name} trained {trainer.epoch} epochs"
        assert trainer.status()["epoch"] <= trainer.status()["target_epochs"]
        below = final


def test_a_version_is_wanted_while_the_module_above_may_train_on_one():
    # 8 epochs with 2 settle: six epochs may use non-final versions; after the sixth only the final one can.
    assert reader_may_use(5, budget=8, settle=2) and not reader_may_use(6, budget=8, settle=2)
    assert not reader_may_use(0, budget=2, settle=5)  # settle over the budget: every epoch is the final's
    assert reader_may_use(3, budget=4, settle=0)
    assert not publishes_after(3, budget=8, publish_every=1, upstream_final=True, wanted=False)


def test_a_waiting_module_parks_only_on_shared_cores_in_async_mode_after_an_epoch_when_the_wait_is_long_enough():
    from workers.epochs import parks

    due = dict(shared=True, mode="async", publish="full", epoch=1, upstream_final=False, wait_seconds=60.0,
               park_seconds=60.0)
    assert parks(**due)
    for change in ({"shared": False}, {"mode": "sequential"}, {"publish": "stream"}, {"epoch": 0},
                   {"upstream_final": True}, {"wait_seconds": 59.0}, {"wait_seconds": None}, {"park_seconds": None}):
        assert not parks(**{**due, **change}), change
    assert parks(**{**due, "park_seconds": 0.0}) and not parks(**{**due, "park_seconds": 0.0, "wait_seconds": 0.0})


def test_the_expected_wait_for_an_upstream_follows_its_epoch_times_to_the_version_needed():
    from workers.epochs import upstream_wait

    up = {"epoch": 2, "target_epochs": 6, "train_seconds": 100.0}  # 50 s an epoch, 4 to go
    assert upstream_wait(up, final_only=True) == 200.0 and upstream_wait(up, final_only=False) == 50.0
    # its epochs done, it is publishing its final version: a module re-created for it must not park again
    assert upstream_wait({**up, "epoch": 6, "train_seconds": 300.0}, final_only=True) == 0.0
    assert upstream_wait(None, final_only=True) is None and upstream_wait({**up, "epoch": 0}, final_only=False) is None


def test_an_upstream_epoch_on_a_thin_sample_does_not_shorten_the_expected_wait_for_a_full_one():
    from workers.epochs import upstream_wait

    # its one epoch so far trained 128 rows in 56 s (2.3 rows/s); the next covers the 320 train rows
    thin = {"epoch": 1, "target_epochs": 2, "train_seconds": 56.0, "samples_per_second": 128 / 56.0}
    assert upstream_wait(thin, final_only=True) == 56.0  # no row count: the mean epoch, as before
    assert upstream_wait(thin, final_only=True, train_rows=320) == 140.0
    # an upstream whose epochs took longer than its rate says (publishing, waiting between steps) keeps its mean
    slow = {**thin, "train_seconds": 200.0}
    assert upstream_wait(slow, final_only=True, train_rows=320) == 200.0
    assert upstream_wait({**thin, "samples_per_second": None}, final_only=True, train_rows=320) == 56.0


def test_the_expected_wait_counts_the_upstream_publish_that_commits_the_version():
    from workers.epochs import upstream_wait

    # m2 on the faster 2-core machine: one 33 s epoch left, its last publish 128 rows in 16 s; the final covers 400 rows
    up = {"epoch": 1, "target_epochs": 2, "train_seconds": 33.0, "publish_rows": 128, "publish_seconds": 16.0}
    assert upstream_wait(up, final_only=True, final_rows=400) == 33.0 + 50.0  # the final publish, scaled to its rows
    assert upstream_wait(up, final_only=False, final_rows=400) == 33.0 + 16.0  # the next version: one like the last
    assert upstream_wait(up, final_only=True) == 33.0 + 16.0  # no row count: the last publish as it was
    assert upstream_wait({"epoch": 1, "target_epochs": 2, "train_seconds": 33.0}, final_only=True, final_rows=400) == 33.0
    # its epochs done, it is publishing its final version: still 0, so a module re-created for it does not park again
    assert upstream_wait({**up, "epoch": 2, "train_seconds": 66.0}, final_only=True, final_rows=400) == 0.0


def test_upstream_rows_are_the_train_split_under_the_step_cap_and_the_final_rows_every_split():
    from types import SimpleNamespace

    from workers.epochs import upstream_rows

    data = SimpleNamespace(splits={"train": 320, "test": 80}, rows=400)
    assert upstream_rows(data, SimpleNamespace(max_steps_per_epoch=None, batch_size=32)) == (320, 400)
    assert upstream_rows(data, SimpleNamespace(max_steps_per_epoch=4, batch_size=32)) == (128, 400)
    assert upstream_rows(None, SimpleNamespace(max_steps_per_epoch=None, batch_size=32)) == (None, None)
