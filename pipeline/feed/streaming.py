"""Train batches streamed from the store with bounded memory.

``StreamingBatches`` follows an ``EpochPlan``: it reads the units (row groups) of one window, keeps
them as read (no copy), gathers each batch by position from them in the window's shuffled order,
then moves on; ``readahead`` units of the next window are read in the background while the current
one trains (a bounded queue, so a slow trainer applies backpressure to the reader). Rows held at any
time: one window's units (at most ``feed.buffer_samples`` training rows, or one unit when a unit is
larger), the units read ahead, the partners the window lacks (read from their units), a carried tail
shorter than a batch and the prefetched batches. ``max_rows_held`` records the peak of the first four.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.feed.epoch import EpochPlan
from pipeline.feed.heap import keep_freed_batches
from pipeline.feed.source import Source


@dataclass
class TrainBatch:
    x: torch.Tensor                # (B, *shape) float32 on device
    x_pos: torch.Tensor | None     # positives, same shape, or None
    labels: torch.Tensor           # (B,) long on device
    groups: torch.Tensor | None    # (B,) pairing-group ids (same_instance: the object) or None


class StreamingBatches:
    """Batches ``start_step .. plan.n_batches`` of one epoch, read window by window."""

    def __init__(self, src: Source, plan: EpochPlan, *, device: torch.device, pairing: str | None,
                 start_step: int = 0, readahead: int = 2, prefetch: int = 2) -> None:
        self.src, self.plan, self.device, self.start_step = src, plan, device, start_step
        self.readahead, self.prefetch = max(0, readahead), max(1, prefetch)
        # Under same_instance every image of an object is a positive of every other: in-batch rows of the
        # same object are masked out of the negatives (the objective gets their group ids).
        self._groups = src.label * 100_003 + src.instance if pairing == "same_instance" else None
        self._pin = device.type == "cuda"
        self._held_lock = threading.Lock()
        self._held = 0
        self.max_rows_held = 0

    def __len__(self) -> int:
        return max(0, self.plan.n_batches - self.start_step)

    # ------------------------------------------------------------ rows held (for the bound and its test)

    def _hold(self, n: int) -> None:
        with self._held_lock:
            self._held += n
            self.max_rows_held = max(self.max_rows_held, self._held)

    # ------------------------------------------------------------ reading

    def _units_in_order(self, first_window: int):
        """(window, unit) in plan order from ``first_window`` on: the order the reader reads units."""
        for w in range(first_window, len(self.plan.bounds) - 1):
            rows = self.plan.order[self.plan.bounds[w]:self.plan.bounds[w + 1]]
            for u in np.unique(self.src.unit[rows]):  # a window is whole units, read in stored order
                yield w, int(u)

    def _read(self, u: int):
        rows, x = self.src.read_unit(u)
        self._hold(len(rows))
        return rows, x

    def _windows(self, first_window: int):
        """``(window, rows in window order, their positions, partners' positions or None, parts, part starts)``.

        A window is held as the unit tensors read (zero-copy views of what Parquet decoded) followed by
        the partners the window lacks (fetched from their units): positions index their concatenation,
        which is never made. Batches gather by position straight from the parts (``_gather``), as from a
        version held in memory, so the window costs no copy and no window-sized allocation.
        """
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="isostack-readahead") as pool:
            todo = iter(self._units_in_order(first_window))
            ahead: queue.SimpleQueue = queue.SimpleQueue()
            queued = 0

            def top_up():  # keep the current unit and ``readahead`` more in flight
                nonlocal queued
                while queued < self.readahead + 1 and (nxt := next(todo, None)) is not None:
                    ahead.put(pool.submit(self._read, nxt[1]))
                    queued += 1

            top_up()
            for w in range(first_window, len(self.plan.bounds) - 1):
                lo, hi = self.plan.bounds[w], self.plan.bounds[w + 1]
                want = self.plan.order[lo:hi]
                partner = self.plan.partner[lo:hi] if self.plan.partner is not None else None
                got = []
                for _ in range(len(np.unique(self.src.unit[want]))):
                    got.append(ahead.get().result())
                    queued -= 1
                    top_up()
                stored, parts = [rows for rows, _ in got], [x for _, x in got]
                del got  # the window's list is now the only holder of its units
                if partner is not None:  # partners of a kind the window lacks: read from their units
                    outside = np.unique(partner[~np.isin(partner, want)])
                    if len(outside):
                        parts.append(self.src.fetch(outside).to(parts[0].dtype))
                        stored.append(outside)
                        self._hold(len(outside))
                starts = np.cumsum([0] + [len(r) for r in stored])
                stored = np.concatenate(stored)
                p_at = _positions(stored, partner) if partner is not None else None
                yield w, want, _positions(stored, want), p_at, parts, starts
                del parts
                self._hold(-len(stored))

    # ------------------------------------------------------------ batches

    def _batch(self, idx: np.ndarray, x: torch.Tensor, x_pos: torch.Tensor | None) -> TrainBatch:
        if self._pin:
            x = x.pin_memory()
            x_pos = x_pos.pin_memory() if x_pos is not None else None
        labels = torch.from_numpy(self.src.label[idx]).to(self.device)
        groups = torch.from_numpy(self._groups[idx]).to(self.device) if self._groups is not None else None
        return TrainBatch(x, x_pos, labels, groups)  # as stored: features() when the step takes it (__iter__)

    def features(self, b: TrainBatch) -> TrainBatch:
        """A batch of ``stored()`` as the trainer takes it: float32 features on the device."""
        return TrainBatch(self.src.features(b.x, self.device),
                          self.src.features(b.x_pos, self.device) if b.x_pos is not None else None, b.labels, b.groups)

    def stored(self):
        """The batches with ``x`` / ``x_pos`` still in the stored dtype, prefetched in the background: a trainer
        that waits between steps (``workers.runtime.CoreTurns``) holds them at half the float32 bytes."""
        return background(self._produce(), self.prefetch, "isostack-feed")

    def _produce(self):
        """The batches, in order, built on the reader side of the prefetch queue.

        Each batch is gathered (a fresh tensor) from the window's parts, so they are released as soon as
        the last batch of the window is out; rows left over at a window's end (fewer than a batch) are
        gathered into a small carried tail.
        """
        b, order = self.plan.batch_size, self.plan.order
        stop = self.plan.n_batches * b if len(order) >= b else len(order)  # the only batch may be short
        pos = self.start_step * b  # position in the epoch's order of the next row to batch
        if pos >= stop:
            return
        tail = None  # (rows, x, x_pos) of the previous windows not yet in a batch (fewer than a batch)
        for w, want, at, p_at, parts, starts in self._windows(self.plan.window_of(pos)):
            i = max(0, pos - int(self.plan.bounds[w])) if tail is None else 0  # resuming inside this window
            carried = 0 if tail is None else len(tail[0])
            while pos < stop and carried + len(want) - i >= (n := min(b, stop - pos)):
                take = n - carried
                rows, x, x_pos = _gather(want, at, p_at, parts, starts, i, i + take)
                if tail is not None:
                    self._hold(-carried)
                    rows, x = np.concatenate([tail[0], rows]), torch.cat([tail[1], x])
                    x_pos = torch.cat([tail[2], x_pos]) if x_pos is not None else None
                    tail, carried = None, 0
                yield self._batch(rows, x, x_pos)
                i, pos = i + take, pos + n
            if pos >= stop:
                return
            rest = _gather(want, at, p_at, parts, starts, i, len(want))
            self._hold(len(rest[0]))
            if tail is not None:
                rest = (np.concatenate([tail[0], rest[0]]), torch.cat([tail[1], rest[1]]),
                        torch.cat([tail[2], rest[2]]) if rest[2] is not None else None)
            tail = rest
            # Drop this window's units before the next is read: the loop variables would otherwise keep
            # them alive while ``_windows`` reads the next window, holding two windows at once.
            del parts, at, p_at, rest

    def __iter__(self):
        # Prefetched batches wait in their stored dtype (float16: half the bytes of float32) and become float32
        # features only when the trainer takes them: a wide module held ~4 float32 batches (1.6 GB at the
        # stl10-gim m2's 410 MB each) in the queue and the producer.
        return (self.features(b) for b in self.stored())


def _gather(want, at, p_at, parts, starts, lo: int, hi: int):
    """(rows, x, x_pos) of window positions ``lo:hi``, gathered from the window's parts into fresh tensors.

    A batch is a set (no loss depends on the order of its rows), so its rows come grouped by the part that
    holds them: ``x`` is then gathered part by part straight into its slices of the output, one copy.
    ``x_pos`` follows that row order (its rows lie in other parts, hence ``_take``'s reordering).
    """
    sel = np.arange(lo, hi)[np.argsort(_part_of(starts, at[lo:hi]), kind="stable")]
    x = _take(parts, starts, at[sel])
    return want[sel], x, _take(parts, starts, p_at[sel]) if p_at is not None else None


def _part_of(starts: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return np.searchsorted(starts, positions, side="right") - 1


def _take(parts: list[torch.Tensor], starts: np.ndarray, positions: np.ndarray) -> torch.Tensor:
    """Rows at ``positions`` of the concatenation of ``parts`` (part k holds positions starts[k]:starts[k+1]).

    Each part's rows are gathered with ``index_select`` into a contiguous slice of the output (a row copy,
    no per-element scatter: ``index_copy_`` on CPU costs several times the gather it scatters); one more
    ``index_select`` restores the order asked for when the positions were not already grouped by part.
    """
    first = parts[0]
    out = torch.empty((len(positions), *first.shape[1:]), dtype=first.dtype)
    if len(positions) == 0:
        return out
    k = _part_of(starts, positions)
    by_part = np.argsort(k, kind="stable")
    counts = np.bincount(k, minlength=len(parts))
    lo = 0
    for part in np.flatnonzero(counts):
        hi = lo + int(counts[part])
        local = torch.from_numpy(positions[by_part[lo:hi]] - starts[part])
        torch.index_select(parts[part], 0, local, out=out[lo:hi])
        lo = hi
    if np.all(by_part[1:] > by_part[:-1]):  # already grouped by part
        return out
    return out.index_select(0, torch.from_numpy(np.argsort(by_part)))


def _positions(rows: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Where each of ``wanted`` sits in ``rows`` (every wanted row is in rows)."""
    sorter = np.argsort(rows, kind="stable")
    return sorter[np.searchsorted(rows, wanted, sorter=sorter)].astype(np.int64)


def background(items, depth: int, name: str):
    """Iterate ``items`` on a daemon thread, at most ``depth`` ahead of the consumer, so reading and
    decoding overlap the training step; an error in the thread is raised in the consumer, and leaving the
    loop early stops the thread."""
    keep_freed_batches()
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as exc:  # surfaced in the consumer
            q.put(exc)

    thread = threading.Thread(target=produce, daemon=True, name=name)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
