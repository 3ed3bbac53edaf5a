"""One epoch's order and partners, decided from metadata alone before any tensor is read.

Pure numpy. The units (row groups) holding training rows are permuted with the epoch's generator, and
the epoch reads them through a *sliding* window of ``K`` units (as many as ``buffer`` rows hold): unit
``i`` of the permutation joins the window when unit ``i - K`` leaves it, and its rows are spread at
random over the stretch of the epoch where it is in the window. Formally each unit gets a key span
``[start, end)`` (``start = max(0, i + 1 - K, i // 2)``; ``end = i + 1``, and ``n`` for the last ``K``
units so the epoch closes on a full window), each of its rows a key drawn uniformly in that span, and the
epoch's order is the rows sorted by key. ``K`` units span every unit-length stretch of keys after a
ramp-up of ``K - 2`` stretches (``j + 2`` units span stretch ``j``), so a batch mixes rows of ``K``
units (all of them, in one full shuffle, when the version fits the buffer: no ramp-up), a unit is read
once and released after its last row, and no point of the epoch, its first batch included, waits for a
whole window to be read (WebDataset's and MosaicML Streaming's shard shuffle + shuffle buffer,
without the refill stalls of disjoint windows). The order is a function of (seed, epoch), so a
resumed trainer skips to batch ``k`` without reading the units before it.

Partners (``same_instance``, ``neighbor_pose``) of the rows keyed in ``[j, j + 1)`` are drawn among
the rows of the ``K`` units spanning that stretch, with the same rule as in memory
(``pairing.partner_index``). A row with no partner of the right kind there gets the partner a draw over
all training rows gives, and the feed fetches that row from its unit (``fetched``, ``outside``): every
row gets a partner of its kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.nn.pairing import min_step, partner_index

METADATA_PAIRINGS = ("same_instance", "neighbor_pose")


@dataclass
class EpochPlan:
    order: np.ndarray            # (M,) global rows in the epoch's order
    partner: np.ndarray | None   # (M,) the partner row of order[i], or None (pairing needs none)
    outside: np.ndarray | None   # (M,) bool: partner[i] lies outside the window (fetched from its unit)
    units: np.ndarray            # (U,) units the epoch reads, in the order it first needs them
    first_use: np.ndarray        # (U,) position in ``order`` of the first batch row (or partner) in that unit
    last_use: np.ndarray         # (U,) position of the last
    window_units: int            # K: units in the sliding window
    batch_size: int
    n_batches: int

    @property
    def fetched(self) -> int:
        return int(self.outside.sum()) if self.outside is not None else 0

    @property
    def fetch_rate(self) -> float:
        return self.fetched / len(self.order) if len(self.order) else 0.0


def plan_epoch(meta: dict[str, np.ndarray], rows: np.ndarray, unit: np.ndarray, *, pairing: str | None,
               batch_size: int, buffer: int, rng: np.random.Generator, max_steps: int | None = None) -> EpochPlan:
    """The epoch over ``rows`` (global ids); ``meta`` holds label/instance/azimuth/elevation/lighting (N,) arrays,
    ``unit`` the unit of each global row. Batches are consecutive slices of ``order``; a short last batch is
    dropped unless it is the only one (as in memory)."""
    rows = np.asarray(rows, dtype=np.int64)
    units = np.unique(unit[rows])
    units = units[rng.permutation(len(units))]
    index = np.full(int(unit.max()) + 1 if len(unit) else 0, -1, dtype=np.int64)
    index[units] = np.arange(len(units))
    slot = index[unit[rows]]                         # (M,) each row's unit's place in the permutation
    k = window_units(np.bincount(unit)[units], buffer)  # rows a unit holds in memory, test rows too
    start, end = key_spans(len(units), k)
    key = start[slot] + (end[slot] - start[slot]) * rng.random(len(rows))
    order = rows[np.argsort(key, kind="stable")]
    partner = outside = None
    if pairing in METADATA_PAIRINGS and len(order):
        partner, outside = _partners(pairing, meta, order, np.floor(np.sort(key)).astype(np.int64),
                                     index[unit[order]], start, end, rng)
    n_batches = len(order) // batch_size if len(order) >= batch_size else 1
    if max_steps is not None:
        n_batches = min(n_batches, max_steps)
    used = min(len(order), n_batches * batch_size)
    first, last = _uses(index, unit, order[:used], None if partner is None else
                        np.where(outside[:used], -1, partner[:used]), len(units))
    need = np.flatnonzero(last >= 0)
    by_first = need[np.argsort(first[need], kind="stable")]
    return EpochPlan(order, partner, outside, units[by_first], first[by_first], last[by_first], k, batch_size,
                     n_batches)


def window_units(counts: np.ndarray, buffer: int) -> int:
    """The most consecutive units (of the permutation) whose rows (``counts``) fit ``buffer``; at least one."""
    n = len(counts)
    csum = np.concatenate([[0], np.cumsum(counts)])
    lo, hi = 1, max(1, n)
    while lo < hi:  # the largest k whose heaviest run of k units fits (monotone in k)
        mid = (lo + hi + 1) // 2
        if (csum[mid:] - csum[:-mid]).max() <= buffer:
            lo = mid
        else:
            hi = mid - 1
    return lo


def key_spans(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of each unit's key span: ``K`` units span every [j, j + 1) (all ``n`` when ``n <= K``).

    When the version is larger than the window, the window ramps up: stretch ``j`` is spanned by
    ``min(K, j + 2)`` units (unit ``i`` starts no earlier than ``i // 2``), so the first batch waits for two
    units, not a whole window, and from stretch ``K - 2`` on every stretch mixes ``K``. A version that fits
    the window keeps its one full shuffle."""
    i = np.arange(n)
    start = np.maximum(0, i + 1 - k)
    if n > k:
        start = np.maximum(start, i // 2)
    end = np.where(i < n - k, i + 1, n)
    return start.astype(np.float64), end.astype(np.float64)


def _uses(index, unit, order, partner, n_units) -> tuple[np.ndarray, np.ndarray]:
    """(first, last) position in ``order`` at which each unit's rows (or in-window partners: ``partner`` >= 0)
    are needed; -1 for a unit never needed."""
    pos = np.arange(len(order))
    slots, at = [index[unit[order]]], [pos]
    if partner is not None:
        ok = partner >= 0
        slots.append(index[unit[partner[ok]]])
        at.append(pos[ok])
    slots, at = np.concatenate(slots), np.concatenate(at)
    first = np.full(n_units, np.iinfo(np.int64).max, dtype=np.int64)
    last = np.full(n_units, -1, dtype=np.int64)
    np.minimum.at(first, slots, at)
    np.maximum.at(last, slots, at)
    return first, last


def _pick(kind: str, meta: dict[str, np.ndarray], rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    local = partner_index(kind, label=meta["label"][rows], instance=meta["instance"][rows],
                          azimuth=meta["azimuth"][rows], elevation=meta["elevation"][rows],
                          lighting=meta["lighting"][rows], rng=rng)
    return rows[local]


def _partners(kind, meta, order, slab, slot, start, end, rng) -> tuple[np.ndarray, np.ndarray]:
    """(partner of each row of ``order``, whether it lies outside the window): drawn per unit-length stretch of
    keys (``slab``) among the rows of the units spanning it, else over every training row. Consecutive
    stretches spanned by the same units (all of them, when the version fits the window) draw once; otherwise
    the draws cost about K times the epoch's rows (``partner_index`` is ~0.1 s per 50,000 rows)."""
    anywhere = np.empty(int(order.max()) + 1, dtype=np.int64)
    anywhere[order] = _pick(kind, meta, order, rng)  # partners over every training row: the fallback
    good = _right_kind(kind, meta, order)
    partner = np.empty(len(order), dtype=np.int64)
    outside = np.zeros(len(order), dtype=bool)
    by_slot = np.argsort(slot, kind="stable")
    slot_starts = np.searchsorted(slot[by_slot], np.arange(len(start) + 1))
    slabs = int(slab.max()) + 1
    bounds = np.searchsorted(slab, np.arange(slabs + 1))
    # the units spanning stretch j change only where some unit starts or ends: stretches between are one draw
    cuts = np.unique(np.concatenate([[0, slabs], start, end]).astype(np.int64))
    cuts = cuts[(cuts >= 0) & (cuts <= slabs)]
    for j, last in zip(cuts[:-1], cuts[1:]):
        lo, hi = bounds[j], bounds[last]
        if lo == hi:
            continue
        live = np.flatnonzero((start <= j) & (end >= last))  # the K units spanning these stretches
        pool = order[np.concatenate([by_slot[slot_starts[s]:slot_starts[s + 1]] for s in live])]
        sorter = np.argsort(pool)
        mine = order[lo:hi]
        got = _pick(kind, meta, pool, rng)[sorter[np.searchsorted(pool, mine, sorter=sorter)]]
        ok = good(mine, got) | ~good(mine, anywhere[mine])  # a window partner is kept unless a better one exists
        partner[lo:hi] = choice = np.where(ok, got, anywhere[mine])
        outside[lo:hi] = ~np.isin(choice, pool)
    return partner, outside


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
