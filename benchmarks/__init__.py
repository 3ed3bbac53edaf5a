"""Measured comparisons (DESIGN "Performance: what is measured"): every number is a ratio of two sides
measured back to back in one process tree, so a shared, noisy machine moves both sides together.

Each comparison module has ``run(quick: bool, workdir: str) -> dict`` returning::

    {"rows": [Row, ...], "details": {...}}   # details: the raw measurements behind the rows

and is run by ``python -m benchmarks``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import asdict, dataclass

COMPARISONS = ["store_io", "throughput", "compute", "memory", "schedules", "growth", "compare_objectives", "codecs"]


@dataclass
class Row:
    """One line of the Performance table."""

    comparison: str
    measure: str                 # what the two sides are, e.g. "write MB/s"
    isostack: float | None       # the isostack side
    baseline: float | None       # the reference side
    ratio: float | None          # isostack / baseline (or as stated in `measure`)
    goal: str = ""               # the goal, e.g. ">= 0.5"; empty when the row is context only
    met: bool | None = None      # None when there is no goal for this row
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def goal_row(comparison: str, measure: str, isostack: float, baseline: float, *, at_least: float | None = None,
             at_most: float | None = None, note: str = "") -> Row:
    """A row whose ratio is isostack / baseline, checked against the goal where there is one."""
    ratio = isostack / baseline if baseline else None
    goal, met = "", None
    if ratio is not None and at_least is not None:
        goal, met = f">= {at_least:g}", ratio >= at_least
    if ratio is not None and at_most is not None:
        goal, met = f"<= {at_most:g}", ratio <= at_most
    return Row(comparison, measure, isostack, baseline, ratio, goal, met, note)


@contextlib.contextmanager
def quiet(log_path: str):
    """Send stdout/stderr of the block (progress lines of runs) to ``log_path`` instead of the table."""
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


def cpu_threads() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def python() -> str:
    return sys.executable


def regrouped_stack(raw: dict, cuts) -> dict:
    """The ``stack`` of the raw config ``raw`` with the layers of all its modules, in order, cut into modules
    m1, m2, ... at the layer indices ``cuts``; every module gets the first module's objective (less its
    ``pair_views`` above the first: views are of images). norb-synthetic cut at (2, 4, 6) is the four-module stack
    (conv-pool, conv-pool, conv-pool, flatten-linear) it had before it became two modules."""
    layers = [layer for module in raw["stack"].values() for layer in module["layers"]]
    objective = next(iter(raw["stack"].values()))["objective"]
    above = {k: v for k, v in objective.items() if k != "pair_views"}
    bounds = [0, *cuts, len(layers)]
    return {f"m{i + 1}": {"layers": layers[a:b], "objective": objective if i == 0 else above}
            for i, (a, b) in enumerate(zip(bounds, bounds[1:]))}
