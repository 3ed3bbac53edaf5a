"""One epoch's order, windows and partners, decided from metadata alone before any tensor is read.

Pure numpy. The units (row groups) holding training rows are permuted with the epoch's generator
and packed into *windows* of at most ``buffer`` rows (a unit larger than the buffer is a window of
its own); rows are shuffled inside their window (WebDataset's shard shuffle + shuffle buffer,
MosaicML Streaming's seeded per-epoch order). The epoch's order is the windows one after another,
so it is a function of (seed, epoch) and a resumed trainer skips to batch ``k`` without reading
the windows before it.

Partners (``same_instance``, ``neighbor_pose``) are drawn inside the row's window with the same
rule as in memory (``pairing.partner_index``). A row whose window holds no partner of the right
kind gets the partner a draw over all training rows gives, and the feed fetches that row from its
unit: every row gets a partner of its kind; ``fetched`` counts these fallbacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.nn.pairing import min_step, partner_index

METADATA_PAIRINGS = ("same_instance", "neighbor_pose")


@dataclass
class EpochPlan:
    order: np.ndarray            # (M,) global rows in the epoch's order
    bounds: np.ndarray           # (W+1,) positions in ``order`` where each window starts, then M
    partner: np.ndarray | None   # (M,) the partner row of order[i], or None (pairing needs none)
    fetched: int                 # partners outside their row's window (read from their unit)
    batch_size: int
    n_batches: int

    @property
    def fetch_rate(self) -> float:
        return self.fetched / len(self.order) if len(self.order) else 0.0

    def window_of(self, position: int) -> int:
        return int(np.searchsorted(self.bounds, position, side="right") - 1)


def plan_epoch(meta: dict[str, np.ndarray], rows: np.ndarray, unit: np.ndarray, *, pairing: str | None,
               batch_size: int, buffer: int, rng: np.random.Generator, max_steps: int | None = None) -> EpochPlan:
    """The epoch over ``rows`` (global ids); ``meta`` holds label/instance/azimuth/elevation/lighting (N,) arrays,
    ``unit`` the unit of each global row. Batches are consecutive slices of ``order``; a short last batch is
    dropped unless it is the only one (as in memory)."""
    rows = np.asarray(rows, dtype=np.int64)
    units = np.unique(unit[rows])
    units = units[rng.permutation(len(units))]
    per_unit = {int(u): rows[unit[rows] == u] for u in units}
    windows, current, held = [], [], 0
    for u in units:
        n = len(per_unit[int(u)])
        if current and held + n > buffer:
            windows.append(np.concatenate(current))
            current, held = [], 0
        current.append(per_unit[int(u)])
        held += n
    if current:
        windows.append(np.concatenate(current))
    windows = [w[rng.permutation(len(w))] for w in windows]
    order = np.concatenate(windows) if windows else np.zeros(0, np.int64)
    bounds = np.cumsum([0] + [len(w) for w in windows])
    partner, fetched = None, 0
    if pairing in METADATA_PAIRINGS:
        partner, fetched = _partners(pairing, meta, rows, windows, rng)
    n_batches = len(order) // batch_size if len(order) >= batch_size else 1
    if max_steps is not None:
        n_batches = min(n_batches, max_steps)
    return EpochPlan(order, bounds, partner, fetched, batch_size, n_batches)


def _pick(kind: str, meta: dict[str, np.ndarray], rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    local = partner_index(kind, label=meta["label"][rows], instance=meta["instance"][rows],
                          azimuth=meta["azimuth"][rows], elevation=meta["elevation"][rows],
                          lighting=meta["lighting"][rows], rng=rng)
    return rows[local]


def _partners(kind, meta, rows, windows, rng) -> tuple[np.ndarray, int]:
    anywhere = np.empty(int(rows.max()) + 1 if len(rows) else 0, dtype=np.int64)
    anywhere[rows] = _pick(kind, meta, rows, rng)  # partners over every training row: the fallback
    good = _right_kind(kind, meta, rows)
    out, fetched = [], 0
    for w in windows:
        near = _pick(kind, meta, w, rng)
        ok = good(w, near) | ~good(w, anywhere[w])  # a window partner is kept unless a better one exists outside
        choice = np.where(ok, near, anywhere[w])
        fetched += int((~np.isin(choice, w)).sum())
        out.append(choice)
    return (np.concatenate(out) if out else np.zeros(0, np.int64)), fetched


def _right_kind(kind: str, meta: dict[str, np.ndarray], rows: np.ndarray):
    """A test ``good(a, b) -> bool mask``: is row ``b[i]`` a partner of kind ``kind`` for row ``a[i]``?

    same_instance: another row of the same (label, instance). neighbor_pose: the same object one step
    (the smallest gap over the training rows, as ``partner_index`` measures it) away in azimuth or
    elevation.
    """
    label, instance = meta["label"], meta["instance"]

    def same(a, b):
        return (a != b) & (label[a] == label[b]) & (instance[a] == instance[b])

    if kind == "same_instance":
        return same
    az, el = meta["azimuth"], meta["elevation"]
    az_step, el_step = min_step(np.mod(az[rows], 360.0), 360.0), min_step(el[rows], None)

    def neighbour(a, b):
        d_az = np.abs(np.mod(az[a] - az[b] + 180.0, 360.0) - 180.0)
        d_el = np.abs(el[a] - el[b])
        one_az = az_step is not None and np.isclose(d_az, az_step) & np.isclose(d_el, 0)
        one_el = el_step is not None and np.isclose(d_el, el_step) & np.isclose(d_az, 0)
        return same(a, b) & (np.asarray(one_az) | np.asarray(one_el))

    return neighbour
