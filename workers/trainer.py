"""The module trainer: one per module, owned by one Ray actor.

A plain class with a fixed lifecycle (``setup / run / shutdown``, plus the idempotent ``train_until`` and
``publish`` that ``run`` is made of). The scheduler applies ``ray.remote`` where it starts it, so the class runs
in a unit test without Ray. It reaches the store only by URI, streams the newest committed upstream version
through ``pipeline.feed`` (bounded memory), checkpoints every epoch (and every ``feed.checkpoint_every_steps``
steps, with the feed's position), publishes versions (``workers.publisher``), records metrics in a ``MetricLog``
and reports its progress as a ``ModuleStatus``. On shared cores it may end as it waits (``_parks``).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import torch

from pipeline import faults
from pipeline.errors import TrainingError
from pipeline.feed import Source, StreamingBatches, open_source, plan_epoch
from pipeline.feed.heap import release_free_memory
from pipeline.feed.window import ChunkWindow
from pipeline.nn.footprint import remember_planned
from pipeline.nn.modules import build_module
from pipeline.nn.objectives import build_objective
from pipeline.nn.pairing import loss_inputs, viewed, views_generator
from pipeline.nn.step import micro_batched, step_loss
from pipeline.planning.plan import build_plan
from pipeline.store import Store, checkpoint
from pipeline.store.runs import now_iso
from pipeline.store.stream import StreamRing
from schemas.config import RunConfig
from schemas.manifest import Manifest
from schemas.status import ModuleState, ModuleStatus
from workers.epochs import Boundary, Step, upstream_rows, next_step, parks, publishes_after, reader_may_use, upstream_wait
from workers.heldout import heldout_loss
from workers.metric_log import MetricLog
from workers.publisher import ChunkProducer, publish_version, wanted_above
from workers.runtime import CoreTurns, device_text, node_name, peak_memory


class ModuleTrainer:
    """Trains one module of the stack through the store."""

    def __init__(self, store_uri: str, run_id: str, name: str, config: dict, *, generation: int = 0,
                 threads: int = 1, use_gpu: bool = False) -> None:
        self.store_uri, self.run_id, self.name = store_uri, run_id, name
        self.cfg = RunConfig.model_validate(config)
        self.generation, self.threads, self.use_gpu = generation, threads, use_gpu
        self._status = ModuleStatus(module=name)
        self._status_json = self._status.model_dump(mode="json")  # status(), kept up to date by _update
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = False

    # ------------------------------------------------------------ public lifecycle

    def setup(self) -> dict:
        """Build the module and its loss; resume from the newest checkpoint if there is one."""
        if self._ready:
            return self.status()
        torch.set_num_threads(self.threads)
        self.store = Store(self.store_uri, self.run_id)
        remember_planned(self.store.read_json("run.json"))  # the driver's footprints: no meta forward here
        plan = build_plan(self.cfg, check_paths=False, local_cluster=False)
        self.plan = plan.module(self.name)
        self.readers = [m for m in plan.modules if self.name in (m.upstream, m.source)]
        self.train_cfg = self.cfg.module_train(self.name)
        self.mcfg = self.cfg.stack[self.name]
        self.device = torch.device("cuda" if self.use_gpu and torch.cuda.is_available() else "cpu")
        self.turns = CoreTurns.for_module(self.cfg, f"{self.store_uri}|{self.run_id}", self.device)
        torch.manual_seed(self.train_cfg.seed + 1000 * self.plan.index + 7919 * self.generation)
        self.module = build_module(self.mcfg, tuple(self.plan.in_shape)).to(self.device)
        self.objective = build_objective(self.mcfg.objective, tuple(self.plan.out_shape), plan.num_classes,
                                         in_shape=tuple(self.plan.in_shape), module=self.module).to(self.device)
        params = list(self.module.parameters()) + list(self.objective.parameters())
        self.optimizer = torch.optim.Adam(params, lr=self.train_cfg.lr, weight_decay=self.train_cfg.weight_decay)
        self.ckpt_dir = checkpoint.checkpoint_dir(self.name, self.generation)
        self.lineage: dict = {"module": self.name, "generation": self.generation, "upstream_stage": self.plan.upstream,
                              "upstream_versions": [], "epochs_on_final": 0, "published": [], "train_seconds": 0.0,
                              "step": 0, "started_at": None, "restarts": 0, "stream_consumed": []}
        self.epoch, self._resume = 0, None
        last = checkpoint.resume_point(self.store, self.ckpt_dir)
        if last is not None:
            checkpoint.restore(self.store, last, self.module, self.objective, self.optimizer)
            self.epoch = last.get("epochs_done", last["epoch"])
            self.lineage.update({k: last[k] for k in self.lineage if k in last})
            parked = checkpoint.unpark(self.store, self.ckpt_dir, self.epoch)  # ended on purpose: not a restart
            self.lineage["restarts"] = int(last.get("restarts", 0)) + (0 if parked else 1)
            if last.get("feed_step"):  # killed mid-epoch: continue that epoch's order on the same upstream
                self._resume = {"step": int(last["feed_step"]), "upstream_version": last["upstream_version"]}
            # A version committed after that checkpoint (the crash came between) is in the store: keep it listed.
            self.lineage["published"] = [v for v in self.store.versions(self.name)
                                         if self.store.manifest(self.name, v).producer.get("generation", 0) == self.generation]
        self._upstream: Source | None = None
        self._stream_setup()
        self.metrics = MetricLog(self.store, self.name, self.generation)
        self.metrics.load(self.epoch)
        self._update(state=ModuleState.created, epoch=self.epoch, target_epochs=self.train_cfg.epochs,
                     step=self.lineage["step"], published=list(self.lineage["published"]),
                     train_seconds=self.lineage["train_seconds"], started_at=self.lineage["started_at"],
                     node=node_name(), pid=os.getpid(), device=device_text(self.device), restarts=self.lineage["restarts"])
        self._ready = True
        return self.status()

    def run(self) -> dict:
        """Train until final: wait for upstream, train, publish, settle on the final upstream, commit final."""
        self.setup()
        try:
            final = self.store.final(self.name)
            if final is not None and final.producer.get("generation", 0) == self.generation and \
                    final.producer.get("epoch") == self.epoch:
                self._update(state=ModuleState.final, final_version=final.version)  # a restart after the commit
                self._write_status()
                return self.status()
            while not self._stop.is_set():
                self._switch_upstream()
                step = next_step(self._boundary())
                if step == Step.wait:
                    if self._status.state != ModuleState.waiting_upstream:
                        if self._parks():
                            return self.status()
                        release_free_memory()  # what the epoch's end freed outside a turn (checkpoint, metrics)
                    self._update(state=ModuleState.waiting_upstream)
                    time.sleep(self.cfg.schedule.poll_seconds)
                    continue
                if step == Step.finish:
                    break
                self.train_until(self.epoch + 1)
                wanted = wanted_above(self.store, self.readers, self.cfg.schedule.settle_epochs)
                if publishes_after(self.epoch, self.train_cfg.epochs, self.plan.publish_every,
                                   self._upstream.manifest.final, wanted) and self._chunks is None:
                    self.publish(final=False)
            if self._stop.is_set():
                self._write_status(state=ModuleState.stopped)
                return self.status()
            manifest = self.publish(final=True)
            self._write_status(state=ModuleState.final, final_version=manifest.version, finished_at=now_iso())
            return self.status()
        except BaseException as exc:
            self._write_status(state=ModuleState.failed, error=getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.turns.close()  # the last module of the run on this node removes the turn's files

    def train_until(self, epoch: int) -> dict:
        """Train epochs until ``epoch`` have been completed; a no-op when they already are."""
        self.setup()
        while self.epoch < epoch and not self._stop.is_set():
            self._switch_upstream(block=True)
            self._train_epoch()
            self._count_window_uses()
        return self.status()

    def publish(self, final: bool) -> Manifest:
        """Commit a version: the current weights' outputs on the upstream in use (``store.materialize: false``: the weights)."""
        self._update(state=ModuleState.publishing)
        t0 = time.perf_counter()
        manifest = publish_version(
            self.store, self.cfg, self.plan, self._upstream, self.module, self.device, final=final, epoch=self.epoch,
            producer={"module": self.name, "epoch": self.epoch, "generation": self.generation,
                      "checkpoint": f"{self.ckpt_dir}/{self.epoch:04d}.safetensors"},
            upstream={"stage": self.plan.upstream, "version": self._upstream.manifest.version}, turns=self.turns)
        self.lineage["published"].append(manifest.version)
        self._record(f"{self.name}/publish/version", manifest.version)
        self._write_status(published=list(self.lineage["published"]), state=ModuleState.training,
                           publish_rows=manifest.rows, publish_seconds=time.perf_counter() - t0)
        return manifest

    def _parks(self) -> bool:
        """Whether this actor ends as it waits (``workers.epochs.parks``): its status stays waiting, not done."""
        sch, up, below = self.cfg.schedule, self._upstream, self.plan.upstream
        train_rows, final_rows = upstream_rows(self.store.final("input"), self.cfg.module_train(below))
        wait = upstream_wait(self.store.read_json(f"status/{below}.json"), final_only=not reader_may_use(
            self.epoch, self.train_cfg.epochs, sch.settle_epochs), train_rows=train_rows, final_rows=final_rows)
        if not parks(shared=self.turns.shared, mode=sch.mode, publish=sch.publish, epoch=self.epoch, wait_seconds=wait,
                     upstream_final=up is not None and up.manifest.final, park_seconds=sch.park_seconds):
            return False
        checkpoint.mark_parked(self.store, self.ckpt_dir, self.epoch)
        self._record(f"{self.name}/parked", self.epoch)
        self.metrics.write()
        self._write_status(state=ModuleState.waiting_upstream)
        return True

    def status(self) -> dict:
        with self._lock:  # made in _update: serialised here, during a step, it pinned a kept C heap (+1.2 vs +0.7 GB)
            return self._status_json

    def shutdown(self) -> None:
        """Ask a running ``run`` to stop after the current step; checkpoints stay."""
        self._stop.set()

    # ------------------------------------------------------------ helpers

    def _boundary(self) -> Boundary:
        up, used = self._upstream, self.lineage["upstream_versions"]
        return Boundary(epoch=self.epoch, budget=self.train_cfg.epochs, settle=self.cfg.schedule.settle_epochs,
                        track=self.cfg.schedule.track_upstream, loaded=up is not None and not self._starved,
                        upstream_final=up is not None and up.manifest.final,
                        # a stream window is drawn afresh each epoch, so it is never "already trained on"
                        trained_on_loaded=bool(up is not None and used and not self._reads_stream
                                               and used[-1][1] == up.manifest.version))

    def _switch_upstream(self, block: bool = False) -> None:
        """At an epoch boundary, move to the newest committed upstream version (or the one a resume pins)."""
        if self._reads_stream:
            return self._switch_window(block)
        while True:
            newest = self.store.newest(self.plan.upstream)
            if newest is not None or not block:
                break
            time.sleep(self.cfg.schedule.poll_seconds)
        if self._resume and self._resume["upstream_version"] in self.store.versions(self.plan.upstream):
            newest = self.store.manifest(self.plan.upstream, self._resume["upstream_version"])
        else:
            self._resume = None  # its upstream version is gone: the epoch restarts on the newest
        if newest is None or (self._upstream is not None and self._upstream.manifest.version == newest.version):
            return
        self._use_upstream(open_source(self.store, self.plan.upstream, newest.version, self.cfg.model_dump(mode="json"),
                                       self.device))

    def _use_upstream(self, src: Source) -> None:
        self._upstream = src
        self._record(f"{self.name}/upstream/version", src.manifest.version)
        self._update(upstream_version=src.manifest.version, upstream_final=src.manifest.final)

    def _epoch_batches(self, pairing: str | None, rng: np.random.Generator) -> StreamingBatches:
        """This epoch's batches: order, windows and partners from (seed, module, generation, epoch)."""
        up, tc, feed = self._upstream, self.train_cfg, self.cfg.feed
        plan = plan_epoch(up.pairing_meta(), up.train_rows(), up.unit, pairing=pairing, batch_size=tc.batch_size,
                          buffer=self.plan.buffer_samples, rng=rng, max_steps=tc.max_steps_per_epoch)
        start, self._resume = (self._resume or {}).get("step", 0), None
        return StreamingBatches(up, plan, device=self.device, pairing=pairing, start_step=start,
                                readahead=feed.readahead, prefetch=1 if self.turns.shared else 2)

    def _train_epoch(self) -> None:
        tc = self.train_cfg
        pairing = getattr(self.mcfg.objective, "pairing", None)
        rng = np.random.default_rng([tc.seed, self.plan.index, self.generation, self.epoch])
        batches = self._epoch_batches(pairing, rng)
        gen = views_generator(int(rng.integers(2**31)), pairing, self.mcfg.objective, skip_steps=batches.start_step,
                              batch_size=batches.plan.batch_size)  # resumed mid-epoch: past the views taken
        self.lineage["started_at"] = self.lineage["started_at"] or now_iso()
        self._update(state=ModuleState.training, started_at=self.lineage["started_at"])
        losses, samples, t0 = [], 0, time.perf_counter()
        step = batches.start_step - 1
        # Sharing the node's cores, a module takes its batch in its turn and holds no rows while it waits for one;
        # alone on its cores, batches are prefetched on the feed's thread while it steps.
        feed = batches.on_demand() if self.turns.shared else batches.stored()
        for _ in range(len(batches)):  # counted: no turn is taken only to find the epoch over
            with self.turns.turn(on_wait=batches.release):  # the step's own turn inside it is the same turn
                batch = next(feed, None)
                if batch is None:
                    break
                if self._stop.is_set():
                    return
                step += 1
                samples += len(batch.x)
                # in a list the step empties: this frame would keep the stored batch (205 MB on stl10-gim's m2) alive
                held, batch = [batch], None
                loss = self._step(held, pairing, gen, step, batches.features)
            self._stream_tick()  # outside the turn: a stream chunk is read before it takes its own
            losses.append(loss.detach())
            every = self.cfg.feed.checkpoint_every_steps
            if every and (step + 1) % every == 0 and step + 1 < batches.plan.n_batches:
                self._checkpoint(f"{self.ckpt_dir}/mid", self.lineage["step"] + len(losses),
                                 feed_step=step + 1, step=self.lineage["step"] + len(losses))
        feed.close()  # its last window is not held through the epoch's end (checkpoint, held-out loss)
        self._end_epoch(losses, samples, time.perf_counter() - t0, batches)

    def _step(self, held: list, pairing: str | None, gen: torch.Generator, step: int, features) -> torch.Tensor:
        """One optimizer step on the batch in ``held`` (as stored; ``features`` makes it float32); the loss."""
        with self.turns.turn():  # modules sharing this node's cores step one at a time (workers.runtime.CoreTurns)
            batch, micro, spec = held.pop(), self.plan.micro_batch or None, self.mcfg.objective
            # float32 only in the turn, per micro-batch where micro-batched and not viewed (views need the whole batch)
            lazy = not viewed(pairing, spec) and micro_batched(self.objective, batch.x, batch.x_pos, micro)
            prepare = self._upstream.step_input(self.device) if lazy else None
            batch = batch if prepare else features(batch)  # else the whole batch now, the stored copy dropped
            x, x_pos = loss_inputs(batch.x, batch.x_pos, gen, pairing, spec)
            loss, backward = step_loss(self.objective, self.module, x, x_pos, batch.labels, batch.groups,
                                       micro_batch=micro, prepare=prepare)
            del batch, x, x_pos  # a micro-batched step holds its inputs through `backward` only
            if faults.armed("nan_loss", self.name, self.epoch + 1):
                loss = loss * float("nan")
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"module {self.name}: loss became {loss.item()} at epoch {self.epoch + 1}, step {step + 1} "
                    f"(upstream {self.plan.upstream} v{self._upstream.manifest.version})",
                    f"lower stack.{self.name}.train.lr (now {self.train_cfg.lr}) or check the upstream activations; "
                    f"the last good checkpoint ({self.ckpt_dir}/{self.epoch:04d}) and versions are kept")
            self.optimizer.zero_grad(set_to_none=True)
            backward()
            self.optimizer.step()
            after_step = getattr(self.objective, "after_step", None)
            if after_step is not None:
                after_step(self.module)  # e.g. moco's momentum update of its key encoder
        return loss

    def _end_epoch(self, losses: list, samples: int, seconds: float, batches: StreamingBatches) -> None:
        up = self._upstream
        self.epoch += 1
        mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
        self.lineage["step"] += len(losses)
        self.lineage["train_seconds"] += seconds
        self.lineage["upstream_versions"].append([self.epoch, up.manifest.version])
        if up.manifest.final:
            self.lineage["epochs_on_final"] += 1
        rate = samples / seconds if seconds > 0 else None
        # In a turn like a step (not beside another's step; its heap handed back at the end: a waiting m3 held 1.1-1.4
        # GiB, not ~0.6), the steps' heap returned first: a whole batch's blocks do not fit its holes (m2 4.6 GB).
        with self.turns.turn():
            release_free_memory()
            spec = self.mcfg.objective
            heldout = heldout_loss(up, self.module, self.objective, spec=spec, pairing=spec.pairing,
                                   batch_size=self.train_cfg.batch_size, buffer=self.plan.buffer_samples,
                                   device=self.device, seed=[self.train_cfg.seed, self.plan.index, self.epoch, 1])
        for name, value in (("loss/train", mean_loss), ("loss/heldout", heldout), ("samples_per_s", rate),
                            ("epoch_seconds", seconds),
                            ("feed/partner_fetch_rate", batches.plan.fetch_rate if batches.plan.partner is not None
                             else None), ("feed/rows_held", batches.max_rows_held)):
            self._record(f"{self.name}/{name}", value)
        self._checkpoint(self.ckpt_dir, self.epoch, loss=mean_loss)
        self.metrics.write()
        self._write_status(epoch=self.epoch, step=self.lineage["step"], loss=mean_loss, samples_per_second=rate,
                           train_seconds=self.lineage["train_seconds"], peak_memory_bytes=peak_memory(self.device))

    def _checkpoint(self, directory: str, number: int, **extra) -> None:
        checkpoint.save(self.store, directory, number, self.module, self.objective, self.optimizer,
                        {**self.lineage, **extra, "epochs_done": self.epoch,
                         "upstream_version": self._upstream.manifest.version})

    # ------------------------------------------------------------ streaming (schedule.publish: stream)

    def _stream_setup(self) -> None:
        streaming = self.cfg.schedule.publish == "stream"
        self._chunks = ChunkProducer(StreamRing(self.store, self.name, self.cfg.store.window_samples), self.cfg,
                                     self.name, seed=[self.train_cfg.seed, self.plan.index, self.generation],
                                     turns=self.turns) \
            if streaming and self.mcfg.store.materialize else None
        below = self.cfg.stack.get(self.plan.upstream)
        self._reads_stream = streaming and below is not None and below.store.materialize
        self._starved = False
        self.lineage.setdefault("stream_consumed", [])
        self._window = ChunkWindow(self.store, self.plan.upstream, self.cfg.store.window_samples,
                                   self.cfg.store.max_shard_reuse, self.lineage["stream_consumed"])

    def _switch_window(self, block: bool) -> None:
        """Stream mode: the upstream's final version once it exists, else a fresh window of its newest chunks."""
        while True:
            final = self.store.final(self.plan.upstream)
            if final is not None:
                # The final version replaces a window read but not trained on yet (a module waiting past its
                # epochs holds one): keeping it would wait on the stream forever.
                self._starved, self._window.chunks = False, []
                if self._upstream is None or self._upstream.manifest.version != final.version:
                    self._use_upstream(open_source(self.store, self.plan.upstream, final.version,
                                                   self.cfg.model_dump(mode="json"), self.device))
                return
            if self._window.chunks:
                return  # read at this epoch boundary already, not trained on yet
            src = self._window.read()
            self._starved = src is None
            if src is not None:
                return self._use_upstream(src)
            if not block:
                return
            time.sleep(self.cfg.schedule.poll_seconds)

    def _count_window_uses(self) -> None:
        entry = self._window.used(self.epoch)
        if entry is not None:
            self.lineage["stream_consumed"].append(entry)

    def _stream_tick(self) -> None:
        """Stream mode: after every few training steps, commit a chunk of activations with the current weights."""
        if self._chunks is None or (up := self._upstream) is None:
            return
        manifest = self._chunks.tick(
            up, self.module, self.device, step=self.lineage["step"],
            producer={"module": self.name, "epoch": self.epoch, "step": self.lineage["step"], "generation": self.generation,
                      "checkpoint": f"{self.ckpt_dir}/{self.epoch:04d}.safetensors" if self.epoch else None},
            upstream={"stage": self.plan.upstream, "version": up.manifest.version})
        if manifest is not None:
            self._record(f"{self.name}/stream/version", manifest.version)

    def _record(self, name: str, value) -> None:
        self.metrics.record(name, value, epoch=self.epoch, step=self.lineage["step"])

    def _write_status(self, **fields) -> None:
        """Write the status to the store (``status/<module>.json``), with ``fields`` changed first."""
        self._update(**fields)
        self.store.write_json(f"status/{self.name}.json", self.status())

    def _update(self, **fields) -> None:
        with self._lock:
            self._status = self._status.model_copy(update=fields)
            self._status_json = self._status.model_dump(mode="json")

