"""The consumer side of ``schedule.publish: stream``: which chunks of the ring below a module trains on.

The module above trains on the union of the committed chunks (``store.stream.StreamRing``) it has
used fewer than ``store.max_shard_reuse`` times. A window is bounded by ``store.window_samples``, so
it is read into memory when chosen (``Source.pin``): the producer may delete a chunk's files while
the epoch runs. A chunk deleted before it is read is skipped, never read half way.
"""

from __future__ import annotations

from pipeline.errors import StoreError
from pipeline.feed.source import Source, merge, open_versions
from pipeline.store import Store
from pipeline.store.stream import StreamRing
from schemas.manifest import Manifest


class ChunkWindow:
    """The chunks of stage ``stage`` a consumer trains on, and how often it used each (kept across restarts)."""

    def __init__(self, store: Store, stage: str, window_samples: int, max_reuse: int, consumed: list) -> None:
        self.ring, self.max_reuse = StreamRing(store, stage, window_samples), max_reuse
        self.store, self.stage = store, stage
        self.uses: dict[int, int] = {}  # upstream chunk version -> epochs trained on it
        for _, used in consumed:
            for version, *_ in used:
                self.uses[version] = self.uses.get(version, 0) + 1
        self.chunks: list[Manifest] = []  # the chunks of the window read for the next epoch

    def read(self) -> Source | None:
        """A fresh window of the newest usable chunks, pinned in memory; None when none is usable."""
        parts = []
        for m in self.ring.window(self.uses, self.max_reuse):
            try:
                parts.append((m, open_versions(self.store, [m]).pin()))
            except (StoreError, OSError):
                continue  # rotated out of the ring while we read it: skip it, never half of it
        if not parts:
            return None
        self.chunks = [m for m, _ in parts]
        return merge([src for _, src in parts])

    def used(self, epoch: int) -> list | None:
        """Count one epoch on the chunks of the window; the lineage entry, or None without a window."""
        if not self.chunks:
            return None
        for m in self.chunks:
            self.uses[m.version] = self.uses.get(m.version, 0) + 1
        entry = [epoch, [[m.version, m.producer.get("checkpoint"), m.producer.get("step")] for m in self.chunks]]
        self.chunks = []  # a new window is read for the next epoch
        return entry
