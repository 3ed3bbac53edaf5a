"""The schedule simulator (benchmarks/simulate/model.py) on cases that can be worked out by hand. Pure Python."""

from __future__ import annotations

import pytest

from benchmarks.simulate.model import Cluster, ModuleCost, Schedule, simulate

POLL = 0.01


def _stack(train=(10.0, 10.0, 10.0), epochs=3, **kw):
    return [ModuleCost(f"m{i + 1}", train_s=t, epochs=epochs, **kw) for i, t in enumerate(train)]


def test_sequential_wall_time_is_the_sum_of_module_times():
    costs = [ModuleCost("m1", 2.0, 3, infer_s=0.5, start_s=1.0), ModuleCost("m2", 3.0, 4, infer_s=0.25, start_s=1.0)]
    res = simulate(costs, Cluster(), Schedule(mode="sequential", settle_epochs=2, poll_s=POLL))
    # Both actors start at t = 0 (the scheduler creates them up front), so m2's start hides behind m1's training:
    # start 1, then m1's 3 epochs x 2 + 3 publishes (2 intermediate + final) x 0.5, then m2's the same.
    assert res.wall_s == pytest.approx(1 + (3 * 2 + 3 * 0.5) + (4 * 3 + 4 * 0.25))
    assert [m.epochs for m in res.modules] == [3, 4] and [m.published for m in res.modules] == [3, 4]


def test_sequential_staleness_is_zero():
    res = simulate(_stack(), Cluster(), Schedule(mode="sequential", poll_s=POLL))
    assert res.staleness == {"start_mean": 0.0, "start_max": 0, "end_mean": 0.0, "end_max": 0}
    assert all(v == 3 for m in res.modules[1:] for _, v in m.upstream_used)  # each reads the final version only


def test_async_with_free_store_and_a_device_each_is_the_slowest_chain():
    # m1 publishes v1 at 10, v2 at 20, its final at 30; m2 starts on v1 at 10 and trains 3 epochs, the last on
    # m1's final (settle 1): done at 40 = one epoch of m1 + three of m2. m3 one epoch later: 50.
    res = simulate(_stack(), Cluster(), Schedule(mode="async", settle_epochs=1, poll_s=POLL))
    assert res.modules[1].final_s == pytest.approx(40.0, abs=2 * POLL)
    assert res.wall_s == pytest.approx(50.0, abs=3 * POLL)
    assert res.span_s == pytest.approx(res.wall_s)
    seq = simulate(_stack(), Cluster(), Schedule(mode="sequential", poll_s=POLL))
    assert seq.wall_s == pytest.approx(90.0)


def test_async_tracks_upstream_and_settles_within_the_budget():
    # A fast m2 (1 s epochs, budget 3, settle 1): its last epoch is kept for m1's final (v3, at 30 s); before
    # that, tracking spends one epoch on each new version (v1 at 10 s, v2 at 20 s) and waits for the next.
    costs = [ModuleCost("m1", 10.0, 3), ModuleCost("m2", 1.0, 3)]
    res = simulate(costs, Cluster(), Schedule(mode="async", settle_epochs=1, poll_s=POLL))
    assert [v for _, v in res.modules[1].upstream_used] == [1, 2, 3]
    # Without tracking it trains ahead on v1 and then waits for the final, which is v2: with m2's two epochs
    # before the final spent, m1 publishes no version after its second epoch (nobody could train on it).
    untracked = simulate(costs, Cluster(), Schedule(mode="async", settle_epochs=1, track_upstream=False, poll_s=POLL))
    assert [v for _, v in untracked.modules[1].upstream_used] == [1, 1, 2]
    assert untracked.modules[0].published == 2
    # settle 2 of 3: only the first epoch may use a non-final version, so m1's second is its final (v2).
    settle2 = simulate(costs, Cluster(), Schedule(mode="async", settle_epochs=2, poll_s=POLL))
    assert [v for _, v in settle2.modules[1].upstream_used] == [1, 2, 2]


@pytest.mark.parametrize("settle", [0, 1, 3])
@pytest.mark.parametrize("track", [True, False])
def test_every_module_trains_its_budget_and_ends_on_the_final_upstream(settle, track):
    # The epoch budget is the budget whatever the timing (the old loop trained one more epoch per upstream version
    # past it, compounding up the stack), and each final version is built on the upstream's final one.
    costs = [ModuleCost("m1", 5.0, 4, infer_s=0.1), ModuleCost("m2", 0.5, 4, infer_s=0.1),
             ModuleCost("m3", 0.2, 4, infer_s=0.1)]
    res = simulate(costs, Cluster(), Schedule(mode="async", settle_epochs=settle, track_upstream=track, poll_s=POLL))
    assert [m.epochs for m in res.modules] == [4, 4, 4]
    for below, m in zip(res.modules, res.modules[1:]):
        assert len(m.upstream_used) == 4
        assert m.final_upstream == below.published  # built on the upstream's final version, settle 0 included
        assert all(v == below.published for _, v in m.upstream_used[4 - settle:])  # the settle epochs on the final
    # A version is published only while the module above may still train on one (at most 4 - settle epochs of
    # it); tracking, the fast modules above train on every one of them.
    for below, m in zip(res.modules, res.modules[1:]):
        intermediate = {v for _, v in m.upstream_used if v != below.published}
        assert below.published <= 4 and (not track or below.published == 1 + len(intermediate))
    assert res.modules[1].final_s > res.modules[0].final_s and res.modules[2].final_s > res.modules[1].final_s


def test_bottom_module_settle_is_capped_by_its_epochs():
    res = simulate([ModuleCost("m1", 1.0, 2)], Cluster(), Schedule(settle_epochs=5, poll_s=POLL))
    assert res.modules[0].epochs == 2  # min(settle_epochs, epochs): its input is final from the start


def test_publish_every_sets_the_versions():
    res = simulate([ModuleCost("m1", 1.0, 7)], Cluster(), Schedule(publish_every=3, poll_s=POLL))
    assert res.modules[0].published == 3  # after epochs 3 and 6, then the final after 7


def test_halving_store_bandwidth_lengthens_a_publish_bound_run():
    costs = _stack(train=(1.0, 1.0), publish_bytes=100.0, load_bytes=100.0)
    fast = simulate(costs, Cluster(write_bw=100.0, read_bw=1e9), Schedule(poll_s=POLL))
    slow = simulate(costs, Cluster(write_bw=50.0, read_bw=1e9), Schedule(poll_s=POLL))
    assert slow.wall_s > 1.5 * fast.wall_s
    assert slow.bottleneck()[0] == "store write"


def test_shared_devices_time_slice():
    costs = _stack(train=(10.0, 10.0))
    own = simulate(costs, Cluster(), Schedule(poll_s=POLL))
    shared = simulate(costs, Cluster(devices=1), Schedule(poll_s=POLL))
    assert shared.wall_s > own.wall_s
    # on one device the two modules' work cannot overlap: at least the sum of their training
    assert shared.wall_s >= sum(m.train_work_s for m in shared.modules) - 1e-6
    assert shared.bottleneck()[1].get("device sharing", 0) > 0


def test_utilisation_of_a_lone_module_is_its_busy_fraction():
    res = simulate([ModuleCost("m1", 3.0, 2, publish_bytes=10.0)], Cluster(write_bw=10.0), Schedule(poll_s=POLL))
    # 2 epochs of 3 s, 2 writes of 1 s: busy 6 of 8 s
    assert res.wall_s == pytest.approx(8.0)
    assert res.modules[0].utilisation == pytest.approx(0.75)


def test_rejects_a_zero_poll():
    with pytest.raises(ValueError):
        simulate(_stack(), Cluster(), Schedule(poll_s=0))
