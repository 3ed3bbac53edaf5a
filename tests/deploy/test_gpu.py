"""Module actors on GPUs: a tiny 2-module stack sharing one GPU (0.5 each). Skipped without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.ray, pytest.mark.own_ray, pytest.mark.slow]


def isostack(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=420,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, \
        f"isostack {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.parametrize("placement", ["none", "pack"])
def test_modules_train_on_a_shared_gpu(tmp_path, placement):
    sets = ["train.epochs=1", "resources.gpus_per_module=0.5", f"resources.placement={placement}"]
    isostack("run", "digits", *[a for s in sets for a in ("--set", s)], "--store", str(tmp_path), "--run-id", "gpu")
    report = json.loads(isostack("status", "gpu", "--store", str(tmp_path), "--json").stdout)
    for name, module in report["modules"].items():
        assert module["state"] == "final", (name, module)
        # e.g. "cuda:0 (NVIDIA H100 80GB HBM3, Ray GPU 0)": torch's device and the GPU Ray assigned
        assert module["device"].startswith("cuda:") and "Ray GPU" in module["device"], (name, module)
    summary = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert all(m["peak_memory_bytes"] > 0 for m in summary["modules"].values())  # CUDA max allocated
