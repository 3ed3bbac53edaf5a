"""Streaming intermediate versions: a bounded ring of small committed versions per stage.

With ``schedule.publish: stream`` a module does not publish a full version every few
epochs; while it trains it commits *chunks*: small versions of a few thousand rows
computed with its current weights, marked ``producer.stream = true``. The stage keeps
only the newest chunks that fit in ``store.window_samples`` rows: the producer deletes
older ones (manifest first, so a chunk is either whole or absent). The module above
trains on the union of the chunks it finds (its *window*), never using one chunk for
more than ``store.max_shard_reuse`` epochs; when the stage's final version appears it
switches to that, so retrain and the final stage see complete versions as before.

A consumer may list a chunk that the producer deletes before it is read: such a chunk
is skipped, never read half way (its manifest is gone first, then its files).
This is the on-disk counterpart of the replay buffer of Decoupled Greedy Learning
(Belilovsky et al., 2020): storage is bounded however long the run.
"""

from __future__ import annotations

from typing import Callable


from pipeline.errors import StoreError
from pipeline.store.store import Store
from pipeline.store.writer import MANIFEST, VersionWriter, version_dir
from schemas.manifest import Manifest


def is_chunk(manifest: Manifest) -> bool:
    return bool(manifest.producer.get("stream")) and not manifest.final


def chunk_rows(window_samples: int, rows_per_shard: int) -> int:
    """Rows per chunk: one shard, and at most a quarter of the window so the ring holds several."""
    return max(1, min(rows_per_shard, window_samples // 4 or 1))


class StreamRing:
    """The ring of one stage: ``append`` for its producer, ``window`` for the module above."""

    def __init__(self, store: Store, stage: str, window_samples: int) -> None:
        if window_samples < 1:
            raise StoreError(f"store.window_samples={window_samples}", "set store.window_samples >= 1")
        self.store, self.stage, self.window_samples = store, stage, window_samples

    def chunks(self) -> list[Manifest]:
        """Committed chunks, oldest first (a chunk deleted while listing is left out)."""
        out = []
        for v in self.store.versions(self.stage):
            try:
                m = self.store.manifest(self.stage, v)
            except StoreError:
                continue  # rotated out between the listing and the read
            if is_chunk(m):
                out.append(m)
        return out

    def append(self, write: Callable[[VersionWriter], None], *, producer: dict, upstream: dict | None,
               codec: str, rows: int, total_rows: int, rows_per_shard: int, zstd_level: int | None = None) -> Manifest:
        """Commit one chunk (``write`` fills the writer), then drop the oldest chunks beyond the window."""
        if rows > self.window_samples:
            raise StoreError(f"a stream chunk of {rows} rows is larger than store.window_samples={self.window_samples}",
                             "raise store.window_samples or lower store.rows_per_shard")
        writer = self.store.begin_version(self.stage, codec=codec, final=False, producer={**producer, "stream": True},
                                          upstream=upstream, sample_fraction=min(1.0, rows / max(1, total_rows)),
                                          rows_per_shard=rows_per_shard, zstd_level=zstd_level)
        try:
            write(writer)
            manifest = writer.commit()
        except BaseException:
            writer.abort()
            raise
        self.trim()
        return manifest

    def trim(self) -> list[int]:
        """Delete the oldest chunks until the rest fit in the window; returns the versions deleted."""
        chunks, kept, doomed = self.chunks(), 0, []
        for m in reversed(chunks):
            if kept + m.rows <= self.window_samples:
                kept += m.rows
            else:
                doomed.append(m.version)
        for v in sorted(doomed):
            self.store.delete(f"{version_dir(self.stage, v)}/{MANIFEST}")  # invisible first, then gone
            self.store.delete(version_dir(self.stage, v))
        return sorted(doomed)

    def window(self, uses: dict[int, int], max_reuse: int) -> list[Manifest]:
        """The chunks a consumer may train on now: committed, and used fewer than ``max_reuse`` times."""
        return [m for m in self.chunks() if uses.get(m.version, 0) < max_reuse]

