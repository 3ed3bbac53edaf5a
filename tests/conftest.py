"""Shared fixtures: a tiny config, the tier markers, and the local Ray the `ray` tests' commands join."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("ISOSTACK_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "isostack"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_gpu = False
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


TINY_NORB = [
    "dataset.image_size=16", "dataset.instances=[0,1,4,6]", "dataset.azimuths=[0,3,6,9,12,15]",
    "dataset.elevations=[0,4,8]", "dataset.lightings=[0,3]",
]


def split_default_config(path, overrides=(), cuts=(2, 4)):
    """The default preset with its layers (conv-pool-conv-pool | conv-pool-flatten-linear) cut into modules at
    ``cuts`` (layer indices over the whole stack), written to ``path`` (a YAML file) with ``overrides`` applied.

    ``cuts=(2, 4)`` gives three modules, conv-pool | conv-pool | conv-pool-flatten-linear: for tests about a
    module with modules both below and above it (a retrain that leaves the one below alone and marks the one
    above stale, a middle module's final built on its upstream's final, placement over three nodes), which the
    default's two modules cannot show. Their layers by index: ``stack.m1.layers.0``, ``stack.m2.layers.0`` and
    ``stack.m3.layers.0`` are convs, ``stack.m3.layers.3`` the linear layer. ``cuts=(2, 4, 6)`` gives the four
    modules the default had before it became two.
    """
    import yaml

    from benchmarks import regrouped_stack
    from pipeline.planning.config import overridden_config, read_source

    raw, _ = read_source(None)
    raw["stack"] = regrouped_stack(raw, cuts)
    config = overridden_config(raw, list(overrides)).model_dump(mode="json", exclude_none=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def tiny_overrides():
    """Overrides that shrink the default preset to seconds of work."""
    return TINY_NORB + ["train.epochs=2", "train.batch_size=32", "schedule.poll_seconds=0.1"]


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray instance for a test module, as ``ray.init()`` starts one: the `isostack` commands of its
    `ray` tests join it through RAY_ADDRESS (as they would a cluster's head) instead of each starting and
    stopping an instance of its own, ~7 CPU-s and several seconds apiece. Per module, not per session: an idle
    instance still takes ~3 CPU-s a minute (its agents and the driver's threads), which the rest of the suite
    would pay. 16 CPUs: the largest test stack asks for 6 (actors share the real cores by workers.runtime's
    turns, not Ray's count)."""
    import logging

    import ray

    ray.init(address="local", num_cpus=16, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
             log_to_driver=False, logging_level=logging.WARNING, _system_config={"prestart_worker_first_driver": False})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _join_shared_ray(request):
    """RAY_ADDRESS for a `ray` test's commands: the shared instance, or none for an `own_ray` test (the commands
    start their own local instance, as a run without --address does)."""
    node = request.node
    if node.get_closest_marker("ray") is None:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        if node.get_closest_marker("own_ray") is not None:
            patch.delenv("RAY_ADDRESS", raising=False)
        else:
            patch.setenv("RAY_ADDRESS", request.getfixturevalue("shared_ray"))
        yield


@pytest.fixture(scope="module", autouse=True)
def _module_joins_shared_ray(request):
    """For a module's own fixtures (a finished run several tests read), which start before any test's."""
    yield from _join_shared_ray(request)


@pytest.fixture(autouse=True)
def _test_joins_shared_ray(request):
    yield from _join_shared_ray(request)
