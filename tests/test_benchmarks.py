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
