"""Faults injected into real processes: killed actors, killed publishers, full disks, NaN losses, racing retrains.

Each test drives the real CLI (joining the test process's local Ray, tests/conftest.py) on a tiny 2-module stack and
checks that the run completes or fails with a cause naming the module, and
that nothing committed is damaged.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_NORB
from tests.test_run_e2e import tree_hashes

pytestmark = [pytest.mark.slow, pytest.mark.ray]

STACK = {
    "name": "faults",
    "dataset": {"kind": "synthetic_norb"},
    "stack": {
        "m1": {"layers": [{"type": "conv", "channels": 8, "kernel": 5}, {"type": "maxpool", "kernel": 2}],
               "objective": {"kind": "infonce_pair", "pairing": "same_instance"}},
        "m2": {"layers": [{"type": "global_pool"}, {"type": "linear", "features": 16}],
               "objective": {"kind": "infonce_pair", "pairing": "same_instance"}},
    },
    "train": {"epochs": 3, "batch_size": 32},
    "schedule": {"poll_seconds": 0.1},
}


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(STACK))
    return path


@pytest.fixture(scope="module")
def finished_store(tmp_path_factory) -> Path:
    """A store holding one finished run ``done`` of STACK (2 epochs at lr 0.001, no final stage), trained once for
    the tests that retrain a finished run: each works on a copy of it (``copy_store``)."""
    base = tmp_path_factory.mktemp("finished")
    config = base / "tiny.yaml"
    config.write_text(yaml.safe_dump(STACK))
    cli("run", str(config), *sets(["train.epochs=2", "train.lr=0.001"]), "--store", str(base / "store"),
        "--run-id", "done", "--no-final-stage")
    return base / "store"


def copy_store(finished: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(finished, store)
    return store


def cli(*args, env=None, timeout=300, check=True):
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"isostack {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def sets(extra=()):
    return [a for item in [*TINY_NORB, *extra] for a in ("--set", item)]


def fault_env(tmp_path, spec):
    folder = tmp_path / "faults"
    folder.mkdir(exist_ok=True)
    return {"ISOSTACK_FAULTS": spec, "ISOSTACK_FAULTS_DIR": str(folder)}


def manifests(root: Path, stage: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "store" / stage).glob("v*/_MANIFEST.json"))]


def test_actor_killed_mid_training_resumes_from_its_checkpoint(config, tmp_path):
    store = tmp_path / "store"
    args = [sys.executable, "-m", "pipeline", "run", str(config), *sets(["stack.m1.train.epochs=12"]),
            "--store", str(store), "--run-id", "kill", "--no-final-stage"]
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    status = store / "kill" / "status" / "m1.json"
    deadline, victim = time.time() + 240, None
    while time.time() < deadline:
        if status.exists():
            st = json.loads(status.read_text())
            if st["epoch"] >= 2 and st["state"] == "training":
                victim = st["pid"]
                os.kill(victim, signal.SIGKILL)
                break
        time.sleep(0.05)
    out, _ = driver.communicate(timeout=300)
    assert victim is not None, out
    assert driver.returncode == 0, out
    root = store / "kill"
    final = json.loads(status.read_text())
    assert final["state"] == "final" and final["pid"] != victim and final["restarts"] >= 1
    # It resumed from its checkpoint: the restarted attempt's first checkpoint continues the step count of the
    # one before the kill (a fresh start would restart at step 0 and rewrite epoch 1).
    ckpts = {int(p.stem): json.loads(p.read_text()) for p in (root / "checkpoints" / "m1").glob("*.json")}
    assert sorted(ckpts) == list(range(1, 13))
    resumed = [e for e in sorted(ckpts) if ckpts[e].get("restarts", 0) >= 1]
    assert resumed and resumed[0] >= 3, "the restarted actor did not continue from its epoch-2 checkpoint"
    assert ckpts[resumed[0]]["step"] > ckpts[resumed[0] - 1]["step"] > 0
    assert all(ckpts[e]["restarts"] == 0 for e in range(1, resumed[0]))
    # Each epoch produced at most one committed version, and the final is the last.
    produced = [m["producer"]["epoch"] for m in manifests(root, "m1")]
    assert len(produced) == len(set(produced)) and manifests(root, "m1")[-1]["final"]
    # The killed attempt's uncommitted version was removed by the driver: the finished run verifies clean.
    verify = cli("verify", "kill", "--store", str(store), check=False)
    assert verify.returncode == 0 and "no leftovers" in verify.stdout, verify.stdout


def test_publisher_killed_before_manifest_leaves_an_invisible_version(config, tmp_path):
    store = tmp_path / "store"
    cli("run", str(config), *sets(), "--store", str(store), "--run-id", "orphan", "--no-final-stage",
        env=fault_env(tmp_path, "kill_before_manifest:m2"))
    root = store / "orphan"
    committed = {m["version"] for m in manifests(root, "m2")}
    dirs = {int(p.name[1:]) for p in (root / "store" / "m2").glob("v*")}
    # The killed publisher's number stays used (a gap), and the driver removed its uncommitted shards.
    assert dirs == committed and max(committed) > len(committed)
    assert "no leftovers" in cli("verify", "orphan", "--store", str(store)).stdout
    # A leftover made by hand, old enough to be past gc's grace period: verify names it (exit 0), gc removes it.
    leftover = root / "store" / "m2" / "v9000"
    leftover.mkdir()
    (leftover / "part-x.parquet").write_bytes(b"half")
    for p in (leftover / "part-x.parquet", leftover):
        os.utime(p, (time.time() - 7200, time.time() - 7200))
    verify = cli("verify", "orphan", "--store", str(store))
    assert "leftover store/m2/v9000" in verify.stdout
    before = tree_hashes(root, "store/m1", "checkpoints")
    cli("gc", "orphan", "--store", str(store))
    assert not leftover.exists()
    assert "no leftovers" in cli("verify", "orphan", "--store", str(store)).stdout
    # gc only removes orphans and versions past retention; committed finals and checkpoints are intact.
    assert tree_hashes(root, "checkpoints") == {k: v for k, v in before.items() if k.startswith("checkpoints")}
    assert {m["version"] for m in manifests(root, "m2") if m["final"]}


@pytest.mark.parametrize("spec, words", [("enospc_shard:m2", "No space left on device"),
                                         ("eacces_manifest:m2", "Permission denied")])
def test_publish_error_commits_nothing_and_names_the_path(config, tmp_path, spec, words):
    store = tmp_path / "store"
    proc = cli("run", str(config), *sets(), "--store", str(store), "--run-id", "full", "--no-final-stage",
               env=fault_env(tmp_path, spec), check=False)
    root = store / "full"
    assert proc.returncode != 0
    summary = json.loads((root / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert words in summary["cause"] and "store/m2/v0001" in summary["cause"]
    assert not manifests(root, "m2")                      # nothing of m2 committed
    assert manifests(root, "m1") and manifests(root, "m1")[-1]["final"]  # m1 intact
    verify = cli("verify", "full", "--store", str(store), check=False)
    assert verify.returncode == 0 and "no leftovers" in verify.stdout, verify.stdout + verify.stderr
    status = json.loads(cli("status", "full", "--store", str(store), "--json").stdout)
    assert status["status"] == "failed" and words in status["cause"]


def test_nan_loss_stops_the_module_and_fails_the_run_with_its_cause(config, tmp_path):
    store = tmp_path / "store"
    proc = cli("run", str(config), *sets(), "--store", str(store), "--run-id", "nan", env=fault_env(tmp_path, "nan_loss:m2:2"),
               check=False)
    root = store / "nan"
    assert proc.returncode != 0
    summary = json.loads((root / "summary.json").read_text())
    assert summary["status"] == "failed"
    cause = summary["cause"]
    assert "module m2" in cause and "epoch 2" in cause and "step 1" in cause and "nan" in cause
    assert summary["modules"]["m2"]["state"] == "failed"
    # The last good checkpoint (epoch 1) and m1's versions are kept.
    assert (root / "checkpoints" / "m2" / "0001.safetensors").exists()
    assert not (root / "checkpoints" / "m2" / "0002.json").exists()
    assert manifests(root, "m1")[-1]["final"]
    status = json.loads(cli("status", "nan", "--store", str(store), "--json").stdout)
    assert status["status"] == "failed" and "module m2" in status["cause"]
    assert "failed" in proc.stderr and "resume" in proc.stderr


def test_second_retrain_of_the_same_module_is_refused_naming_the_owner(finished_store, tmp_path):
    store = copy_store(finished_store, tmp_path)
    first = subprocess.Popen([sys.executable, "-m", "pipeline", "retrain", "done", "--module", "m2", "--store", str(store),
                              "--set", "train.epochs=20"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lease = store / "done" / "leases" / "m2.json"
    deadline = time.time() + 60
    while not lease.exists() and time.time() < deadline:
        time.sleep(0.05)
    owner = json.loads(lease.read_text())["owner"]
    second = cli("retrain", "done", "--module", "m2", "--store", str(store), check=False)
    assert second.returncode != 0 and owner in second.stderr and "being trained by" in second.stderr
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert not lease.exists()  # released when the first finished


def test_retrain_set_is_local_to_its_module_and_recorded(finished_store, tmp_path):
    store = copy_store(finished_store, tmp_path)  # run with train.epochs=2 and train.lr=0.001
    root = store / "done"
    cli("retrain", "done", "--module", "m2", "--store", str(store), "--set", "train.lr=0.005", "--set", "train.epochs=1")
    info = json.loads((root / "run.json").read_text())
    assert info["retrains"][-1]["module"] == "m2" and info["retrains"][-1]["generation"] == 1
    assert info["retrains"][-1]["overrides"] == ["train.lr=0.005", "train.epochs=1"]
    cfg = info["config"]
    assert cfg["stack"]["m2"]["train"]["lr"] == 0.005 and cfg["stack"]["m2"]["train"]["epochs"] == 1
    assert cfg["train"]["lr"] == 0.001 and cfg["train"]["epochs"] == 2  # the run's defaults: unchanged
    assert cfg["stack"]["m1"]["train"].get("lr") is None and cfg["stack"]["m1"]["train"].get("epochs") is None
    # The override took effect: m2's new final is its one-epoch generation.
    assert manifests(root, "m2")[-1]["final"] and manifests(root, "m2")[-1]["producer"] == {
        **manifests(root, "m2")[-1]["producer"], "generation": 1, "epoch": 1}
    # A later retrain of m1 trains with the run's settings (2 epochs at lr 0.001), not the ones given to m2.
    cli("retrain", "done", "--module", "m1", "--store", str(store))
    m1_final = manifests(root, "m1")[-1]
    assert m1_final["final"] and m1_final["producer"]["generation"] == 1 and m1_final["producer"]["epoch"] == 2
    info = json.loads((root / "run.json").read_text())
    assert [(r["module"], r["overrides"]) for r in info["retrains"]] == [
        ("m2", ["train.lr=0.005", "train.epochs=1"]), ("m1", [])]
    assert info["config"]["stack"]["m1"]["train"].get("lr") is None and info["config"]["train"]["lr"] == 0.001
