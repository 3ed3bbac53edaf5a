"""The driver process never loads torch: planning, ingest and the final stage run in a child process, each module
in its actor, so while the modules train the driver holds a Ray driver's memory, not a trainer's.

Each check runs in a fresh interpreter (pytest itself has torch loaded).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_NORB

REPO = Path(__file__).resolve().parents[3]
HEAVY = ("torch", "torchvision")


def _python(script: str, *args: str, timeout: float) -> dict:
    """Run ``script`` in a fresh interpreter; it prints one line ``SEEN <json>`` last."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SEEN ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("SEEN "):])


_HEADER = f"""
import json, sys
HEAVY = {HEAVY!r}
def loaded():
    return sorted(m for m in HEAVY if m in sys.modules)
"""


def test_the_driver_and_cli_import_no_torch():
    seen = _python(_HEADER + """
import pipeline.cli, pipeline.run.driver, pipeline.run.scheduler
print("SEEN " + json.dumps(loaded()))
""", timeout=120)
    assert seen == []


def test_an_error_of_the_child_process_reaches_the_driver_whole(tmp_path):
    # smallnorb without its files fails in the plan, which runs in the child: the driver gets the same
    # ConfigError (key, message, fix) and still has no torch.
    seen = _python(_HEADER + """
from pipeline.errors import ConfigError
from pipeline.planning.config import load_config
from pipeline.run import driver
cfg = load_config("smallnorb", ["dataset.path=" + sys.argv[2]], sys.argv[1])
try:
    driver.prepare_run(cfg, "r")
    print("SEEN " + json.dumps({"raised": None}))
except ConfigError as e:
    print("SEEN " + json.dumps({"raised": type(e).__name__, "text": str(e), "torch": loaded()}))
""", str(tmp_path / "store"), str(tmp_path / "no-such-dir"), timeout=180)
    assert seen["raised"] == "ConfigError" and "dataset.path" in seen["text"] and "no-such-dir" in seen["text"]
    assert seen["torch"] == []
    assert not (tmp_path / "store" / "r" / "run.json").exists()


@pytest.mark.ray
@pytest.mark.own_ray  # the default path: the run starts its own local Ray
@pytest.mark.slow
def test_a_real_run_trains_and_evaluates_without_torch_in_the_driver(tmp_path):
    overrides = TINY_NORB + ["train.epochs=1", "train.batch_size=32", "schedule.poll_seconds=0.1",
                             "stack.m1.layers.0.channels=8", "stack.m1.layers.2.channels=16",
                             "stack.m2.layers.0.channels=16", "stack.m2.layers.3.features=16",
                             # the final stage's scores are what it checks, not its files or the raw baseline
                             "export.plots=false", "export.report=false", "export.model=false",
                             "evaluate.baselines=false"]
    seen = _python(_HEADER + """
from pipeline.planning.config import load_config
from pipeline.run import driver
seen = {"imported": loaded()}
train_modules = driver.train_modules
def watched(*args, **kwargs):  # the real scheduler; we only look at sys.modules when it returns
    statuses = train_modules(*args, **kwargs)
    seen["trained"] = loaded()
    seen["states"] = {n: s.state.value for n, s in statuses.items()}
    return statuses
driver.train_modules = watched
cfg = load_config(None, sys.argv[2:], sys.argv[1])
seen["rc"] = driver.run(cfg, run_id="light")
seen["finished"] = loaded()
print("SEEN " + json.dumps(seen))
""", str(tmp_path / "store"), *overrides, timeout=600)
    assert seen["rc"] == 0
    assert seen["states"] == {n: "final" for n in ("m1", "m2")}
    assert seen["imported"] == [] and seen["trained"] == [] and seen["finished"] == []
    summary = json.loads((tmp_path / "store" / "light" / "summary.json").read_text())
    # The final stage ran (in its child process) and merged its results into the driver's summary.
    assert summary["status"] == "finished" and "nearest_centroid" in summary["evaluation"]
