"""Host memory of one module actor, predicted before launch.

A trainer streams its upstream (``pipeline.feed``), so its memory does not grow with the samples:
it holds a sliding shuffle window of ``feed.buffer_samples`` stored rows (at least one row group; when
unset, at most 256 MiB of rows and their partners, at least two batches) and one row group more where a
batch straddles two of its stretches, the partners a batch fetches from outside the window (at most a
batch), ``feed.readahead`` row groups read ahead, the metadata index (a few dozen bytes a sample: the one term that grows with the
dataset), the model with its gradients and Adam state, one batch's activations, and, while publishing,
one row group and two inference chunks (one computed while the one before it is written;
``publish_chunk`` sizes them from the budget).
``build_plan`` refuses a config whose prediction exceeds ``resources.memory_per_module``.

It also fixes how a module publishes (``publish_policy``): the chunk size, and for a wide module whose
intermediate versions would be large, a thinner schedule than every epoch over every sample.
"""

from __future__ import annotations

import math
import os

from pipeline.store.writer import ROW_GROUP_BYTES
from schemas.config import RunConfig

PROCESS_BASE = 450 * 2**20  # a Python process with torch, pyarrow and a Ray worker loaded, measured ~0.4 GiB
INDEX_BYTES_PER_ROW = 96  # metadata index: 7 columns as numpy + the Arrow table + the epoch plan arrays
AUTO_BUFFER_BYTES = 256 * 2**20  # an automatic shuffle window (and its partners) holds at most this many bytes ...
AUTO_BUFFER_SHARE = 0.25  # ... and at most this share of the budget
MIN_AUTO_BATCHES = 2  # ... but at least this many batches of rows (a batch mixes rows of a few row groups)
MAX_AUTO_BUFFER = 32768  # rows: a version of small rows (images of a few KB) is shuffled whole
STEP_SHARE = 0.5  # on CPU, a whole step up to this share of the actor's budget; beyond it, micro-batches
CPU_MICRO_BYTES = 384 * 2**20  # on CPU, what autograd saves for one micro-batch, at most (stl10-gim: 8 / 8 / 11)
PUBLISH_CHUNK_BYTES = 128 * 2**20  # inference activations of one publishing chunk, at most
PUBLISH_CHUNK_SHARE = 0.1  # ... and at most this share of the actor's budget
PUBLISH_SHARD_BYTES = 4 * ROW_GROUP_BYTES  # a writer buffers one shard before writing it: published shards stay this small
THIN_BYTES = 512 * 2**20  # an intermediate version larger than this is thinned (when the user did not choose)
MIN_FRACTION = 0.1
THIN_VERSIONS = 10  # a thinned module publishes about this many intermediate versions over its epochs


def node_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def budget(cfg: RunConfig) -> tuple[int | None, str]:
    """Bytes one module actor may use, and where that number comes from."""
    if cfg.resources.memory_per_module is not None:
        return int(cfg.resources.memory_per_module * 2**30), "resources.memory_per_module"
    have = node_memory()
    if have is None:
        return None, ""
    sharing = 1 if cfg.schedule.mode == "sequential" else len(cfg.stack)
    return have // sharing, f"this machine's memory / {sharing} module(s) (resources.memory_per_module unset)"


def buffer_samples(cfg: RunConfig, in_row_bytes: int, batch_size: int) -> int:
    """``feed.buffer_samples``, or when unset as many stored rows as fit in ``AUTO_BUFFER_BYTES`` (and a quarter
    of the budget): at least ``MIN_AUTO_BATCHES`` batches, at most ``MAX_AUTO_BUFFER`` rows.

    The window is there for shuffle quality (each batch mixes rows of several row groups), not to fill the
    budget: for wide rows a window of a few row groups mixes pieces of nearly every object (the input is dealt
    out in pieces of objects, ``pipeline.run.ingest.shard_order``), where the whole version would hold
    gigabytes; a version of small rows under ``MAX_AUTO_BUFFER`` is held whole, one full shuffle as in memory."""
    if cfg.feed.buffer_samples is not None:
        return cfg.feed.buffer_samples
    have, _ = budget(cfg)
    cap = AUTO_BUFFER_BYTES if have is None else min(AUTO_BUFFER_BYTES, int(AUTO_BUFFER_SHARE * have))
    # a paired window also holds up to one partner a row (host_memory's window term): both within the cap
    return max(MIN_AUTO_BATCHES * batch_size, min(MAX_AUTO_BUFFER, cap // max(1, 2 * in_row_bytes)))


def forward_samples(batch_size: int, pairing) -> int:
    """Samples one step runs through the module: the batch, and with a partner per sample (metadata pairs, or
    two augmented views), twice the batch."""
    return 2 * batch_size if pairing in ("same_instance", "neighbor_pose", "augment") else batch_size


def step_bytes(*, samples: int, micro_batch: int, in_values: int, out_values: int, saved: int) -> int:
    """Float32 bytes a training step holds at its peak (pipeline/nn/step.py): the input batch, the outputs and
    their gradient for every sample, and for one micro-batch what autograd saves plus about two more maps of
    the output's width alive during the backward (measured on stl10-gim's m1 on CPU: 3.0 GB at batch 32, 1.5 GB
    with micro-batches of 8)."""
    return 4 * samples * (in_values + 2 * out_values) + min(micro_batch, samples) * (saved + 2 * 4 * out_values)


def micro_batch(cfg: RunConfig, name: str, *, samples: int, in_values: int, out_values: int, saved: int,
                on_cpu: bool) -> int:
    """Samples per forward of a step: ``train.micro_batch`` where set; else, on CPU, the largest micro-batch
    whose saved activations keep within ``CPU_MICRO_BYTES`` and whose step keeps within ``STEP_SHARE`` of the
    actor's budget (at least 1), or the whole step where it fits both.

    On CPU the step's activations are most of an actor's memory, and the modules that share a node hold
    theirs side by side; one more forward a step is the price for losses over every pair of the batch (a grid
    loss is taken by parts and pays none; pipeline/nn/step.py), which a kept heap
    (``pipeline.malloc.actor_environment``) pays back on wide modules: stl10-gim's m1 stepped in 5.3 s with
    micro-batches of 8 at a 3.0 GB peak, 5.3 s whole at 6.5 GB. On a GPU the activations are in device
    memory and the whole batch runs at once unless the user sets the key."""
    chosen = cfg.module_train(name).micro_batch
    if chosen is not None:
        return min(chosen, samples)
    if not on_cpu:
        return samples
    per_sample = saved + 2 * 4 * out_values
    micro = max(1, CPU_MICRO_BYTES // max(1, saved))
    have, _ = budget(cfg)
    if have is not None:
        fixed = step_bytes(samples=samples, micro_batch=0, in_values=in_values, out_values=out_values, saved=saved)
        micro = min(micro, max(1, (int(STEP_SHARE * have) - fixed) // per_sample))
    return min(samples, micro)


def host_memory(cfg: RunConfig, *, in_shape, out_shape, in_codec: str, params: int, batch_size: int, pairing,
                rows: int | None, buffer: int, row_bytes, out_codec: str = "float32", saved: int = 0,
                micro: int | None = None) -> dict[str, int]:
    """Predicted peak bytes by part (``row_bytes(codec, shape)`` gives a stored row's width; ``saved``: what
    autograd keeps for one sample, ``micro``: samples per forward, see ``step_bytes``)."""
    stored = row_bytes(in_codec, tuple(in_shape))
    in_values, out_values = math.prod(in_shape), math.prod(out_shape or [0])
    unit = max(1, min(cfg.store.rows_per_shard, ROW_GROUP_BYTES // max(1, stored)))  # rows of one row group
    window = max(buffer, unit) if rows is None else min(rows, max(buffer, min(unit, rows)))
    paired = pairing in ("same_instance", "neighbor_pose")
    chunk = publish_chunk(cfg, in_values, out_values)
    parts = {
        "process": PROCESS_BASE,
        # the window, one row group more where a batch straddles two stretches, a batch of fetched partners
        "window": (window + min(unit, rows or unit) + (batch_size if paired else 0)) * stored,
        "readahead": (cfg.feed.readahead + 1) * min(unit, rows or unit) * stored,
        "index": (rows or 0) * INDEX_BYTES_PER_ROW,
        "model": params * 4 * 4,  # weights, gradients, Adam's two moments (float32)
        "batch": step_bytes(samples=(fwd := forward_samples(batch_size, pairing)), micro_batch=micro or fwd,
                            in_values=in_values, out_values=out_values, saved=saved),
    }
    # one row group read, the chunk being computed (float32 activations), the one being written (stored)
    # and the shard the writer fills, twice: writing it copies the rows of a split that is not one run
    # (a final version's splits get row groups of their own, see VersionWriter)
    out_row = row_bytes(out_codec, tuple(out_shape or [0]))
    publish = (min(unit, rows or unit) * stored + chunk * (inference_bytes(in_values, out_values) + out_row)
               + 2 * publish_shard_rows(cfg, out_row) * out_row)
    parts["publish"] = max(0, publish - parts["window"] - parts["readahead"] - parts["batch"])  # not while training
    return parts


KNOBS = {"window": "feed.buffer_samples", "readahead": "feed.readahead", "batch": "train.micro_batch or train.batch_size",
         "publish": "resources.memory_per_module (publishing chunks are a tenth of it, at most 128 MiB) or "
                    "store.rows_per_shard",
         "index": "dataset size (max_per_split)", "model": "the module's width", "process": "-"}


def inference_bytes(in_values: int, out_values: int) -> int:
    """Float32 bytes one sample holds during inference: its input, and about three maps of the output's width
    alive at once (a block's input, its widest inner map, its output)."""
    return 4 * (in_values + 3 * out_values)


def publish_chunk(cfg: RunConfig, in_values: int, out_values: int) -> int:
    """Rows run through the module at once while publishing: as many as fit in min(128 MiB, a tenth of
    the actor's budget) of inference activations, at least one. It does not depend on the dataset size."""
    have, _ = budget(cfg)
    cap = PUBLISH_CHUNK_BYTES if have is None else min(PUBLISH_CHUNK_BYTES, int(PUBLISH_CHUNK_SHARE * have))
    return max(1, cap // max(1, inference_bytes(in_values, out_values)))


def publish_shard_rows(cfg: RunConfig, out_row_bytes: int) -> int:
    """Rows per published shard: ``store.rows_per_shard``, fewer for wide rows (a shard is buffered whole)."""
    return max(1, min(cfg.store.rows_per_shard, PUBLISH_SHARD_BYTES // max(1, out_row_bytes)))


def publish_policy(cfg: RunConfig, *, epochs: int, version_bytes: int | None,
                   read_above: bool = True) -> tuple[int, float]:
    """(publish_every, publish_fraction) of one module: ``schedule.publish_every`` / ``publish_fraction`` where
    the user set them; else none where no module trains on intermediate versions (``read_above`` false: the top
    module, or every module in sequential mode; they would be inference and bytes for nobody; ``publish_every``
    0 = the final version only), for a module whose version would exceed ``THIN_BYTES`` a sample of ``THIN_BYTES`` worth
    of rows (at least a tenth) about ``THIN_VERSIONS`` times over its epochs, and every epoch over every
    train sample otherwise. Final versions always cover every sample."""
    sch = cfg.schedule
    wide = version_bytes is not None and version_bytes > THIN_BYTES
    every = sch.publish_every if sch.publish_every is not None else \
        (0 if not read_above else max(1, epochs // THIN_VERSIONS) if wide else 1)
    if sch.publish_fraction is not None:
        fraction = sch.publish_fraction
    else:
        fraction = max(MIN_FRACTION, math.floor(100 * THIN_BYTES / version_bytes) / 100) if wide else 1.0
    return every, fraction


def memory_problem(cfg: RunConfig, name: str, parts: dict[str, int]) -> tuple[str, str] | None:
    """A problem naming ``resources.memory_per_module`` when ``parts`` exceed the budget, else None."""
    have, where = budget(cfg)
    need = sum(parts.values())
    if have is None or need <= have:
        return None
    biggest = max((k for k in parts if k != "process"), key=parts.get)
    return ("resources.memory_per_module",
            f"module {name} would hold about {need / 2**30:.2f} GiB of host memory ({format_parts(parts)}), more than "
            f"{where} ({have / 2**30:.2f} GiB); its largest part is the {biggest}: lower {KNOBS[biggest]}, "
            "or raise resources.memory_per_module where the node has the memory")


def format_parts(parts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v / 2**20:,.0f} MiB" for k, v in parts.items() if v)
