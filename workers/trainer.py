"""The module trainer: one per module, owned by one Ray actor.

A plain class with a fixed lifecycle (``setup / run / shutdown``, plus the
idempotent ``train_until`` and ``publish`` that ``run`` is made of). The
scheduler applies ``ray.remote`` where it starts it, so the class runs in a
unit test without Ray. It reaches the store only by URI, trains on the newest
committed upstream version, checkpoints every epoch, publishes versions, and
reports its progress as a ``ModuleStatus``.
"""

from __future__ import annotations

import os
import resource
import socket
import threading
import time

import numpy as np
import pyarrow as pa
import torch

from pipeline import faults
from pipeline.store import checkpoint
from pipeline.errors import StoreError, TrainingError
from pipeline.feed import PairedBatches, Upstream, concat_upstreams, inference_chunks, load_source, load_upstream
from pipeline.store.stream import StreamRing, chunk_rows
from pipeline.nn.modules import build_module
from pipeline.nn.objectives import build_objective, local_loss
from pipeline.nn.pairing import augment_views
from pipeline.planning.plan import build_plan
from pipeline.store.runs import now_iso
from pipeline.store import Store
from schemas.config import RunConfig
from schemas.status import ModuleState, ModuleStatus
from workers.epochs import Boundary, Step, next_step, publishes_after

class ModuleTrainer:
    """Trains one module of the stack through the store."""

    def __init__(self, store_uri: str, run_id: str, name: str, config: dict, *, generation: int = 0,
                 threads: int = 1, use_gpu: bool = False) -> None:
        self.store_uri, self.run_id, self.name = store_uri, run_id, name
        self.cfg = RunConfig.model_validate(config)
        self.generation, self.threads, self.use_gpu = generation, threads, use_gpu
        self._status = ModuleStatus(module=name)
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
        plan = build_plan(self.cfg, check_paths=False, local_cluster=False)
        self.plan = plan.module(self.name)
        self.train_cfg = self.cfg.module_train(self.name)
        self.mcfg = self.cfg.stack[self.name]
        self.device = torch.device("cuda" if self.use_gpu and torch.cuda.is_available() else "cpu")
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
        self.epoch = 0
        last = checkpoint.latest(self.store, self.ckpt_dir)
        if last is not None:
            checkpoint.restore(self.store, last, self.module, self.objective, self.optimizer)
            self.epoch = last["epoch"]
            self.lineage.update({k: last[k] for k in self.lineage if k in last})
            self.lineage["restarts"] = int(last.get("restarts", 0)) + 1
            # A version committed after that checkpoint (the crash came between) is in the store: keep it listed.
            self.lineage["published"] = [v for v in self.store.versions(self.name)
                                         if self.store.manifest(self.name, v).producer.get("generation", 0) == self.generation]
        self._upstream: Upstream | None = None
        self._stream_setup()
        self._metrics: list[dict] = self._load_metrics()
        device = str(self.device)
        if self.device.type == "cuda":
            # Ray narrows CUDA_VISIBLE_DEVICES to the GPU(s) it assigned: cuda:0 here is the node's GPU <ray id>.
            import ray

            ids = ",".join(str(i) for i in ray.get_gpu_ids()) if ray.is_initialized() else "-"
            device = f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()}, Ray GPU {ids})"
        self._update(state=ModuleState.created, epoch=self.epoch, target_epochs=self.train_cfg.epochs,
                     step=self.lineage["step"], published=list(self.lineage["published"]),
                     train_seconds=self.lineage["train_seconds"], started_at=self.lineage["started_at"],
                     node=_node_name(), pid=os.getpid(), device=device, restarts=self.lineage["restarts"])
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
                    self._update(state=ModuleState.waiting_upstream)
                    time.sleep(self.cfg.schedule.poll_seconds)
                    continue
                if step == Step.finish:
                    break
                self.train_until(self.epoch + 1)
                if publishes_after(self.epoch, self.train_cfg.epochs, self.cfg.schedule.publish_every,
                                   self._upstream.manifest.final) and self._ring is None:
                    self.publish(final=False)
            if self._stop.is_set():
                self._update(state=ModuleState.stopped)
                self._write_status()
                return self.status()
            manifest = self.publish(final=True)
            self._update(state=ModuleState.final, final_version=manifest.version, finished_at=now_iso())
            self._write_status()
            return self.status()
        except BaseException as exc:
            self._update(state=ModuleState.failed, error=getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")
            self._write_status()
            raise

    def train_until(self, epoch: int) -> dict:
        """Train epochs until ``epoch`` have been completed; a no-op when they already are."""
        self.setup()
        while self.epoch < epoch:
            self._switch_upstream(block=True)
            self._train_epoch()
            self._count_window_uses()
        return self.status()

    def publish(self, final: bool) -> "object":
        """Run inference with the current weights on the upstream in use and commit a version.

        A module that is not materialized (``store.materialize: false``) commits its weights instead.
        """
        up = self._upstream
        self._update(state=ModuleState.publishing)
        if not self.mcfg.store.materialize:
            return self._published(self._publish_weights(final))
        rows = np.arange(len(up.sample_id))
        fraction = 1.0 if final else self.cfg.schedule.publish_fraction
        if fraction < 1.0:
            rng = np.random.default_rng(self.train_cfg.seed + self.epoch)
            rows = np.sort(rng.choice(rows, size=max(1, int(round(fraction * len(rows)))), replace=False))
        writer = self.store.begin_version(
            self.name, codec=self.cfg.module_codec(self.name), zstd_level=self.mcfg.store.zstd_level,
            final=final, rows_per_shard=self.cfg.store.rows_per_shard, sample_fraction=len(rows) / len(up.sample_id),
            producer={"module": self.name, "epoch": self.epoch, "generation": self.generation,
                      "checkpoint": f"{self.ckpt_dir}/{self.epoch:04d}.safetensors"},
            upstream={"stage": self.plan.upstream, "version": up.manifest.version})
        meta = up.meta
        self.module.eval()
        try:
            with torch.inference_mode():
                for idx in inference_chunks(up, rows, chunk=max(256, 4 * self.train_cfg.batch_size)):
                    z = self.module(up.features(up.x.index_select(0, torch.from_numpy(idx)), self.device))
                    writer.write(meta.take(pa.array(idx)), z.cpu())
            manifest = writer.commit()
        except BaseException:
            writer.abort()
            raise
        finally:
            self.module.train()
        return self._published(manifest)

    def _publish_weights(self, final: bool):
        from safetensors.torch import save as st_save

        up = self._upstream
        weights = st_save({k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()})
        return self.store.commit_weights(
            self.name, weights, shape=list(self.plan.out_shape), final=final,
            producer={"module": self.name, "epoch": self.epoch, "generation": self.generation,
                      "checkpoint": f"{self.ckpt_dir}/{self.epoch:04d}.safetensors"},
            upstream={"stage": self.plan.upstream, "version": up.manifest.version})

    def _published(self, manifest):
        self.lineage["published"].append(manifest.version)
        self._record(f"{self.name}/publish/version", manifest.version)
        self._update(published=list(self.lineage["published"]), state=ModuleState.training)
        self._write_status()
        return manifest

    def status(self) -> dict:
        with self._lock:
            return self._status.model_dump(mode="json")

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
        """At an epoch boundary, move to the newest committed upstream version."""
        if self._reads_stream:
            return self._switch_window(block)
        while True:
            newest = self.store.newest(self.plan.upstream)
            if newest is not None or not block:
                break
            time.sleep(self.cfg.schedule.poll_seconds)
        if newest is None or (self._upstream is not None and self._upstream.manifest.version == newest.version):
            return
        self._upstream = load_source(self.store, self.plan.upstream, newest.version, self.cfg.model_dump(mode="json"),
                                     self.device)
        self._record(f"{self.name}/upstream/version", newest.version)
        self._update(upstream_version=newest.version, upstream_final=newest.final)

    def _train_epoch(self) -> None:
        up, tc = self._upstream, self.train_cfg
        pairing = getattr(self.mcfg.objective, "pairing", None)
        rng = np.random.default_rng([tc.seed, self.plan.index, self.generation, self.epoch])
        batches = PairedBatches(up, batch_size=tc.batch_size, pairing=pairing, rng=rng, device=self.device,
                                max_steps=tc.max_steps_per_epoch)
        gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31)))
        if self.lineage["started_at"] is None:
            self.lineage["started_at"] = now_iso()
        self._update(state=ModuleState.training, started_at=self.lineage["started_at"])
        after_step = getattr(self.objective, "after_step", None)
        losses, samples, t0 = [], 0, time.perf_counter()
        for step, batch in enumerate(batches):
            if self._stop.is_set():
                return
            x, x_pos = batch.x, batch.x_pos
            if pairing == "augment":
                x, x_pos = augment_views(x, gen)
            loss, _stats = local_loss(self.objective, self.module, x, x_pos, batch.labels, batch.groups)
            if faults.armed("nan_loss", self.name, self.epoch + 1):
                loss = loss * float("nan")
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"module {self.name}: loss became {loss.item()} at epoch {self.epoch + 1}, step {step + 1} "
                    f"(upstream {self.plan.upstream} v{up.manifest.version})",
                    f"lower stack.{self.name}.train.lr (now {tc.lr}) or check the upstream activations; "
                    f"the last good checkpoint ({self.ckpt_dir}/{self.epoch:04d}) and versions are kept")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if after_step is not None:
                after_step(self.module)  # e.g. moco's momentum update of its key encoder
            self._stream_tick()
            losses.append(loss.detach())
            samples += len(x)
        seconds = time.perf_counter() - t0
        self.epoch += 1
        mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
        self.lineage["step"] += len(losses)
        self.lineage["train_seconds"] += seconds
        self.lineage["upstream_versions"].append([self.epoch, up.manifest.version])
        if up.manifest.final:
            self.lineage["epochs_on_final"] += 1
        rate = samples / seconds if seconds > 0 else None
        for name, value in (("loss/train", mean_loss), ("samples_per_s", rate), ("epoch_seconds", seconds)):
            self._record(f"{self.name}/{name}", value)
        checkpoint.save(self.store, self.ckpt_dir, self.epoch, self.module, self.objective, self.optimizer,
                        {**self.lineage, "upstream_version": up.manifest.version, "loss": mean_loss})
        self._update(epoch=self.epoch, step=self.lineage["step"], loss=mean_loss, samples_per_second=rate,
                     train_seconds=self.lineage["train_seconds"], peak_memory_bytes=self._peak_memory())
        self._write_metrics()
        self._write_status()

    # ------------------------------------------------------------ streaming (schedule.publish: stream)

    def _stream_setup(self) -> None:
        streaming = self.cfg.schedule.publish == "stream"
        self._ring = StreamRing(self.store, self.name, self.cfg.store.window_samples) \
            if streaming and self.mcfg.store.materialize else None
        below = self.cfg.stack.get(self.plan.upstream)
        self._reads_stream = streaming and below is not None and below.store.materialize
        self._starved = False
        self.lineage.setdefault("stream_consumed", [])
        self._window_uses: dict[int, int] = {}  # upstream chunk version -> epochs trained on it (kept across restarts)
        for _, used in self.lineage["stream_consumed"]:
            for version, *_ in used:
                self._window_uses[version] = self._window_uses.get(version, 0) + 1
        self._window: list = []  # the chunks of the window read for the next epoch
        self._since_chunk, self._cursor, self._order = 0, 0, None

    def _switch_window(self, block: bool) -> None:
        """Stream mode: the upstream's final version once it exists, else a fresh window of its newest chunks."""
        stage, ring = self.plan.upstream, StreamRing(self.store, self.plan.upstream, self.cfg.store.window_samples)
        while True:
            final = self.store.final(stage)
            if final is not None:
                # The final version replaces a window read but not trained on yet (a module waiting past its
                # epochs holds one): keeping it would wait on the stream forever.
                self._starved, self._window = False, []
                if self._upstream is None or self._upstream.manifest.version != final.version:
                    self._upstream = load_source(self.store, stage, final.version, self.cfg.model_dump(mode="json"),
                                                 self.device)
                    self._record(f"{self.name}/upstream/version", final.version)
                    self._update(upstream_version=final.version, upstream_final=True)
                return
            if self._window:
                return  # read at this epoch boundary already, not trained on yet
            chunks, parts = ring.window(self._window_uses, self.cfg.store.max_shard_reuse), []
            for m in chunks:
                try:
                    parts.append((m, load_upstream(self.store, stage, m.version)))
                except (StoreError, OSError):
                    continue  # rotated out of the ring while we read it: skip it, never half of it
            self._starved = not parts
            if parts or not block:
                break
            time.sleep(self.cfg.schedule.poll_seconds)
        if not parts:
            return
        self._window = [m for m, _ in parts]
        self._upstream = concat_upstreams([u for _, u in parts])
        newest = self._window[-1].version
        self._record(f"{self.name}/upstream/version", newest)
        self._update(upstream_version=newest, upstream_final=False)

    def _count_window_uses(self) -> None:
        if not self._window:
            return
        for m in self._window:
            self._window_uses[m.version] = self._window_uses.get(m.version, 0) + 1
        self.lineage["stream_consumed"].append(
            [self.epoch, [[m.version, m.producer.get("checkpoint"), m.producer.get("step")] for m in self._window]])
        self._window = []  # a new window is read for the next epoch

    def _stream_tick(self) -> None:
        """Stream mode: after every few training steps, commit a chunk of activations with the current weights."""
        if self._ring is None or self._upstream is None:
            return
        up, tc = self._upstream, self.train_cfg
        rows_total = len(up.train_rows())
        chunk = min(chunk_rows(self.cfg.store.window_samples, self.cfg.store.rows_per_shard), rows_total)
        self._since_chunk += 1
        if self._since_chunk * tc.batch_size * self.cfg.schedule.publish_fraction < chunk:
            return
        self._since_chunk = 0
        if self._order is None or self._cursor + chunk > len(self._order) or len(self._order) != rows_total:
            rng = np.random.default_rng([tc.seed, self.plan.index, self.generation, self.lineage["step"]])
            self._order, self._cursor = rng.permutation(up.train_rows()), 0
        rows = np.sort(self._order[self._cursor:self._cursor + chunk])
        self._cursor += chunk

        def write(writer) -> None:
            self.module.eval()
            try:
                with torch.inference_mode():
                    z = self.module(up.features(up.x.index_select(0, torch.from_numpy(rows)), self.device))
                writer.write(up.meta.take(pa.array(rows)), z.cpu())
            finally:
                self.module.train()

        manifest = self._ring.append(
            write, codec=self.cfg.module_codec(self.name), rows=len(rows), total_rows=len(up.sample_id),
            rows_per_shard=self.cfg.store.rows_per_shard, zstd_level=self.mcfg.store.zstd_level,
            producer={"module": self.name, "epoch": self.epoch, "step": self.lineage["step"], "generation": self.generation,
                      "checkpoint": f"{self.ckpt_dir}/{self.epoch:04d}.safetensors" if self.epoch else None},
            upstream={"stage": self.plan.upstream, "version": up.manifest.version})
        self._record(f"{self.name}/stream/version", manifest.version)

    def _peak_memory(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB

    def _record(self, name: str, value) -> None:
        self._metrics.append({"time": time.time(), "epoch": self.epoch, "step": self.lineage["step"], "name": name,
                              "value": None if value is None else float(value), "generation": self.generation})

    def _load_metrics(self) -> list[dict]:
        import pyarrow.parquet as pq

        data = self.store.read_bytes(self._metrics_path())
        if data is None:
            return []
        rows = pq.read_table(pa.BufferReader(data)).to_pylist()
        return [r for r in rows if r["epoch"] <= self.epoch]  # drop what a crash left after the checkpoint

    def _metrics_path(self) -> str:
        suffix = "" if self.generation == 0 else f".retrain-{self.generation}"
        return f"metrics/{self.name}{suffix}.parquet"

    def _write_metrics(self) -> None:
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(self._metrics, schema=_METRIC_SCHEMA), sink)
        self.store.write_bytes(self._metrics_path(), sink.getvalue().to_pybytes())

    def _write_status(self) -> None:
        self.store.write_json(f"status/{self.name}.json", self.status())

    def _update(self, **fields) -> None:
        with self._lock:
            self._status = self._status.model_copy(update=fields)


_METRIC_SCHEMA = pa.schema([("time", pa.float64()), ("epoch", pa.int64()), ("step", pa.int64()),
                            ("name", pa.string()), ("value", pa.float64()), ("generation", pa.int64())])


def _node_name() -> str:
    try:
        import ray

        if ray.is_initialized():
            return f"{socket.gethostname()}:{ray.get_runtime_context().get_node_id()[:8]}"
    except Exception:  # noqa: BLE001 - outside Ray the host name is enough
        pass
    return socket.gethostname()
