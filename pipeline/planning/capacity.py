"""Capacity planning: what each module boundary costs in store bytes, bandwidth or recompute FLOPs.

Pure functions of the config and its plan (``pipeline.planning.plan.build_plan``); nothing is
trained or written. ``isostack plan`` prints ``format_capacity``; ``isostack validate``
adds the same table at the plan's own sample count.

Model of one version (checked against real manifests in tests/pipeline/test_capacity.py):
``samples * (row_bytes + META_BYTES_PER_ROW) + shards * (SHARD_OVERHEAD + params)``, where
``row_bytes`` is the codec's bytes per sample (2 per value for float16/bfloat16, 4 for
float32, 1 for int8 plus its per-shard scale/offset), the metadata columns add a few
zstd-compressed bytes per row and each Parquet shard a footer. With zstd on the tensor
column the real size is smaller by a data-dependent factor, so those rows are upper bounds.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.errors import ConfigError
from pipeline.nn.modules import build_module, shape_text
from pipeline.planning import memory
from pipeline.planning.plan import RunPlan, build_plan
from pipeline.store.codec import channel_axis, get_codec
from schemas.config import RunConfig

META_BYTES_PER_ROW = 4  # sample_id, split, label, pose: zstd-compressed, measured 2-6 B/row
SHARD_OVERHEAD = 3000  # Parquet footer + Arrow schema of one shard, measured ~2.6 KB
INT8_PARAM_BYTES_PER_CHANNEL = 64  # scale + offset as JSON, twice (Parquet key-value + Arrow schema), measured ~63


@dataclasses.dataclass(frozen=True)
class Boundary:
    """What crosses the store above one stage (``input`` or a module)."""

    stage: str
    shape: tuple[int, ...]  # per sample
    codec: str
    zstd_level: int | None
    materialized: bool
    read_by: tuple[str, ...]  # modules (and 'final') that read this stage's rows from the store
    bytes_per_sample: float  # stored bytes per sample, overheads included; 0 when not materialized
    bytes_per_version: int  # one full version of ``samples`` rows (weights only when not materialized)
    read_bytes_per_s: float  # store reads of this stage at ``throughput`` samples/s for every reader
    held_bytes: int  # store space the stage holds while training (window ring in stream mode)
    recompute_flops_per_sample: int  # forward FLOPs to rebuild this stage per sample when not materialized
    upper_bound: bool  # zstd: the stored size is at most the numbers above

    @property
    def values(self) -> int:
        return math.prod(self.shape)


def row_bytes(codec: str, shape: tuple[int, ...]) -> int:
    """Bytes of one sample's tensor in ``codec`` (the ``fixed_size_binary`` width the codec writes)."""
    return get_codec(codec, shape).row_bytes


def shard_overhead(codec: str, shape: tuple[int, ...]) -> int:
    """Bytes a shard adds beyond its rows: footer and schema, plus int8's per-channel params."""
    if codec != "int8":
        return SHARD_OVERHEAD
    axis = channel_axis(tuple(shape))
    channels = shape[axis] if axis is not None else 1
    return SHARD_OVERHEAD + INT8_PARAM_BYTES_PER_CHANNEL * channels


def version_bytes(codec: str, shape: tuple[int, ...], samples: int, rows_per_shard: int) -> int:
    """Estimated bytes of a version of ``samples`` rows (before zstd)."""
    shards = max(1, math.ceil(samples / rows_per_shard)) if samples else 0
    return samples * (row_bytes(codec, shape) + META_BYTES_PER_ROW) + shards * shard_overhead(codec, shape)


def forward_flops(module_cfg, in_shape: tuple[int, ...]) -> int:
    """Forward FLOPs of one module for one sample (multiply-add = 2), counted on the meta device."""
    with torch.device("meta"):
        module = build_module(module_cfg, tuple(in_shape))
        x = torch.empty((1, *in_shape))
        with FlopCounterMode(display=False) as counter:
            module(x)
    return int(counter.get_total_flops())


def capacity(cfg: RunConfig, plan: RunPlan, samples: int, throughput: float) -> list[Boundary]:
    """Every boundary of the stack, bottom (``input``) to top, for ``samples`` rows at ``throughput`` samples/s."""
    rps = cfg.store.rows_per_shard
    stream = cfg.schedule.publish == "stream"
    # Who reads whose rows: a module reads its source (the nearest materialized stage below) each epoch.
    readers: dict[str, list[str]] = {"input": []}
    for m in plan.modules:
        readers.setdefault(m.name, [])
        readers[m.source or m.upstream].append(m.name)
    if plan.modules:
        readers[plan.modules[-1].name].append("final")
    flops = {m.name: forward_flops(cfg.stack[m.name], tuple(m.in_shape)) for m in plan.modules
             if not cfg.stack[m.name].store.materialize and m.in_shape}

    out = []
    input_shape = tuple(plan.input_shape)
    out.append(_boundary("input", input_shape, "uint8", None, True, readers["input"], samples, rps, throughput,
                         held=None, flops=0, params_bytes=0))
    chain_flops = 0
    for m in plan.modules:
        mcfg = cfg.stack[m.name]
        materialize = mcfg.store.materialize
        chain_flops = chain_flops + flops[m.name] if not materialize else 0
        # Intermediate versions: a ring of window_samples in stream mode, else the newest keep_versions
        # versions after retention (all of them until training ends; see `isostack gc`).
        held = min(samples, cfg.store.window_samples) if stream else None
        out.append(_boundary(m.name, tuple(m.out_shape), cfg.module_codec(m.name), mcfg.store.zstd_level, materialize,
                             readers[m.name], samples, rps, throughput, held=held, flops=chain_flops,
                             params_bytes=m.params * 4, keep=cfg.schedule.keep_versions))
    return out


def _boundary(stage, shape, codec, zstd, materialize, read_by, samples, rps, throughput, *, held, flops,
              params_bytes, keep: int = 1) -> Boundary:
    if not materialize:
        # Only the frozen float32 weights are stored; the module above recomputes the rows.
        return Boundary(stage, shape, codec, zstd, False, tuple(read_by), 0.0, params_bytes, 0.0, params_bytes * keep,
                        flops, False)
    per_version = version_bytes(codec, shape, samples, rps)
    per_sample = per_version / samples if samples else float(row_bytes(codec, shape))
    if held is not None:  # stream: the ring, plus the final version at the end
        held_bytes = version_bytes(codec, shape, held, rps) + per_version
    else:
        held_bytes = per_version * (1 if stage == "input" else keep)
    readers = [r for r in read_by if r != "final"] or list(read_by)
    return Boundary(stage, shape, codec, zstd, True, tuple(read_by), per_sample, per_version,
                    throughput * per_sample * len(readers), held_bytes, 0, zstd is not None)


def _size(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:,.1f} {unit}"
    return f"{n:,.0f} B"


def format_capacity(rows: list[Boundary], samples: int, throughput: float, *, stream: bool = False) -> str:
    """The planner's table: one line per boundary."""
    head = (f"{'boundary':<10}{'shape':<20}{'codec':<14}{'per sample':>13}{'per version':>13}"
            f"{'read @ ' + format(throughput, 'g') + '/s':>16}{'held':>13}{'recompute/sample':>18}  read by")
    lines = [f"capacity for {samples:,} samples at {throughput:g} samples/s "
             f"({'stream: intermediate versions held in a window ring' if stream else 'full versions'})", head]
    for b in rows:
        codec = b.codec + (f"+zstd{b.zstd_level}" if b.zstd_level else "")
        le = "≤" if b.upper_bound else ""
        if b.materialized:
            cells = (le + _size(b.bytes_per_sample), le + _size(b.bytes_per_version),
                     le + _size(b.read_bytes_per_s) + "/s", le + _size(b.held_bytes), "-")
        else:
            cells = ("0 (weights)", _size(b.bytes_per_version), "0", _size(b.held_bytes),
                     f"{b.recompute_flops_per_sample / 1e9:,.2f} GFLOP")
        lines.append(f"{b.stage:<10}{shape_text(b.shape):<20}{codec:<14}{cells[0]:>13}{cells[1]:>13}{cells[2]:>16}{cells[3]:>13}"
                     f"{cells[4]:>18}  {', '.join(b.read_by) or '-'}")
    stored = sum(b.bytes_per_version for b in rows if b.stage != "input")
    lines.append(f"one version of every module: {_size(stored)}; held: "
                 f"{'window ring + final' if stream else 'keep_versions newest versions'} per stage after retention"
                 + ("; zstd rows (≤) are before compression" if any(b.upper_bound for b in rows) else ""))
    return "\n".join(lines)


def plan_for_capacity(cfg: RunConfig) -> RunPlan:
    """The plan, for sizing only: data paths and this machine's GPUs are not checked (a plan is made
    before the data or the cluster exist); every other problem is still a ConfigError."""

    try:
        return build_plan(cfg, check_paths=False, local_cluster=False)
    except ConfigError as exc:
        if not exc.problems or any(key != "dataset.path" for key, _ in exc.problems):
            raise
    # Only the missing dataset.path: shapes do not depend on where the files are.
    placeholder = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"path": "<unset>"})})
    return build_plan(placeholder, check_paths=False, local_cluster=False)


def describe(plan: RunPlan, cfg: RunConfig) -> str:
    """A one-screen summary of the plan for `isostack validate`."""
    lines = [f"dataset {plan.dataset}: input {shape_text(plan.input_shape)}, "
             f"{plan.rows if plan.rows is not None else 'unknown'} samples, {plan.num_classes or '?'} classes",
             f"schedule {cfg.schedule.mode}, publish every "
             f"{'/'.join(str(m.publish_every or 'final') for m in plan.modules)} epoch(s) "
             f"(fraction {'/'.join(f'{m.publish_fraction:g}' for m in plan.modules)}), "
             f"store {cfg.store.uri} ({cfg.store.codec})",
             f"{'module':<10}{'reads':<10}{'in':<18}{'out':<18}{'params':>10}  {'objective':<26}{'epochs':>7}{'batch':>7}"
             f"{'MB/version':>12}"]
    total = 0
    for m in plan.modules:
        mb = f"{m.bytes_per_version / 1e6:,.1f}" if m.bytes_per_version is not None else "?"
        total += m.bytes_per_version or 0
        objective = f"{m.objective}/{m.pairing}" if m.pairing else m.objective
        lines.append(f"{m.name:<10}{m.upstream:<10}{shape_text(m.in_shape):<18}{shape_text(m.out_shape):<18}{m.params:>10,}  "
                     f"{objective:<26}{m.epochs:>7}{m.batch_size:>7}{mb:>12}")
    lines.append(f"all modules: {sum(m.params for m in plan.modules):,} parameters, "
                 f"{total / 1e6:,.1f} MB per full set of versions")
    have, where = memory.budget(cfg)
    lines += ["", f"host memory per module actor (predicted peak; budget {have / 2**30:,.2f} GiB from {where})"
              if have else "host memory per module actor (predicted peak)"]
    for m in plan.modules:
        if m.host_memory:
            lines.append(f"{m.name:<10}{sum(m.host_memory.values()) / 2**30:>8,.2f} GiB  buffer {m.buffer_samples:,} rows: "
                         f"{memory.format_parts(m.host_memory)}")
    if plan.rows:  # the capacity planner at the dataset's size (`isostack plan` for other sizes and throughputs)
        lines += ["", format_capacity(capacity(cfg, plan, plan.rows, 1000.0), plan.rows, 1000.0,
                                      stream=cfg.schedule.publish == "stream")]
    return "\n".join(lines)
