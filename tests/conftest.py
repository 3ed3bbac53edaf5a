"""Shared fixtures: a tiny config, the tier markers, and a short-lived local Ray."""

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


@pytest.fixture
def tiny_overrides():
    """Overrides that shrink the default preset to seconds of work."""
    return TINY_NORB + ["train.epochs=2", "train.batch_size=32", "schedule.poll_seconds=0.1"]


@pytest.fixture(scope="session")
def ray_local():
    """A 4-CPU local Ray for the `ray` tier (actors oversubscribe the 2 cores)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=128 * 1024 * 1024, log_to_driver=False)
    yield ray
    ray.shutdown()
