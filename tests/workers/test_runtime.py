"""Module actors sharing a node's cores take turns: one compute turn at a time, node-local, freed on death."""

from __future__ import annotations

import fcntl
import itertools
import multiprocessing as mp
import os
import signal
import tempfile
import time

import pytest
import torch

from pipeline.planning.config import load_config
from tests.conftest import TINY_NORB
from workers.runtime import CoreTurns, node_cores, sweep_stale_turns

TURN = 0.12  # seconds a test turn holds the cores: long enough that the holder yields after it


@pytest.fixture(autouse=True)
def _turn_files_in_tmp_path(tmp_path, monkeypatch):
    """Each test's turn files in its own folder (spawned actors too, through TMPDIR): a killed holder leaves
    its files behind, as a crashed actor does, and they must not land in the machine's temp directory."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)


def _take_turns(key: str, shared: bool, n: int, out: str, barrier=None, hold: float = 0.0, slots: int = 1) -> None:
    turns = CoreTurns(key, shared, hold=hold, slots=slots)
    if barrier is not None:
        barrier.wait(60)  # both processes start together, whatever their import times
    with open(out, "a") as f:
        for _ in range(n):
            with turns.turn():
                start = time.monotonic()
                time.sleep(TURN)
                f.write(f"{os.getpid()} {start} {time.monotonic()}\n")
                f.flush()
    turns.close()


def _intervals(path) -> list[tuple[int, float, float]]:
    with open(path) as f:
        return sorted(((int(p), float(a), float(b)) for p, a, b in (line.split() for line in f)), key=lambda s: s[1])


def _run(key: str, shared: bool, tmp_path, n: int = 4, procs: int = 2, hold: float = 0.0, slots: int = 1):
    out = str(tmp_path / f"turns-{shared}-{hold}-{slots}.txt")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs)
    ps = [ctx.Process(target=_take_turns, args=(key, shared, n, out, barrier, hold, slots)) for _ in range(procs)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(60)
        assert p.exitcode == 0
    return _intervals(out)


def test_shared_turns_never_overlap_and_alternate(tmp_path):
    spans = _run(f"test-{tmp_path}", True, tmp_path)
    assert len(spans) == 8
    for (_, _, end), (_, start, _) in zip(spans, spans[1:]):
        assert start >= end - 1e-3  # one turn at a time across the processes
    # the holder yields after a long turn: the other process gets the next one (not all four in a row)
    owners = [pid for pid, _, _ in spans]
    assert sum(a != b for a, b in zip(owners, owners[1:])) >= 3


def test_a_holder_keeps_the_turn_for_its_hold_then_yields(tmp_path):
    """Consecutive steps keep the node's turn for ``hold`` seconds (the heap is reused), then the waiter gets it."""
    spans = _run(f"test-hold-{tmp_path}", True, tmp_path, n=6, hold=0.5)
    assert len(spans) == 12
    for (_, _, end), (_, start, _) in zip(spans, spans[1:]):
        assert start >= end - 1e-3
    owners = [pid for pid, _, _ in spans]
    runs = [len(list(group)) for _, group in itertools.groupby(owners)]
    assert len(runs) >= 2 and max(runs) >= 3, runs  # runs of several steps, and both processes got the cores


def _one_turn_then_idle(key: str, took, seconds: float) -> None:
    turns = CoreTurns(key, True, hold=60.0, idle=0.3)
    with turns.turn():
        pass
    took.set()
    time.sleep(seconds)  # idle (waiting for an upstream, say) with the turn kept by its hold


def test_an_idle_holder_hands_the_turn_back(tmp_path):
    key = f"test-idle-{tmp_path}"
    holder, took = _spawned(_one_turn_then_idle, key, 30.0)
    try:
        assert took.wait(60)
        t0 = time.monotonic()
        with CoreTurns(key, True).turn():
            waited = time.monotonic() - t0
        assert waited < 10, waited  # the idle timer released it long before the holder's 30 s sleep ended
    finally:
        holder.kill()
        holder.join(10)


def test_two_slots_let_two_actors_step_at_once_never_three(tmp_path):
    """A node with cores for two actors' threads (``slots=2``): two turns overlap, a third waits."""
    spans = _run(f"test-slots-{tmp_path}", True, tmp_path, n=4, procs=3, slots=2)
    assert len(spans) == 12
    events = sorted([(a, 1) for _, a, _ in spans] + [(b, -1) for _, _, b in spans], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak == 2, peak


def _hold_for(key: str, ready, seconds: float = 600.0) -> None:
    turns = CoreTurns(key, True)
    with turns.turn():
        ready.set()
        time.sleep(seconds)
    turns.close()


def _spawned(target, key: str, *args):
    """A process running ``target(key, event, *args)`` and the event it sets once it holds (or held) the turn."""
    ctx = mp.get_context("spawn")
    event = ctx.Event()
    process = ctx.Process(target=target, args=(key, event, *args))
    process.start()
    return process, event


def test_a_waiter_is_told_once_before_it_blocks_and_not_when_the_turn_is_free(tmp_path):
    """``turn(on_wait=...)``: a trainer drops the rows it holds before it waits for another actor's step."""
    key = f"test-on-wait-{tmp_path}"
    holder, ready = _spawned(_hold_for, key, 1.0)
    try:
        assert ready.wait(60)
        turns, told = CoreTurns(key, True, hold=0.0), []
        with turns.turn(on_wait=lambda: told.append(time.monotonic())):
            took = time.monotonic()
        assert len(told) == 1 and took - told[0] > 0.2, (told, took)  # told first, then it waited for the holder
        holder.join(30)
        with turns.turn(on_wait=lambda: told.append(time.monotonic())):
            pass
        assert len(told) == 1  # the turn was free: nothing to drop
        turns.close()
    finally:
        holder.kill()
        holder.join(10)


def test_unshared_turns_do_not_wait(tmp_path):
    spans = _run(f"test-{tmp_path}", False, tmp_path)
    assert any(start < end for (_, _, end), (_, start, _) in zip(spans, spans[1:]))  # the two ran at once


def test_a_dead_holder_frees_the_turn(tmp_path):
    key = f"test-dead-{tmp_path}"
    holder, ready = _spawned(_hold_for, key)
    assert ready.wait(60)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    t0 = time.monotonic()
    with CoreTurns(key, True).turn():
        pass
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("cpus, shared", [(1, None), (64, True)])
def test_turns_are_shared_only_when_the_modules_threads_exceed_the_cores(cpus, shared):
    cfg = load_config(None, TINY_NORB + [f"resources.cpus_per_module={cpus}"])
    expect = cpus * len(cfg.stack) > node_cores() if shared is None else shared
    turns = CoreTurns.for_module(cfg, "k", torch.device("cpu"))
    assert turns.shared is expect and turns.slots == max(1, node_cores() // cpus)
    assert CoreTurns.for_module(cfg, "k", torch.device("meta")).shared is False  # an accelerator: no CPU turns


def test_a_lone_actor_does_not_yield(tmp_path):
    # The holder yields after a long turn only when another actor waits: checked on the waiting signal itself
    # (a shared lock on the queue file), not on a timing that a loaded machine would blur.
    key = f"test-lone-{tmp_path}"
    turns, waiter = CoreTurns(key, True), CoreTurns(key, True)
    with turns.turn():
        assert turns._others_waiting() is False  # nobody waits: no yield
        queue = os.open(waiter.path + ".queue", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(queue, fcntl.LOCK_SH)  # what a waiting actor holds while it blocks on the turn
        assert turns._others_waiting() is True
        fcntl.flock(queue, fcntl.LOCK_UN)
        os.close(queue)
        assert turns._others_waiting() is False
    turns.close()


def test_a_turn_inside_a_turn_keeps_the_outer_one(tmp_path):
    key = f"test-nested-{tmp_path}"
    outer, other = CoreTurns(key, True, hold=0.0, idle=0.2), CoreTurns(key, True)
    with outer.turn():
        with outer.turn():
            pass
        # the inner exit must not have released the node's turn: another actor still cannot take it
        other._fd = os.open(other.path, os.O_RDWR | os.O_CREAT, 0o600)
        with pytest.raises(BlockingIOError):
            fcntl.flock(other._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    deadline = time.monotonic() + 10
    while True:  # free once the outer turn has stayed unused for its idle time
        try:
            fcntl.flock(other._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            assert time.monotonic() < deadline, "the idle turn was never handed back"
            time.sleep(0.05)
    other.close()


def _short_turns_in_a_series(key: str, n: int, out: str) -> None:
    turns = CoreTurns(key, True, hold=0.0)
    with open(out, "a") as f, turns.series(seconds=30):
        for _ in range(n):
            with turns.turn():
                f.write(f"{os.getpid()} {time.monotonic()} {time.monotonic()}\n")
                f.flush()
                time.sleep(0.06)
    turns.close()


def test_a_series_of_short_turns_keeps_the_cores_between_them(tmp_path):
    key, out = f"test-series-{tmp_path}", str(tmp_path / "series.txt")
    ctx = mp.get_context("spawn")
    long = ctx.Process(target=_take_turns, args=(key, True, 4, out))
    short = ctx.Process(target=_short_turns_in_a_series, args=(key, 6, out))
    long.start()
    short.start()
    for p in (long, short):
        p.join(60)
        assert p.exitcode == 0
    owners = [pid for pid, _, _ in _intervals(out)]
    # the six short turns come in one run (the series keeps the turn), not one between each long turn
    runs = [owners[0]] + [b for a, b in zip(owners, owners[1:]) if a != b]
    assert runs.count(short.pid) == 1 and owners.count(short.pid) == 6


def _turn_files(turns: CoreTurns) -> list[str]:
    folder, prefix = os.path.split(turns.path)
    return sorted(n for n in os.listdir(folder) if n.startswith(prefix))


def test_the_last_actor_out_removes_the_turn_files(tmp_path):
    key = f"test-last-out-{tmp_path}"
    first, second = CoreTurns(key, True, slots=2), CoreTurns(key, True, slots=2)
    with first.turn():
        pass
    with second.turn():
        pass
    prefix = os.path.basename(first.path)
    assert _turn_files(first) == [prefix, prefix + ".1", prefix + ".members", prefix + ".queue"]
    first.close()
    assert len(_turn_files(first)) == 4  # the second actor still takes turns: its files stay
    with second.turn():
        pass
    second.close()
    assert _turn_files(first) == []  # a run leaves nothing in the temp directory
    with first.turn():  # a later turn (a restarted actor) opens them again
        pass
    assert len(_turn_files(first)) == 4
    first.close()
    assert _turn_files(first) == []


def test_a_dead_runs_turn_files_are_swept_and_a_live_runs_kept(tmp_path):
    folder = str(tmp_path / "tmp")
    os.mkdir(folder)
    old = time.time() - 7200
    dead = [os.path.join(folder, "isostack-turns-" + "a" * 16 + s) for s in ("", ".queue", ".members")]
    legacy = [os.path.join(folder, "isostack-turns-" + "b" * 16 + s) for s in ("", ".queue")]  # before .members
    live = [os.path.join(folder, "isostack-turns-" + "c" * 16 + s) for s in ("", ".queue", ".members")]
    recent = [os.path.join(folder, "isostack-turns-" + "d" * 16 + s) for s in ("", ".queue", ".members")]
    other = os.path.join(folder, "not-ours")
    for p in dead + legacy + live + recent + [other]:
        open(p, "w").close()
        if p not in recent:
            os.utime(p, (old, old))
    held = os.open(live[-1], os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_SH)  # an actor of a run that has been going for two hours
    try:
        gone = sweep_stale_turns(folder)
    finally:
        os.close(held)
    assert sorted(gone) == sorted(dead + legacy)
    assert sorted(os.listdir(folder)) == sorted(os.path.basename(p) for p in live + recent + [other])


class _PreemptedLock:
    """A lock whose holder, in the thread that made it, is preempted right after each release: the worst moment
    for whatever waits on it (here the idle timer's thread)."""

    def __init__(self) -> None:
        import threading

        self._lock, self._owner = threading.Lock(), threading.get_ident()

    def __enter__(self):
        self._lock.acquire()

    def __exit__(self, *exc):
        import threading

        self._lock.release()
        if threading.get_ident() == self._owner:
            time.sleep(0.3)


def test_a_kept_turn_taken_up_as_its_idle_timer_fires_stays_held(tmp_path):
    # The turn is kept after a step; the next turn (a held-out loss at the epoch's end) enters just as the idle
    # timer finds the turn quiet: the timer must see it in use, not hand it back under the running turn.
    turns = CoreTurns(f"test-due-{tmp_path}", True, hold=60.0, idle=0.1)
    with turns.turn():
        pass
    turns._state = _PreemptedLock()  # the timer, due in 0.1 s, runs while this thread is preempted
    with turns.turn():
        assert turns._held_since is not None and turns._fd is not None
    turns.close()
