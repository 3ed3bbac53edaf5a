"""Smoke run of the benchmark harness at its smallest sizes: it runs and writes the ratios (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmarks_write_ratios(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "store_io,throughput",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| store I/O |" in proc.stdout and "| trainer throughput |" in proc.stdout
    (path,) = tmp_path.glob("*-quick.json")
    doc = json.loads(path.read_text())
    assert doc["quick"] is True and doc["machine"] and doc["timestamp"]
    store_io = doc["comparisons"]["store_io"]
    assert {"write_ratio", "read_ratio"} <= set(store_io["details"])
    for name in ("store_io", "throughput"):
        rows = doc["comparisons"][name]["rows"]
        assert rows and all(r["ratio"] is not None and r["ratio"] > 0 for r in rows)
        assert any(r["goal"] for r in rows)


def test_simulate_smoke_stl10_table():
    """The schedule simulation's STL-10 path at 3 epochs, with the FLOPs given (no model built, no Ray)."""
    from benchmarks.simulate import stl10

    flops = [{"name": f"m{i}", "forward_flops": f * 1e9, "in_bytes": b_in, "out_bytes": b_out}
             for i, (f, b_in, b_out) in enumerate([(5.4, 4096, 6.4e6), (8.2, 6.4e6, 3.2e6), (11.7, 3.2e6, 1.6e6)], 1)]
    rows = stl10.scenarios(flops, epochs=3)
    assert len(rows) == 12 and all(r["wall_h"] > 0 and r["bottleneck"] != "-" for r in rows)
    assert "| 8 (2/3/3) |" in stl10.table(rows)


def test_recipe_memory_sampler_sums_pss_over_the_process_tree(tmp_path):
    """A grandchild (python under sh) that touches 300 MB: the tree's peak PSS sees it, over 2+ processes."""
    from benchmarks.recipe import measured

    code = "import time; x = b'\\x01' * (300 << 20); time.sleep(2.0)"
    res = measured(["sh", "-c", f'"{sys.executable}" -c "{code}"; true'], str(tmp_path / "log"), timeout=60,
                   interval=0.2)
    assert res["rc"] == 0 and res["memory_samples"] >= 3
    assert res["peak_pss_bytes"] >= 300 << 20 and res["processes_at_peak"] >= 2
    assert res["largest_process_bytes"] >= 300 << 20
    # each process's own peak, named: the python grandchild holds the 300 MB, not the shell
    holder = max(res["process_peaks"], key=res["process_peaks"].get)
    assert res["process_peaks"][holder] >= 300 << 20 and "python" in holder
    # the split at the summed peak: the same grandchild holds most of it
    assert max(res["at_peak"].values()) >= 300 << 20 and sum(res["at_peak"].values()) == res["peak_pss_bytes"]


def test_recipe_counts_the_images_each_module_trained_on(tmp_path):
    """A module whose first epoch read a thinned intermediate version (40 of 100 images) is credited with 140
    images, not N x epochs; the recipe's comparison then has a row on that work beside the N x epochs one."""
    from benchmarks.recipe import rows, trained_images
    from pipeline.store import Store
    from workers.metric_log import MetricLog

    st = Store(str(tmp_path), "r")
    for name, per_epoch in (("m1", [(100, 10.0), (100, 20.0)]), ("m2", [(40, 4.0), (100, 10.0)])):
        log = MetricLog(st, name, 0)
        for epoch, (images, seconds) in enumerate(per_epoch, 1):
            log.record(f"{name}/samples_per_s", images / seconds, epoch=epoch, step=epoch)
            log.record(f"{name}/epoch_seconds", seconds, epoch=epoch, step=epoch)
            log.record(f"{name}/loss/heldout", None, epoch=epoch, step=epoch)
        log.write()
    assert trained_images(st, "m1") == 200 and trained_images(st, "m2") == 140 and trained_images(st, "m9") == 0

    side = {"img_per_s": 1.0, "train_span_s": 200.0, "wall_s": 210.0, "module_epochs": {"m1": 2, "m2": 2},
            "module_images": {"m1": 200, "m2": 140}, "peak_pss_bytes": 2 << 30, "largest_process_bytes": 1 << 30,
            "processes_at_peak": 5, "params": {"m1": 1, "m2": 2}, "load_average": {}}
    loop = {"img_per_s": 1.0, "seconds": 200.0, "peak_pss_bytes": 1 << 30, "largest_process_bytes": 1 << 30,
            "params": {"m1": 1, "m2": 2}, "load_average": {}}
    got = {r.measure: r for r in rows({"n": 100, "epochs": 2, "sides": {"async": side, "loop": loop}})}
    work = got["stl10-gim N=100, 2 ep: images trained per module per s, async vs loop"]
    assert work.isostack == 170 / 200 and work.baseline == 1.0 and abs(work.ratio - 0.85) < 1e-9
    assert "m2 140" in work.note
    assert "stepped" not in got["stl10-gim N=100, 2 ep: img/s, async vs single-process loop"].note
    side["clock_stepped"] = True  # a span read from wall-clock times came out longer than the CLI's own run
    got = {r.measure: r for r in rows({"n": 100, "epochs": 2, "sides": {"async": side, "loop": loop}})}
    assert "the CLI wall counted" in got["stl10-gim N=100, 2 ep: img/s, async vs single-process loop"].note


def test_recipe_data_reads_as_small_norb(tmp_path):
    from benchmarks.recipe import write_norb
    from pipeline.data import load_dataset
    from schemas.config import DatasetConfig

    write_norb(str(tmp_path), 30, 8)
    ds = load_dataset(DatasetConfig(kind="smallnorb", path=str(tmp_path), image_size=64))
    split = ds.meta.column("split").to_pylist()
    assert ds.images.shape == (38, 1, 64, 64) and split.count("train") == 30 and split.count("test") == 8
    assert len(set(ds.meta.column("sample_id").to_pylist())) == 38  # every row a distinct pose
    assert ds.images.std() > 20  # image-like values, not a constant
