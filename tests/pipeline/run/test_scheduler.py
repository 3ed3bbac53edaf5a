"""The scheduler's decisions are data in, data out: tested without a cluster."""

from __future__ import annotations

import os

from pipeline.planning.config import load_config
from pipeline.run.progress import format_line
from pipeline.run.scheduler import Launch, decide, resolve_gpus, shares_cores
from schemas.status import ModuleState, ModuleStatus


def _st(name, state, error=None):
    return ModuleStatus(module=name, state=state, error=error)


def test_failure_stops_every_module_above_and_nothing_below():
    order = ["m1", "m2", "m3", "m4"]
    statuses = {"m1": _st("m1", ModuleState.training), "m2": _st("m2", ModuleState.failed, "loss became nan"),
                "m3": _st("m3", ModuleState.waiting_upstream), "m4": _st("m4", ModuleState.training)}
    decisions = decide(order, statuses)
    assert [(d.action, d.module) for d in decisions] == [("stop", "m3"), ("stop", "m4")]
    assert all("m2" in d.reason and "nan" in d.reason for d in decisions)


def test_no_decision_while_healthy_or_done():
    order = ["m1", "m2"]
    assert decide(order, {"m1": _st("m1", ModuleState.final), "m2": _st("m2", ModuleState.training)}) == []
    done = {"m1": _st("m1", ModuleState.failed, "x"), "m2": _st("m2", ModuleState.final)}
    assert decide(order, done) == []


def test_gpus_auto_and_explicit():
    cfg = load_config(None)
    assert resolve_gpus(cfg, 0) == 0.0 and resolve_gpus(cfg, 4) == 1.0
    cfg = load_config(None, ["resources.gpus_per_module=0.25"])
    assert resolve_gpus(cfg, 1) == 0.25


def test_progress_line_names_epoch_loss_upstream_and_rate():
    st = ModuleStatus(module="m2", state=ModuleState.training, epoch=2, target_epochs=5, loss=1.23456,
                      upstream_version=3, upstream_final=False, samples_per_second=812.0, train_seconds=10.0)
    line = format_line(st)
    assert "m2" in line and "2/5" in line and "1.2346" in line and "v3" in line and "812/s" in line and "eta 15s" in line


def test_on_shared_cores_a_module_actor_is_created_once_its_upstream_has_committed_a_version():
    made = []
    launch = Launch(names=["m1", "m2", "m3"], actors={}, deferred=["m2", "m3"], create=made.append)
    statuses = {"m1": _st("m1", ModuleState.training), "m2": _st("m2", ModuleState.created),
                "m3": _st("m3", ModuleState.created)}
    assert launch.create_due(statuses) == [] and made == []
    statuses["m1"] = _st("m1", ModuleState.publishing)  # publishing is not yet a version to read
    assert launch.create_due(statuses) == [] and made == []
    statuses["m1"] = ModuleStatus(module="m1", state=ModuleState.training, published=[1])
    assert launch.create_due(statuses) == ["m2"] and made == ["m2"] and launch.deferred == ["m3"]
    statuses["m2"] = ModuleStatus(module="m2", state=ModuleState.training, published=[1])  # v1 committed, training on
    assert launch.create_due(statuses) == ["m3"] and launch.deferred == [] and made == ["m2", "m3"]


def test_a_deferred_module_whose_upstream_ended_without_a_final_version_is_never_created():
    made = []
    launch = Launch(names=["m1", "m2", "m3"], actors={}, deferred=["m2", "m3"], create=made.append)
    statuses = {"m1": _st("m1", ModuleState.stopped), "m2": _st("m2", ModuleState.created),
                "m3": _st("m3", ModuleState.created)}
    assert launch.deferred_dead(statuses) == ["m2", "m3"] and launch.deferred == [] and made == []
    launch = Launch(names=["m1", "m2"], actors={}, deferred=["m2"], create=made.append)
    assert launch.deferred_dead({"m1": _st("m1", ModuleState.final), "m2": _st("m2", ModuleState.created)}) == []


def test_module_actors_share_the_cores_on_cpu_when_their_threads_exceed_them():
    cores = len(os.sched_getaffinity(0))
    cfg = load_config("digits", [f"resources.cpus_per_module={cores}"])
    assert len(cfg.stack) > 1 and shares_cores(cfg, 0) and not shares_cores(cfg, 1)
    one = load_config("digits", ["resources.cpus_per_module=1"])
    assert shares_cores(one, 0) == (len(one.stack) > cores)


def test_module_actors_get_the_fault_settings_and_the_users_malloc_settings_else_a_kept_heap_on_cpu(monkeypatch):
    # What a module actor's runtime environment carries: the driver's fault injection and the malloc settings,
    # which a cluster's raylets do not inherit; the user's where set, else on CPU the kept heap, and on a GPU none.
    from pipeline import faults
    from pipeline.malloc import KEPT_HEAP, MALLOC_VARIABLES
    from pipeline.run.scheduler import _actor_options

    cfg = load_config("digits", ["resources.gpus_per_module=0"])
    for var in (faults.ENV, faults.DIR_ENV, *MALLOC_VARIABLES):
        monkeypatch.delenv(var, raising=False)
    assert _actor_options(cfg, "r", "m1", 0, 0)["runtime_env"] == {"env_vars": KEPT_HEAP}
    assert KEPT_HEAP == {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
    assert "runtime_env" not in _actor_options(cfg, "r", "m1", 1, 0)  # on a GPU: the host heap as it is
    monkeypatch.setenv(faults.ENV, "nan_loss:m1:1")
    assert _actor_options(cfg, "r", "m1", 1, 0)["runtime_env"] == {"env_vars": {faults.ENV: "nan_loss:m1:1"}}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.setenv("MALLOC_TOP_PAD_", "")  # set but empty: not a setting
    for gpus in (0, 1):  # the user's settings alone, on any device
        assert _actor_options(cfg, "r", "m1", gpus, 0)["runtime_env"] == \
            {"env_vars": {faults.ENV: "nan_loss:m1:1", "MALLOC_ARENA_MAX": "4"}}


def test_a_parked_module_is_created_again_when_its_upstream_commits_a_version_it_can_train_on():
    def m2(state, published, epoch=1, final=None):
        return ModuleStatus(module="m2", state=state, published=published, epoch=epoch, target_epochs=4,
                            final_version=final)

    made = []
    launch = Launch(names=["m1", "m2", "m3"], actors={}, create=made.append)
    statuses = {"m1": _st("m1", ModuleState.final), "m3": _st("m3", ModuleState.waiting_upstream)}
    launch.park("m3", 1, final_only=False)  # trained its last epoch on m2's version 1
    for st in (m2(ModuleState.publishing, [1]), m2(ModuleState.training, [1]), m2(ModuleState.publishing, [1], 2)):
        assert launch.create_due({**statuses, "m2": st}) == [] and made == []
    assert launch.create_due({**statuses, "m2": m2(ModuleState.training, [1, 2], 2)}) == ["m3"]
    assert made == ["m3"] and launch.deferred == [] and launch.after == {}
    launch.park("m3", 1, final_only=False)  # m2's version 2 was committed before it parked: it is due at once
    assert launch.create_due({**statuses, "m2": m2(ModuleState.training, [1, 2], 2)}) == ["m3"]
    # Its next epochs are the final version's: m2's intermediate versions leave it parked, the final wakes it.
    launch.park("m3", 2, final_only=True)
    for st in (m2(ModuleState.training, [1, 2, 3], epoch=3), m2(ModuleState.publishing, [1, 2, 3], epoch=4)):
        assert launch.create_due({**statuses, "m2": st}) == []
    assert launch.create_due({**statuses, "m2": m2(ModuleState.publishing, [1, 2, 3, 4], 4, final=4)}) == ["m3"]
    launch.park("m3", 3, final_only=True)
    assert launch.create_due({**statuses, "m2": m2(ModuleState.final, [1, 2, 3, 4], epoch=4, final=4)}) == ["m3"]
