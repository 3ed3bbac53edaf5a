"""Streaming intermediate versions (``schedule.publish: stream``): the bounded ring and two trainers using it."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from pipeline.planning.config import load_config
from pipeline.run.driver import prepare_run
from pipeline.feed import load_upstream
from pipeline.store import Store
from pipeline.store.stream import StreamRing
from tests.conftest import TINY_NORB
from workers.trainer import ModuleTrainer


def _fill(tag: int, rows: int, start: int):
    def write(writer) -> None:
        ids = np.arange(start, start + rows)
        writer.write({"sample_id": ids, "split": ["train"] * rows}, torch.full((rows, 4, 8), float(tag)))
    return write


def test_ring_stays_bounded_and_readers_never_see_half_a_chunk(tmp_path):
    store = Store(str(tmp_path), "r")
    window, chunk = 256, 64
    ring = StreamRing(store, "m1", window)
    done, seen, problems = threading.Event(), [], []

    def produce() -> None:
        try:
            for tag in range(1, 61):  # fast producer: 60 chunks, 15 times the window
                ring.append(_fill(tag, chunk, tag * chunk), producer={"tag": tag}, upstream=None, codec="float16",
                            rows=chunk, total_rows=60 * chunk, rows_per_shard=32)
                committed = sum(m.rows for m in ring.chunks())
                if committed > window:
                    problems.append(f"{committed} rows committed after chunk {tag}, window {window}")
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            problems.append(repr(exc))
        finally:
            done.set()

    thread = threading.Thread(target=produce)
    thread.start()
    while not done.is_set():  # slow consumer: reads a window, then dawdles
        for m in ring.window({}, max_reuse=1):
            try:
                up = load_upstream(store, "m1", m.version)
            except Exception:  # noqa: BLE001 - rotated out while being read: skipped, as the trainer does
                continue
            tag = m.producer["tag"]
            assert torch.all(up.x == tag), f"chunk v{m.version} (tag {tag}) read with foreign rows"
            assert len(up.x) == chunk
            seen.append(tag)
        time.sleep(0.02)
    thread.join()
    assert not problems, problems
    assert seen, "the consumer never read a chunk"
    assert sum(m.rows for m in ring.chunks()) <= window
    # On disk, too: only the ring's chunks are left (the manifest goes first, then the files).
    left = [v for v in store.list_dir("store/m1") if v.startswith("v")]
    assert len(left) == window // chunk
    assert store.verify("m1") == []


def test_two_trainers_stream_through_the_ring(tmp_path):
    window = 96
    cfg = load_config(None, TINY_NORB + [
        "schedule.publish=stream", f"store.window_samples={window}", "store.rows_per_shard=24",
        "store.max_shard_reuse=2", "train.epochs=2", "train.batch_size=16", "schedule.poll_seconds=0.05",
        "schedule.settle_epochs=1", "train.max_steps_per_epoch=6", "stack.m1.train.epochs=4"], str(tmp_path / "store"))
    cfg = cfg.model_copy(update={"stack": {k: cfg.stack[k] for k in ("m1", "m2")}})
    store, _, manifest = prepare_run(cfg, "r")
    config = cfg.model_dump(mode="json")
    trainers = [ModuleTrainer(store.uri, "r", name, config) for name in ("m1", "m2")]
    errors: list[BaseException] = []

    def run(trainer) -> None:
        try:
            trainer.run()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in trainers]  # a hung trainer must not hang pytest
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a trainer did not finish in 120 s"

    m1, m2 = trainers
    chunks = [store.manifest("m1", v) for v in store.versions("m1")]
    streamed = [m for m in chunks if m.producer.get("stream")]
    assert streamed and all(m.rows <= 24 for m in streamed)
    assert sum(m.rows for m in streamed) <= window
    assert not any(not m.producer.get("stream") and not m.final for m in chunks), "a full intermediate version"
    # Finals are complete, so retrain and the final stage see whole versions.
    assert store.final("m1").rows == manifest.rows and store.final("m2").rows == manifest.rows
    assert store.final("m2").upstream == {"stage": "m1", "version": store.final("m1").version}
    # m2 trained on m1's chunks while m1 was still training (m1 has 4 epochs, m2 2): each chunk at most twice,
    # each recorded with the producer's epoch checkpoint and step.
    consumed = m2.lineage["stream_consumed"]
    assert consumed, "m2 never trained on a streamed window"
    uses: dict[int, int] = {}
    for _, used in consumed:
        for version, _checkpoint, step in used:
            uses[version] = uses.get(version, 0) + 1
            assert step is not None
    assert max(uses.values()) <= 2
