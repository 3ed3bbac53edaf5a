"""The real CLI end to end on tiny data: run, status, retrain, resume after a killed driver, evaluate.

Each `isostack` call is a subprocess; they join the test process's local Ray (tests/conftest.py shared_ray),
as commands join a cluster's head.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_NORB, split_default_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TINY = TINY_NORB + ["train.epochs=2", "train.batch_size=32", "schedule.poll_seconds=0.1",
                    "stack.m1.layers.0.channels=8", "stack.m1.layers.2.channels=16", "stack.m2.layers.0.channels=16",
                    "stack.m2.layers.3.features=16"]
# The default's layers in three modules (a retrain of the middle one has a module below and one above it).
TINY_THREE = TINY_NORB + ["train.epochs=2", "train.batch_size=32", "schedule.poll_seconds=0.1",
                          "stack.m1.layers.0.channels=8", "stack.m2.layers.0.channels=16",
                          "stack.m3.layers.0.channels=16", "stack.m3.layers.3.features=16"]


def isostack(*args, timeout=420, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"isostack {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _sets(items):
    return [a for item in items for a in ("--set", item)]


def tree_hashes(root: Path, *prefixes: str) -> dict[str, str]:
    out = {}
    for prefix in prefixes:
        for path in sorted((root / prefix).rglob("*")):
            if path.is_file():
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    # m1 gets more epochs so its window is wide enough for the async overlap to be visible on tiny data, and
    # one settle epoch leaves m2 one of its two epochs to train on a non-final m1 version.
    config = split_default_config(tmp_path_factory.mktemp("config") / "three.yaml",
                                  TINY_THREE + ["stack.m1.train.epochs=10", "schedule.settle_epochs=1"])
    proc = isostack("run", str(config), "--store", str(store), "--run-id", "e2e")
    return store, store / "e2e", proc


def test_run_trains_every_module_on_its_own_actor(finished_run):
    store, root, proc = finished_run
    summary = json.loads((root / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert list(summary["modules"]) == ["m1", "m2", "m3"]
    for name, m in summary["modules"].items():
        assert m["final_version"] >= 1 and m["epochs"] >= 2 and m["samples_per_second"] > 0
        for key in ("final_loss", "train_seconds", "peak_memory_bytes", "started_at", "finished_at", "node"):
            assert m[key] is not None, (name, key)
    # Each module ran in its own actor process.
    pids = {json.loads((root / "status" / f"{n}.json").read_text())["pid"] for n in summary["modules"]}
    assert len(pids) == 3
    # async: m2 started training before m1 was final (the windows overlap), on a non-final m1 version.
    mods = summary["modules"]
    assert mods["m2"]["started_at"] <= mods["m1"]["finished_at"]
    first = json.loads((root / "checkpoints" / "m2" / "0001.json").read_text())
    assert first["upstream_version"] < mods["m1"]["final_version"]
    assert "nearest centroid" in proc.stdout


def test_load_encoder_reproduces_stored_top_activations(finished_run):
    import numpy as np
    import torch

    from pipeline import load_encoder
    from pipeline.store import Store

    store, root, _ = finished_run
    encoder = load_encoder("e2e", str(store))
    st = Store(str(store), "e2e", create=False)
    top = list(json.loads((root / "summary.json").read_text())["modules"])[-1]
    top_reader = st.read(top, st.final(top).version)
    stored, ids = top_reader.tensor(), top_reader.meta.column("sample_id").to_numpy()
    # Each top row's own input image, matched by sample_id: stages store rows in different orders.
    (batch,) = st.read("input", st.final("input").version).batches(len(ids), sample_ids=ids, dtype=torch.uint8)
    pixels = batch.x
    with torch.inference_mode():
        again = encoder(pixels)
    # float16 storage: agreement within its rounding
    assert torch.allclose(again, stored, atol=2e-3 + 1e-3 * float(stored.abs().max()), rtol=1e-2)
    emb = encoder.embed(pixels[:4])
    assert emb.shape == (4, stored.shape[1]) and np.isfinite(emb.numpy()).all()


def test_status_json_reports_final_modules(finished_run):
    store, root, _ = finished_run
    report = json.loads(isostack("status", "e2e", "--store", str(store), "--json").stdout)
    assert [m["state"] for m in report["modules"].values()] == ["final"] * 3
    assert not any(m["stale"] for m in report["modules"].values())


def test_verify_passes_on_a_finished_run(finished_run):
    store, _, _ = finished_run
    assert "ok" in isostack("verify", "e2e", "--store", str(store)).stdout


def test_retrain_touches_only_its_module_and_marks_above_stale(finished_run):
    store, root, _ = finished_run
    before = tree_hashes(root, "store/m1", "store/m3", "store/input", "checkpoints/m1", "checkpoints/m3")
    old_final = json.loads(isostack("status", "e2e", "--store", str(store), "--json").stdout)["modules"]["m2"]["final_version"]
    isostack("retrain", "e2e", "--module", "m2", "--store", str(store))
    after = tree_hashes(root, "store/m1", "store/m3", "store/input", "checkpoints/m1", "checkpoints/m3")
    assert before == after
    report = json.loads(isostack("status", "e2e", "--store", str(store), "--json").stdout)
    assert report["modules"]["m2"]["final_version"] > old_final
    assert report["modules"]["m3"]["stale"] and report["modules"]["m3"]["state"] == "stale"
    assert not report["modules"]["m1"]["stale"]


def test_evaluate_after_retrain_uses_the_new_version(finished_run):
    store, root, _ = finished_run
    isostack("retrain", "e2e", "--module", "m3", "--store", str(store))
    report = json.loads(isostack("status", "e2e", "--store", str(store), "--json").stdout)
    assert not report["modules"]["m3"]["stale"]
    proc = isostack("evaluate", "e2e", "--store", str(store))
    assert "nearest centroid (test)" in proc.stdout
    # the report on disk still holds the run's numbers: evaluate says so and how to refresh it, not where it is
    assert "report: " not in proc.stdout and "isostack export e2e" in proc.stdout, proc.stdout
    summary = json.loads((root / "summary.json").read_text())
    assert summary["evaluation"]["source"] == {"stage": "m3", "version": report["modules"]["m3"]["final_version"]}


def test_unknown_module_in_retrain_is_refused(finished_run):
    store, _, _ = finished_run
    proc = isostack("retrain", "e2e", "--module", "m9", "--store", str(store), check=False)
    assert proc.returncode != 0 and "no module 'm9'" in proc.stderr


@pytest.mark.own_ray  # the crash takes the run's own local Ray down with the driver
def test_resume_after_the_driver_is_killed(tmp_path):
    # resume ends with the final stage; its files and baseline are not what this test is about
    no_exports = ["export.plots=false", "export.report=false", "export.model=false", "evaluate.baselines=false"]
    args = [sys.executable, "-m", "pipeline", "run", *_sets(TINY + ["train.epochs=3"] + no_exports), "--store", str(tmp_path),
            "--run-id", "killed", "--no-final-stage"]
    driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    root = tmp_path / "killed"
    deadline = time.time() + 300
    while time.time() < deadline and not list((root / "checkpoints" / "m1").glob("*.json")):
        time.sleep(0.5)
    # Kill the driver and everything it started (its own local Ray), as a crash would.
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    summary = root / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["status"] != "finished"
    isostack("resume", "killed", "--store", str(tmp_path))
    done = json.loads(summary.read_text())
    assert done["status"] == "finished"
    assert all(m["final_version"] for m in done["modules"].values())


def test_final_stage_outputs(finished_run):
    import duckdb

    store, root, proc = finished_run
    summary = json.loads((root / "summary.json").read_text())
    ev = summary["evaluation"]
    for value in (ev["nearest_centroid"]["train_accuracy"], ev["nearest_centroid"]["test_accuracy"],
                  ev["linear_probe"]["test_accuracy"], ev["knn"]["test_accuracy"],
                  ev["baselines"]["raw_pixels"]["nearest_centroid"]["test_accuracy"]):
        assert 0.0 <= value <= 1.0
    assert set(summary["pose"]) >= {"azimuth_mae_deg", "elevation_mae_deg", "trustworthiness"}
    rows = duckdb.sql(f"select count(*), count(distinct sample_id), min(azimuth), max(azimuth) "
                      f"from read_parquet('{root / 'pose.parquet'}')").fetchall()[0]
    assert rows[0] == rows[1] > 0 and 0 <= rows[2] <= rows[3] < 360
    cols = duckdb.sql(f"select * from read_parquet('{root / 'embeddings.parquet'}') limit 1").columns
    assert cols == ["sample_id", "split", "label", "instance", "azimuth", "elevation", "lighting", "embedding"]
    html = (root / "report.html").read_text()
    assert "data:image/png;base64," in html and 'src="http' not in html
    for png in ("pose", "classes", "confusion", "loss"):
        assert (root / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    assert "nearest centroid (test)" in proc.stdout and "raw pixels" in proc.stdout and "report.html" in proc.stdout


def test_embed_command_writes_parquet(finished_run, tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    store, _, _ = finished_run
    images = np.random.default_rng(0).integers(0, 255, (5, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "new.npy", images)
    isostack("embed", "e2e", str(tmp_path / "new.npy"), "--store", str(store))
    table = pq.read_table(tmp_path / "new.embeddings.parquet")
    assert table.num_rows == 5 and table.column_names == ["index", "embedding"]
    np.save(tmp_path / "wrong.npy", images[:, :8, :8])
    proc = isostack("embed", "e2e", str(tmp_path / "wrong.npy"), "--store", str(store), check=False)
    assert proc.returncode != 0 and "8x8" in proc.stderr and "(N, 1, 16, 16)" in proc.stderr


@pytest.mark.own_ray
def test_on_shared_cores_a_waiting_module_ends_its_actor_and_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    # schedule.park_seconds=0: every module that waits for its upstream after an epoch parks (by default only a
    # wait expected to last a minute, as stl10-gim's modules' do). Threads over the cores: the modules share them. Each of
    # m1's versions takes 3 s to commit (an injected slow store): m2 waits for m1's final for tens of seconds.
    import pyarrow.parquet as pq

    per = len(os.sched_getaffinity(0)) // 2 + 1
    config = split_default_config(tmp_path / "three.yaml", TINY_THREE + [
        "stack.m1.train.epochs=8", "schedule.settle_epochs=1", "schedule.park_seconds=0",
        f"resources.cpus_per_module={per}", "resources.gpus_per_module=0"])
    monkeypatch.setenv("ISOSTACK_FAULTS", "slow_commit:m1")  # no marker directory: every commit of m1
    monkeypatch.delenv("ISOSTACK_FAULTS_DIR", raising=False)
    isostack("run", str(config), "--store", str(tmp_path / "store"), "--run-id", "parks", "--no-final-stage")
    root = tmp_path / "store" / "parks"
    summary = json.loads((root / "summary.json").read_text())
    assert summary["status"] == "finished"
    parked = {}
    for name, m in summary["modules"].items():
        status = json.loads((root / "status" / f"{name}.json").read_text())
        assert status["state"] == "final" and status["restarts"] == 0, (name, status)  # a park is not a crash
        assert m["epochs"] == (8 if name == "m1" else 2)
        rows = pq.read_table(root / "metrics" / f"{name}.parquet").to_pylist()
        parked[name] = [r["epoch"] for r in rows if r["name"] == f"{name}/parked"]
        last = json.loads((root / "checkpoints" / name / f"{m['epochs']:04d}.json").read_text())
        assert last["epochs_done"] == m["epochs"] and last["restarts"] == 0
    # m2 after its first epoch, once: its second is m1's final's, so m1's intermediate versions do not wake it
    assert parked["m1"] == [] and parked["m2"] == [1], parked
    assert not list(root.glob("checkpoints/*/parked.json"))  # each mark taken up as its module resumed
