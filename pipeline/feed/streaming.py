"""Train batches streamed from the store with bounded memory.

``StreamingBatches`` follows an ``EpochPlan``: it reads the units (row groups) of one window,
shuffles them into the window's order, draws the batches, then moves on; ``readahead`` units of the
next window are read in the background while the current one trains (a bounded queue, so a slow
trainer applies backpressure to the reader). Rows held at any time: one window (at most
``feed.buffer_samples`` rows, or one unit when a unit is larger), the units read ahead, a carried
tail shorter than a batch and the window's partner rows. ``max_rows_held`` records the peak.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.feed.epoch import EpochPlan
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
        """``(window, global rows in window order, tensors in that order, partner tensors or None)``."""
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
                x, held = None, 0
                where = _positions_map(want)
                for _ in range(len(np.unique(self.src.unit[want]))):
                    rows, part = ahead.get().result()
                    queued -= 1
                    top_up()
                    keep = np.flatnonzero(where(rows) >= 0)  # the unit's training rows (test rows are skipped)
                    if x is None:
                        x = torch.empty((len(want), *part.shape[1:]), dtype=part.dtype)
                    # one copy, straight into the window's order
                    x[torch.from_numpy(where(rows[keep]))] = part if len(keep) == len(rows) else \
                        part.index_select(0, torch.from_numpy(keep))
                    held += len(rows)
                    del part
                x_pos = self._partners(lo, hi, want, x)
                yield w, want, x, x_pos
                self._hold(-(held + (len(x_pos) if x_pos is not None else 0)))

    def _partners(self, lo: int, hi: int, want: np.ndarray, x: torch.Tensor) -> torch.Tensor | None:
        """Partner tensors of the window's rows: from the window where they are in it, else read from their unit."""
        if self.plan.partner is None:
            return None
        partner = self.plan.partner[lo:hi]
        inside = np.isin(partner, want)
        out = torch.empty_like(x)
        where, outside = np.flatnonzero(inside), np.flatnonzero(~inside)
        if len(where):
            out[torch.from_numpy(where)] = x.index_select(0, torch.from_numpy(_positions(want, partner[where])))
        if len(outside):
            out[torch.from_numpy(outside)] = self.src.fetch(partner[outside]).to(x.dtype)
        self._hold(len(out))
        return out

    # ------------------------------------------------------------ batches

    def _batch(self, idx: np.ndarray, x: torch.Tensor, x_pos: torch.Tensor | None) -> TrainBatch:
        if self._pin:
            x = x.pin_memory()
            x_pos = x_pos.pin_memory() if x_pos is not None else None
        labels = torch.from_numpy(self.src.label[idx]).to(self.device)
        groups = torch.from_numpy(self._groups[idx]).to(self.device) if self._groups is not None else None
        return TrainBatch(self.src.features(x, self.device),
                          self.src.features(x_pos, self.device) if x_pos is not None else None, labels, groups)

    def _produce(self):
        """The batches, in order, built on the reader side of the prefetch queue."""
        b, order = self.plan.batch_size, self.plan.order
        stop = self.plan.n_batches * b if len(order) >= b else len(order)  # the only batch may be short
        pos = self.start_step * b  # position in the epoch's order of the next row to batch
        if pos >= stop:
            return
        tail = None  # rows of the previous window not yet in a batch (fewer than a batch)
        for w, want, x, x_pos in self._windows(self.plan.window_of(pos)):
            cut = max(0, pos - int(self.plan.bounds[w])) if tail is None else 0  # resuming inside this window
            want, x = want[cut:], x[cut:]
            x_pos = x_pos[cut:] if x_pos is not None else None
            if tail is not None:
                self._hold(-len(tail[0]))
                want, x = np.concatenate([tail[0], want]), torch.cat([tail[1], x])
                x_pos = torch.cat([tail[2], x_pos]) if x_pos is not None else None
            i = 0
            while pos < stop and len(want) - i >= min(b, stop - pos):
                n = min(b, stop - pos)
                yield self._batch(want[i:i + n], x[i:i + n], x_pos[i:i + n] if x_pos is not None else None)
                i, pos = i + n, pos + n
            if pos >= stop:
                return
            tail = (want[i:], x[i:].clone(), x_pos[i:].clone() if x_pos is not None else None)
            self._hold(len(tail[0]))

    def __iter__(self):
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def produce():
            try:
                for batch in self._produce():
                    if stop.is_set():
                        return
                    q.put(batch)
                q.put(done)
            except BaseException as exc:  # surfaced in the consumer
                q.put(exc)

        thread = threading.Thread(target=produce, daemon=True, name="isostack-feed")
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


def _positions(rows: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Where each of ``wanted`` sits in ``rows`` (every wanted row is in rows)."""
    sorter = np.argsort(rows, kind="stable")
    return sorter[np.searchsorted(rows, wanted, sorter=sorter)].astype(np.int64)


def _positions_map(want: np.ndarray):
    """A function rows -> their positions in ``want`` (-1 for rows not in it)."""
    sorter = np.argsort(want, kind="stable")
    ordered = want[sorter]

    def where(rows: np.ndarray) -> np.ndarray:
        at = np.searchsorted(ordered, rows).clip(max=max(len(ordered) - 1, 0))
        found = ordered[at] == rows if len(ordered) else np.zeros(len(rows), bool)
        return np.where(found, sorter[at], -1).astype(np.int64)

    return where
