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
