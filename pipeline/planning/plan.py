"""The plan: shapes inferred through the stack and every check that can run before Ray.

``build_plan`` reports ALL problems at once as a ``ConfigError``, each naming
its key path. It imports torch (for shape inference on the meta device) but
never Ray.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from pydantic import BaseModel, Field

from pipeline.data import capabilities
from pipeline.data.base import LIGHTING_TRAIN, N_LIGHTINGS, NORB_TEST_INSTANCES, NORB_TRAIN_INSTANCES
from pipeline.errors import ConfigError
from pipeline.nn.footprint import saved_bytes
from pipeline.nn.modules import ShapeError, infer_shape, shape_text
from pipeline.nn.objectives import ModuleFacts, objective_problems
from pipeline.nn.pairing import PAIRING_NEEDS
from pipeline.planning import memory
from pipeline.store.codec import get_codec
from schemas.config import RunConfig

# Datasets whose size the plan can state without loading them.


class ModulePlan(BaseModel):
    name: str = Field(description="Module name (its stage in the store).")
    index: int = Field(description="Position in the stack, 0 = bottom.")
    upstream: str = Field(description="Stage this module reads: 'input' or the module below.")
    in_shape: list[int] = Field(description="Per-sample input shape.")
    out_shape: list[int] = Field(description="Per-sample output shape (what it publishes).")
    params: int = Field(description="Trainable parameters of the module (objective heads excluded).")
    objective: str = Field(description="Local loss.")
    pairing: str | None = Field(description="Positive pairing used by the loss.")
    epochs: int = Field(description="Training epochs, settle epochs included.")
    batch_size: int = Field(description="Samples per step.")
    lr: float = Field(description="Adam learning rate.")
    bytes_per_version: int | None = Field(description="Estimated bytes of one full version of its activations.")
    source: str = Field("", description="The materialized stage its input is read from ('' = upstream itself).")
    recompute: list[str] = Field(default_factory=list, description="Modules below (not materialized) whose frozen "
                                 "weights recompute its input from `source`, bottom to top.")
    buffer_samples: int = Field(0, description="Rows of its shuffle window (feed.buffer_samples, or the automatic size).")
    host_memory: dict[str, int] = Field(default_factory=dict, description="Predicted peak host bytes of its actor, "
                                        "by part (pipeline/planning/memory.py).")
    saved_bytes: int = Field(0, description="Bytes autograd saves per sample of a training forward (float32; from one "
                             "sample's forward, pipeline/nn/footprint.py); 0 = not planned.")
    micro_batch: int = Field(0, description="Samples per forward of a training step (train.micro_batch, or chosen from "
                             "memory on CPU; pipeline/nn/step.py); 0 = not planned.")
    publish_chunk: int = Field(1, description="Rows run through the module at once while publishing (sized from memory).")
    publish_every: int = Field(1, description="Epochs between intermediate versions (schedule.publish_every, or chosen "
                               "from the version's bytes; 0 = the final version only, the top module's default).")
    publish_fraction: float = Field(1.0, description="Share of the train rows an intermediate version covers "
                                    "(schedule.publish_fraction, or chosen from the version's bytes).")


class RunPlan(BaseModel):
    dataset: str = Field(description="Dataset kind.")
    input_shape: list[int] = Field(description="Per-sample input shape: an image (C, H, W) or a signal (C, T).")
    num_classes: int | None = Field(description="Classes of the dataset, where known.")
    rows: int | None = Field(description="Estimated samples (train + test), where known without loading.")
    modules: list[ModulePlan] = Field(description="The stack, bottom to top.")

    def module(self, name: str) -> ModulePlan:
        return next(m for m in self.modules if m.name == name)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modules]


def build_plan(cfg: RunConfig, *, check_paths: bool = True, local_cluster: bool | None = None,
               check_machine: bool = True) -> RunPlan:
    """Infer every module's shapes and check the config; ConfigError lists every problem. ``check_machine=False``
    leaves out whether training fits this machine (memory, devices): for loading a trained encoder elsewhere."""
    ds = cfg.dataset
    caps = capabilities(ds.kind)
    problems: list[tuple[str, str]] = _dataset_problems(cfg, caps, check_paths)

    # Sequence datasets (audio) give (C, T) signals; the rest (C, S, S) images.
    shape: tuple[int, ...] = (ds.channels, ds.length) if caps.sequence else (ds.channels, ds.image_size, ds.image_size)
    input_shape = shape
    rows = estimate_rows(cfg)
    modules: list[ModulePlan] = []
    upstream = "input"
    for index, (name, mod) in enumerate(cfg.stack.items()):
        key = f"stack.{name}"
        train = cfg.module_train(name)
        obj = mod.objective
        if mod.patches is not None and index > 0:
            problems.append((f"{key}.patches", "only the first module can cut images into patches"))
        out_shape, params = None, 0
        if shape is not None:
            try:
                out_shape, params = infer_shape(mod, shape)
            except ShapeError as exc:
                for layer_index, msg in exc.problems:
                    where = f"{key}.layers[{layer_index}]" if layer_index is not None else key
                    problems.append((where, f"{msg} (input to {name} is {shape_text(shape)})"))
        pairing = getattr(obj, "pairing", None)
        if obj.kind != "supervised_local" and pairing is not None:
            problems += _pairing_problems(key, name, index, pairing, ds.kind, caps)
        problems += _view_problems(key, name, index, obj, shape)
        if out_shape is not None:
            facts = ModuleFacts(tuple(out_shape), tuple(shape), index=index, batch_size=train.batch_size,
                                num_classes=caps.num_classes)
            problems += [(f"{key}.{field}", msg) for field, msg in objective_problems(obj, facts)]
        modules.append(ModulePlan(
            name=name, index=index, upstream=upstream, in_shape=list(shape or ()), out_shape=list(out_shape or ()),
            params=params, objective=obj.kind, pairing=pairing if obj.kind != "supervised_local" else None,
            epochs=train.epochs, batch_size=train.batch_size, lr=train.lr,
            # The tensor bytes alone; pipeline/planning/capacity.py adds the metadata and shard overheads.
            bytes_per_version=(rows * get_codec(cfg.module_codec(name), tuple(out_shape)).row_bytes)
            if rows and out_shape else None,
        ))
        below = modules[-2] if index > 0 else None
        if below is not None and not cfg.stack[below.name].store.materialize:
            modules[-1].source = below.source or below.upstream
            modules[-1].recompute = [*below.recompute, below.name]
        shape, upstream = out_shape, name

    problems += _materialize_problems(cfg, modules)
    if check_machine:  # what training needs of this machine; a trained encoder loads on any
        problems += _recompute_problems(cfg, modules) + _memory_problems(cfg, modules, rows) + \
            _resource_problems(cfg, local_cluster)
    if problems:
        raise ConfigError(problems)
    return RunPlan(dataset=ds.kind, input_shape=list(input_shape), num_classes=caps.num_classes, rows=rows, modules=modules)


def _dataset_problems(cfg: RunConfig, caps, check_paths: bool) -> list[tuple[str, str]]:
    ds, out = cfg.dataset, []
    if caps.needs_path:
        if not ds.path:
            out.append(("dataset.path", f"dataset {ds.kind!r} reads local files and needs dataset.path "
                                        f"(e.g. --set dataset.path=/data/{ds.kind})"))
        elif check_paths and "://" not in ds.path and not Path(ds.path).expanduser().is_dir():
            out.append(("dataset.path", f"{ds.path!r} is not a directory; dataset {ds.kind!r} expects its files there"))
    if ds.split == "lighting" and not caps.has_lighting:
        out.append(("dataset.split", f"'lighting' needs lighting metadata, which dataset {ds.kind!r} lacks; use 'instances'"))
    if caps.sequence and ds.channels != 1:
        out.append(("dataset.channels", f"dataset {ds.kind!r} gives mono signals (1, T); set dataset.channels: 1"))
    for key in ("instances", "azimuths", "elevations", "lightings"):
        values, count = getattr(ds, key), caps.factor(key)
        if values is None:
            continue
        if count is None:
            out.append((f"dataset.{key}", f"dataset {ds.kind!r} has no {key}; remove the key"))
        elif any(v < 0 or v >= count for v in values) or not values:
            out.append((f"dataset.{key}", f"indices must be within 0..{count - 1}, found {values}"))
    if ds.categories is not None and caps.num_classes is not None:
        bad = [c for c in ds.categories if c < 0 or c >= caps.num_classes]
        if bad or not ds.categories:
            out.append(("dataset.categories", f"labels must be within 0..{caps.num_classes - 1}, found {ds.categories}"))
    if caps.norb_instance_split and ds.split == "instances" and ds.instances is not None:
        if not set(ds.instances) & set(NORB_TRAIN_INSTANCES) or not set(ds.instances) & set(NORB_TEST_INSTANCES):
            out.append(("dataset.instances", f"{ds.instances} leaves a split empty under split 'instances' (train "
                                             f"{_ids(NORB_TRAIN_INSTANCES)}; test {_ids(NORB_TEST_INSTANCES)}); "
                                             "keep one of each or use split 'lighting'"))
    if ds.split == "lighting" and ds.lightings is not None:
        test_lightings = set(range(N_LIGHTINGS)) - set(LIGHTING_TRAIN)
        if not set(ds.lightings) & set(LIGHTING_TRAIN) or not set(ds.lightings) & test_lightings:
            out.append(("dataset.lightings", f"{ds.lightings} leaves a split empty under split 'lighting' "
                                             f"(train {_ids(LIGHTING_TRAIN)}; test {_ids(test_lightings)})"))
    return out


def _pairing_problems(key, name, index, pairing, kind, caps) -> list[tuple[str, str]]:
    have = {"label"}
    if caps.has_instance:
        have.add("instance")
    if caps.has_pose:
        have |= {"azimuth", "elevation"}
    missing = sorted(PAIRING_NEEDS[pairing] - have)
    out = []
    if missing:
        instead = "'temporal' (time steps of a sequence)" if caps.sequence else "'augment' (first module) or 'patch_grid'"
        out.append((f"{key}.objective.pairing",
                    f"{pairing!r} needs {' and '.join(missing)}, which dataset {kind!r} lacks; use {instead}"))
    if pairing == "augment" and index > 0:
        out.append((f"{key}.objective.pairing",
                    f"'augment' makes two views of an image, so only the first module can use it ({name} is module {index + 1})"))
    return out


def _view_problems(key: str, name: str, index: int, obj, shape) -> list[tuple[str, str]]:
    """Views (pairing augment, objective.pair_views) are of images: the first module's input; pair_views also
    needs a partner row (a pairing of samples)."""
    pairing, where = obj.pairing if obj.kind != "supervised_local" else None, f"{key}.objective.pair_views"
    sequence = shape is not None and len(shape) == 2
    if pairing == "augment" and sequence:
        return [(f"{key}.objective.pairing", f"'augment' makes two views of an image, but {name} reads a sequence "
                                             f"{shape_text(shape)}; use 'temporal' (neighbouring time steps) or "
                                             "'same_instance'")]
    if not obj.pair_views or pairing == "augment":  # augment views every row anyway
        return []
    if pairing not in ("same_instance", "neighbor_pose"):
        return [(where, f"views each row of a pair of samples and its partner, but {name} has no partner rows "
                        f"({obj.kind}, pairing {pairing!r}); set pair_views: false"
                        + ("" if sequence else ", or pairing 'augment' for two views of one image"))]
    if index > 0:
        return [(where, f"views images, so only the first module can use it ({name} is module {index + 1}); "
                        "set pair_views: false")]
    if shape is not None and len(shape) != 3:
        return [(where, f"views images (C, H, W), but {name} reads {shape_text(shape)}; set pair_views: false")]
    return []


def _materialize_problems(cfg: RunConfig, modules: list[ModulePlan]) -> list[tuple[str, str]]:
    """A non-materialized module needs a module above it."""
    top = modules[-1].name if modules else None
    if top is not None and not cfg.stack[top].store.materialize:
        return [(f"stack.{top}.store.materialize", "the top module's activations are what the final stage reads and "
                                                   "exports; only modules below the top can skip materializing")]
    return []


def _recompute_problems(cfg: RunConfig, modules: list[ModulePlan]) -> list[tuple[str, str]]:
    """A module's recompute chain (its non-materialized modules below) must fit the device it trains on."""
    out = []
    for m in modules:
        if not m.recompute or not m.in_shape:
            continue
        need = recompute_bytes(cfg, modules, m)
        have, where = _device_bytes(cfg)
        if have is not None and need > have:
            last = m.recompute[-1]
            out.append((f"stack.{last}.store.materialize",
                        f"{m.name} would recompute {' -> '.join(m.recompute)} from {m.source} for each batch: "
                        f"about {need / 2**30:.2f} GiB on top of its own training, more than {where} "
                        f"({have / 2**30:.2f} GiB); materialize {last} (true), lower stack.{m.name}.train.batch_size, "
                        "or set resources.device_memory_gb"))
    return out


def _memory_problems(cfg: RunConfig, modules: list[ModulePlan], rows: int | None) -> list[tuple[str, str]]:
    """Fill each module's predicted host memory; a module over resources.memory_per_module is a problem."""
    out = []
    for m in modules:
        if not m.in_shape or not m.out_shape:
            continue
        src = next((p for p in modules if p.name == m.source), None) if m.source else None
        stored_shape = tuple(src.in_shape if src else m.in_shape) if m.source == "input" else \
            tuple(src.out_shape if src else m.in_shape)
        codec = "uint8" if (m.source or m.upstream) == "input" else cfg.module_codec(m.source or m.upstream)
        row_bytes = lambda c, shape: get_codec(c, shape).row_bytes  # noqa: E731
        m.buffer_samples = memory.buffer_samples(cfg, row_bytes(codec, stored_shape), m.batch_size)
        saved = m.saved_bytes = saved_bytes(cfg.stack[m.name], tuple(m.in_shape))
        samples = memory.forward_samples(m.batch_size, m.pairing)
        m.micro_batch = memory.micro_batch(cfg, m.name, samples=samples, in_values=math.prod(m.in_shape),
                                           out_values=math.prod(m.out_shape), saved=saved, on_cpu=_on_cpu(cfg))
        m.host_memory = memory.host_memory(cfg, in_shape=list(stored_shape), out_shape=m.out_shape, in_codec=codec,
                                           params=m.params, batch_size=m.batch_size, pairing=m.pairing, rows=rows,
                                           buffer=m.buffer_samples, row_bytes=row_bytes,
                                           out_codec=cfg.module_codec(m.name), saved=saved, micro=m.micro_batch)
        m.publish_chunk = memory.publish_chunk(cfg, math.prod(stored_shape), math.prod(m.out_shape))
        m.publish_every, m.publish_fraction = memory.publish_policy(
            cfg, epochs=m.epochs, version_bytes=m.bytes_per_version,
            read_above=any((p.upstream == m.name or p.source == m.name) and _trains_before_final(cfg, p)
                           for p in modules))
        problem = memory.memory_problem(cfg, m.name, m.host_memory)
        if problem:
            out.append(problem)
    return out


def _trains_before_final(cfg: RunConfig, m: ModulePlan) -> bool:
    """Whether ``m`` trains any epoch on its upstream's intermediate versions: in sequential mode a module starts
    once its upstream is final, and in async mode with ``settle_epochs`` >= its epochs it waits for the final
    version before its first epoch."""
    return cfg.schedule.mode == "async" and cfg.schedule.settle_epochs < m.epochs


def recompute_bytes(cfg: RunConfig, modules: list[ModulePlan], m: ModulePlan) -> int:
    """Memory of recomputing ``m``'s input per batch: the frozen chain's float32 weights plus its two largest
    live activations (a layer's input and output) for a batch of pairs."""
    by_name = {p.name: p for p in modules}
    chain = [by_name[n] for n in m.recompute]
    weights = sum(p.params for p in chain) * 4
    widest = max([math.prod(chain[0].in_shape)] + [math.prod(p.out_shape) for p in chain if p.out_shape])
    return int(weights + 2 * (2 * m.batch_size) * widest * 4)


def _on_cpu(cfg: RunConfig) -> bool:
    """Whether the module actors train on CPU: no GPU asked for, or 'auto' on a machine without one."""
    gpus = cfg.resources.gpus_per_module
    if gpus == 0:
        return True
    import torch

    return gpus == "auto" and not torch.cuda.is_available()


def _device_bytes(cfg: RunConfig) -> tuple[int | None, str]:
    """Memory of one module's device: resources.device_memory_gb, else this machine's GPU or RAM."""
    if cfg.resources.device_memory_gb is not None:
        return int(cfg.resources.device_memory_gb * 2**30), "resources.device_memory_gb"
    gpus = cfg.resources.gpus_per_module
    if gpus != 0:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory), "this machine's GPU memory"
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "this machine's memory"
    except (ValueError, OSError, AttributeError):
        return None, ""


def _resource_problems(cfg: RunConfig, local_cluster: bool | None) -> list[tuple[str, str]]:
    res, out = cfg.resources, []
    gpus = res.gpus_per_module
    if isinstance(gpus, float) and gpus > 1 and not gpus.is_integer():
        out.append(("resources.gpus_per_module", f"above 1 a module needs whole GPUs, found {gpus}"))
    if local_cluster is None:
        local_cluster = not (res.address or os.environ.get("RAY_ADDRESS"))
    if local_cluster and isinstance(gpus, float) and gpus > 0:
        import torch

        have = torch.cuda.device_count()
        need = gpus if cfg.schedule.mode == "sequential" else gpus * len(cfg.stack)
        if have < need:
            out.append(("resources.gpus_per_module",
                        f"{gpus} GPU(s) per module for {len(cfg.stack)} module(s) needs {need:g} GPUs, this machine has {have}; "
                        "use 'auto' (CPU when there is no GPU) or pass a cluster address"))
    return out


def estimate_rows(cfg: RunConfig) -> int | None:
    """Samples the config selects, from the dataset's size factors (None when only loading can tell)."""
    ds, caps = cfg.dataset, capabilities(cfg.dataset.kind)
    if not caps.size:
        return None
    rows = math.prod(len(getattr(ds, key)) if key and getattr(ds, key) is not None else n for key, n in caps.size)
    if ds.max_per_split is not None:
        rows = min(rows, 2 * ds.max_per_split)
    return rows


def _ids(values) -> str:
    return ",".join(str(v) for v in sorted(values))
