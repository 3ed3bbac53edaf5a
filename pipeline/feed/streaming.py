"""Train batches streamed from the store with bounded memory.

``StreamingBatches`` follows an ``EpochPlan``: it reads the units (row groups) of one window, keeps
them as read (no copy), gathers each batch by position from them in the window's shuffled order,
then moves on; ``readahead`` units of the next window are read in the background while the current
one trains (a bounded queue, so a slow trainer applies backpressure to the reader). Rows held at any
time: one window's units (at most ``feed.buffer_samples`` training rows, or one unit when a unit is
larger), the units read ahead, the partners the window lacks (read from their units), a carried tail
shorter than a batch and the prefetched batches. ``max_rows_held`` records the peak of the first four.
A trainer that waits between steps for its node's cores (``workers.runtime.CoreTurns``) builds each batch inside
its turn (``on_demand``) and ``release``s the units it holds while it waits: they are read again, from the page
cache, when the next batch needs them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import threading
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline.data.base import object_ids
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
        self._groups = object_ids(src.label, src.instance) if pairing == "same_instance" else None
        self._pin = device.type == "cuda"
        self._held_lock = threading.Lock()
        self._held = 0
        self.max_rows_held = 0
        # The units held and read ahead by the batches being produced (``_produce``), reachable from ``release``;
        # a released unit is None in ``_live`` until a batch needs it again.
        self._live: dict[int, tuple[np.ndarray, torch.Tensor] | None] | None = None
        self._ahead: collections.deque | None = None
        self._released = False
        self._in_caller = False

    def __len__(self) -> int:
        return max(0, self.plan.n_batches - self.start_step)

    # ------------------------------------------------------------ rows held (for the bound and its test)

    def _hold(self, n: int) -> None:
        with self._held_lock:
            self._held += n
            self.max_rows_held = max(self.max_rows_held, self._held)

    @property
    def rows_held(self) -> int:
        """Rows held now: the window's units, those read ahead, fetched partners (``max_rows_held``'s terms)."""
        with self._held_lock:
            return self._held

    # ------------------------------------------------------------ reading

    def _read(self, u: int):
        rows, x = self.src.read_unit(u)
        self._hold(len(rows))
        return rows, x

    def _unheld(self, read: concurrent.futures.Future) -> None:
        if not read.cancelled() and read.exception() is None:
            self._hold(-len(read.result()[0]))

    def release(self) -> None:
        """Drop every unit held or read ahead, for a consumer of ``on_demand`` that is about to wait (between two
        batches, in its own thread): each is read again when a batch needs it. Frees the window's bytes (410 MB
        of float16 rows for the stl10-gim m2) while another module's step has the cores."""
        live, ahead = self._live, self._ahead
        if not self._in_caller or live is None:
            return  # a background producer owns its units: nothing to drop from here
        for u in live:
            if live[u] is not None:
                self._hold(-len(live[u][0]))
                live[u] = None
        while ahead:
            read = ahead.popleft()[1]
            if not read.cancel():  # being read or read: its rows go with the future
                read.add_done_callback(self._unheld)
        read = None
        self._released = True
        pa.default_memory_pool().release_unused()  # the units' buffers (Arrow's allocator; the C heap: CoreTurns)

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

    def on_demand(self):
        """The batches as stored, each built in the caller's thread when it asks for it (none prefetched; units are
        still read ahead on the reader thread): for a trainer that takes its node's turn before its next batch
        and calls ``release`` when it has to wait for the turn."""
        self._in_caller = True
        return self._produce()

    def stored(self):
        """The batches with ``x`` / ``x_pos`` still in the stored dtype, prefetched in the background: a trainer
        that waits between steps (``workers.runtime.CoreTurns``) holds them at half the float32 bytes."""
        return background(self._produce(), self.prefetch, "isostack-feed")

    def _produce(self):
        """The batches, in order, built on the reader side of the prefetch queue.

        Units are read in the order the plan first needs them, ``readahead`` more in flight on one thread (a
        bounded queue: a slow trainer holds the reader back). Each batch is gathered (a fresh tensor) from the
        units it touches, and a unit is dropped as soon as the plan's last use of it is out.
        """
        plan, b = self.plan, self.plan.batch_size
        stop = plan.n_batches * b if len(plan.order) >= b else len(plan.order)  # the only batch may be short
        pos = self.start_step * b  # position in the epoch's order of the next row to batch
        keep = plan.last_use >= pos  # resuming: units whose rows are all behind are never read
        units, first = plan.units[keep].tolist(), plan.first_use[keep]
        last_of = dict(zip(units, plan.last_use[keep].tolist()))
        live: dict[int, tuple[np.ndarray, torch.Tensor] | None] = {}
        ahead: collections.deque = collections.deque()  # (unit, its read), in first-use order
        self._live, self._ahead, self._released = live, ahead, False
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="isostack-readahead") as pool:
                submitted = loaded = 0
                while pos < stop:
                    if self._released:  # release() dropped the reads ahead: they start again from the next unit
                        self._released, submitted = False, loaded
                    end = min(pos + b, stop)
                    while loaded < len(units) and first[loaded] < end:  # this batch's units, in first-use order
                        while submitted < len(units) and submitted - loaded < self.readahead + 1:
                            ahead.append((units[submitted], pool.submit(self._read, units[submitted])))
                            submitted += 1
                        u, read = ahead.popleft()
                        live[u] = read.result()
                        loaded += 1
                    while submitted < len(units) and submitted - loaded < self.readahead:  # read on while it trains
                        ahead.append((units[submitted], pool.submit(self._read, units[submitted])))
                        submitted += 1
                    yield self._batch(*self._gather(pos, end, live))
                    for u in [u for u in live if last_of[u] < end]:  # that batch was its last use
                        held = live.pop(u)
                        if held is not None:
                            self._hold(-len(held[0]))
                    pos = end
        finally:  # finished or closed early: the window is not reachable from here any more
            self._live = self._ahead = None

    def _gather(self, lo: int, hi: int, live: dict):
        """(rows, x, x_pos) of epoch positions ``lo:hi``, gathered from the loaded units into fresh tensors.

        A batch is a set (no loss depends on the order of its rows), so its rows come grouped by the unit that
        holds them: ``x`` is gathered unit by unit straight into its slices of the output, one copy. A partner
        outside the window is read from its unit (``Source.fetch``) as one more part.
        """
        want = self.plan.order[lo:hi]
        partner = self.plan.partner[lo:hi] if self.plan.partner is not None else None
        touched = np.unique(self.src.unit[want if partner is None else
                                          np.concatenate([want, partner[~self.plan.outside[lo:hi]]])])
        for u in touched.tolist():
            if live[u] is None:  # released while its consumer waited for the cores: read again now
                live[u] = self._read(u)
        stored, parts = [live[int(u)][0] for u in touched], [live[int(u)][1] for u in touched]
        fetched = 0
        if partner is not None and self.plan.outside[lo:hi].any():
            extra = np.unique(partner[self.plan.outside[lo:hi]])
            parts.append(self.src.fetch(extra).to(parts[0].dtype))
            stored.append(extra)
            fetched = len(extra)
            self._hold(fetched)
        starts = np.cumsum([0] + [len(r) for r in stored])
        stored = np.concatenate(stored)
        at = _positions(stored, want)
        sel = np.argsort(_part_of(starts, at), kind="stable")
        x = _take(parts, starts, at[sel])
        x_pos = _take(parts, starts, _positions(stored, partner[sel])) if partner is not None else None
        self._hold(-fetched)
        return want[sel], x, x_pos

    def __iter__(self):
        # float32 features made on the feed thread, as the in-memory feed (``PairedBatches``) makes them: the
        # consumer's thread only steps. A consumer that waits between steps and wants its queued batches at the
        # stored dtype's bytes (the module trainer: ``stored()`` + ``features`` inside its turn) uses ``stored()``.
        return background(self._features_of(self._produce()), self.prefetch, "isostack-feed")

    def _features_of(self, batches):
        for b in batches:
            out, b = [self.features(b)], None  # the stored copy is not held while the next batch is gathered
            yield out.pop()


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
                item = None  # the consumer's now: not held here while the next one is built
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
            box, item = [item], None
            yield box.pop()  # no local of this frame keeps the batch alive while the consumer steps on it
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
