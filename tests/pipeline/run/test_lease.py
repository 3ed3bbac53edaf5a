"""Leases: one owner at a time, the owner named when refused, a lapsed lease taken over."""

from __future__ import annotations

import time

import pytest

from pipeline.errors import LeaseError
from pipeline.run.lease import module_lease
from pipeline.store import Store


def test_held_lease_refuses_a_second_owner_by_name(tmp_path):
    store = Store(str(tmp_path), "run")
    with module_lease(store, "m2") as owner:
        with pytest.raises(LeaseError) as err:
            with module_lease(store, "m2"):
                pass
        assert owner in err.value.message and "m2" in err.value.message
    assert not store.exists("leases/m2.json")


def test_expired_lease_of_a_crashed_owner_is_taken_over(tmp_path):
    store = Store(str(tmp_path), "run")
    store.write_json("leases/m2.json", {"owner": "crashed-host:pid1", "expires": time.time() - 1})
    with module_lease(store, "m2") as owner:
        assert store.read_json("leases/m2.json")["owner"] == owner


def test_leases_are_per_module(tmp_path):
    store = Store(str(tmp_path), "run")
    with module_lease(store, "m1"), module_lease(store, "m2"):
        assert store.exists("leases/m1.json") and store.exists("leases/m2.json")


def test_two_concurrent_takers_one_wins(tmp_path):
    # Takers released together from a barrier, on a free lease and then on a lapsed one: exactly one holds it.
    import threading

    store = Store(str(tmp_path), "run")
    for held in (None, {"owner": "crashed-host:pid1", "expires": time.time() - 1}):
        if held:
            store.write_json("leases/m2.json", held)
        gate, outcomes = threading.Barrier(6), []

        def take() -> None:
            gate.wait()
            try:
                with module_lease(store, "m2") as me:
                    outcomes.append(("held", me))
                    time.sleep(0.5)  # hold it while the others try
            except LeaseError as e:
                outcomes.append(("refused", e.message))

        threads = [threading.Thread(target=take) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert sorted(o[0] for o in outcomes) == ["held"] + ["refused"] * 5, outcomes
        winner = next(o[1] for o in outcomes if o[0] == "held")
        assert all(winner in o[1] for o in outcomes if o[0] == "refused")
        assert not store.exists("leases/m2.json")


def test_live_leases_name_the_owner_and_lapse(tmp_path):
    from pipeline.run.lease import live_leases

    store = Store(str(tmp_path), "run")
    store.write_json("leases/m3.json", {"owner": "gone", "expires": time.time() - 1})
    with module_lease(store, "m2") as owner:
        assert live_leases(store) == {"m2": owner}
    assert live_leases(store) == {}


def test_a_lease_of_a_dead_local_process_does_not_hold(tmp_path):
    # A driver killed with SIGKILL leaves its lease behind; `resume` must not wait out the TTL for it.
    import socket
    import subprocess

    from pipeline.run.lease import held_live, live_leases

    dead = subprocess.Popen(["true"])
    dead.wait()
    store = Store(str(tmp_path), "run")
    record = {"owner": f"{socket.gethostname()}:pid{dead.pid}:abc123", "expires": time.time() + 60}
    store.write_json("leases/m2.json", record)
    assert not held_live(record) and live_leases(store) == {}
    with module_lease(store, "m2") as me:  # taken over at once
        assert live_leases(store) == {"m2": me}
    # Another machine's owner cannot be checked: its lease holds until it expires.
    assert held_live({"owner": "elsewhere:pid1:abc", "expires": time.time() + 60})
