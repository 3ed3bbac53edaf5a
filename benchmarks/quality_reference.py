"""The single-process reference for the quality harness: the stack a config describes, trained in one process.

Same modules (``pipeline.nn.modules``), objectives and optimizer (``pipeline.nn.objectives``), pairings
(``pipeline.nn.pairing``, ``pipeline.feed.plan_epoch``'s partner rule) and per-module weight seeds as the
isostack trainer; the data come straight from ``pipeline.data.load_dataset`` (no store, no Ray, float32
throughout). Two loops:

- ``sequential`` (the default): greedy, module by module, the same training as an isostack run with
  ``schedule.mode: sequential``. Module i trains all its epochs on module i-1's final output; each epoch's
  order, partners and augmentation generator come from ``(train.seed, module index, 0, epoch)`` as in the
  trainer. The gap between this and an isostack run is what the store, the codec and the schedule cost.
- ``async``: the epochs an isostack run with ``schedule.mode: async`` trains, replayed in one process. Module
  i's epoch j trains on the version module i-1 committed after its epoch ``k = schedule[i][j]`` (its weights
  after epoch k applied to the input *it* trained epoch k on), the last ``settle_epochs`` on its final
  version, as ``workers.epochs`` decides; ``upstream_schedule`` builds the two bounding cases (``pipelined``:
  every module as fast as the one below, epoch j on version j; ``stale``: a fast module above a slow one, all
  its early epochs on version 1) and ``schedule_from_run`` reads the real one back from a run's checkpoints.
  With every epoch on the final version this is the sequential loop, bit for bit. So asynchrony alone is
  measured, without Ray, the store or timing noise; ``codec=True`` rounds every module's output to its
  configured store codec (float16 by default) as the store does, so the codec alone is measured too.
- ``simultaneous``: GIM's own loop. Every batch goes up the whole stack; each module takes one optimizer
  step on its own loss and its output is ``detach()``-ed before the next module, so the modules above train
  on a moving input from the first step (closer to ``schedule.mode: async``, but in lock step).

What each module sees mirrors the trainer: a metadata pairing (same_instance, neighbor_pose): the batch
rows and their partner rows, both through the modules below (at the first module with ``pair_views``: one
random view of each, ``pipeline.nn.pairing.loss_inputs``); augment (first module only): two random views of
the batch; the module above reads the plain images' activations; patch_grid / temporal: the batch alone.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data import Dataset
from pipeline.data.base import object_ids
from pipeline.feed import plan_epoch
from pipeline.nn.modules import build_module, pool_to_vector
from pipeline.nn.objectives import build_objective, local_loss
from pipeline.nn.pairing import loss_inputs, partner_index
from pipeline.planning.plan import build_plan
from pipeline.store.codec import get_codec
from schemas.config import RunConfig

METADATA_PAIRINGS = ("same_instance", "neighbor_pose")


def build_stack(cfg: RunConfig) -> tuple[list[str], list[torch.nn.Module], list[torch.nn.Module],
                                         list[torch.Tensor]]:
    """(names, modules, objectives, rng states), each module built under the trainer's seed for it; its rng
    state is torch's global one right after its build, where the trainer's steps start drawing (the negatives
    of ``infonce_grid``, a VAE's noise), for ``_train_staged`` to restore before that module trains."""
    plan = build_plan(cfg, check_paths=False, local_cluster=False)
    names, modules, objectives, states = list(cfg.stack), [], [], []
    for name in names:
        mp, tc = plan.module(name), cfg.module_train(name)
        torch.manual_seed(tc.seed + 1000 * mp.index)  # the trainer's seed (generation 0)
        module = build_module(cfg.stack[name], tuple(mp.in_shape))
        modules.append(module)
        objectives.append(build_objective(cfg.stack[name].objective, tuple(mp.out_shape), plan.num_classes,
                                          in_shape=tuple(mp.in_shape), module=module))
        states.append(torch.random.get_rng_state())
    return names, modules, objectives, states


def as_float(ds: Dataset) -> torch.Tensor:
    """The dataset's samples as the modules see them: uint8 pixels scaled to [0, 1], signals as they are."""
    x = torch.from_numpy(ds.images)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def meta_columns(ds: Dataset) -> dict[str, np.ndarray]:
    """split, label, instance, azimuth, elevation, lighting as numpy arrays (nulls: -1 or NaN)."""
    out = {"split": np.asarray(ds.meta.column("split").to_pylist(), dtype=object)}
    for name, dtype, fill in (("label", np.int64, -1), ("instance", np.int64, -1), ("azimuth", np.float64, np.nan),
                              ("elevation", np.float64, np.nan), ("lighting", np.int64, -1)):
        out[name] = np.array(ds.meta.column(name).fill_null(fill).to_numpy(zero_copy_only=False), dtype=dtype)
    return out


LOOPS = ("sequential", "async", "simultaneous")
SCHEDULES = ("pipelined", "stale")


def train_reference(cfg: RunConfig, ds: Dataset, *, epochs: int | None = None, max_steps: int | None = None,
                    loop: str = "sequential", schedule: str | dict[str, list] = "pipelined",
                    codec: bool = False) -> list[torch.nn.Module]:
    """Train the stack of ``cfg`` on ``ds`` in one process (``loop``: see the module docstring); returns the
    trained modules (eval mode). ``schedule`` (async loop): a name in ``SCHEDULES`` or {module: upstream epoch of
    each epoch, None = final}; ``codec``: round each module's output to its store codec (sequential, async)."""
    if loop not in LOOPS:
        raise ValueError(f"reference loop {loop!r}: expected one of {LOOPS}")
    if loop in ("sequential", "async"):
        names = list(cfg.stack)
        budgets = {n: epochs or cfg.module_train(n).epochs for n in names}
        if loop == "sequential":
            plan = {n: [None] * budgets[n] for n in names}
        elif isinstance(schedule, str):
            plan = {n: upstream_schedule(budgets[n], cfg.schedule.settle_epochs, schedule) for n in names}
        else:
            plan = schedule
        return _train_staged(cfg, ds, plan, max_steps=max_steps, codec=codec)
    names, modules, objectives, _ = build_stack(cfg)
    optimizers = [build_optimizer_for(cfg, n, m, o) for n, m, o in zip(names, modules, objectives)]
    pairings = [getattr(cfg.stack[n].objective, "pairing", None) for n in names]
    x_all, cols = as_float(ds), meta_columns(ds)
    rows = np.flatnonzero(cols["split"] == "train")
    tc = cfg.module_train(names[0])
    gen = torch.Generator().manual_seed(tc.seed)
    groups_all = torch.from_numpy(object_ids(cols["label"], cols["instance"]))
    labels_all = torch.from_numpy(cols["label"])
    for epoch in range(epochs or tc.epochs):
        rng = np.random.default_rng([tc.seed, 0, 0, epoch])
        partners = _partners(pairings, cols, rows, rng)
        order = rows[rng.permutation(len(rows))]
        n_batches = max(1, len(order) // tc.batch_size)
        for b in range(min(n_batches, max_steps or tc.max_steps_per_epoch or n_batches)):
            idx = order[b * tc.batch_size:(b + 1) * tc.batch_size]
            _step(modules, objectives, optimizers, pairings, x_all, idx, partners, labels_all, groups_all, gen,
                  [cfg.stack[n].objective for n in names])
    return [m.eval() for m in modules]


def upstream_schedule(budget: int, settle: int, kind: str) -> list[int | None]:
    """Which upstream version each of a module's ``budget`` epochs trains on in an async run (None: the final
    one; k: the version committed after the upstream's epoch k): the last ``min(settle, budget)`` on the final
    version (``workers.epochs``); before that ``pipelined``: epoch j on version j (a module as fast as the one
    below it), ``stale``: every one on version 1 (a module much faster than the one below; track_upstream off).
    The first module's upstream is the input (final from the start), whatever the schedule."""
    if kind not in SCHEDULES:
        raise ValueError(f"async schedule {kind!r}: expected one of {SCHEDULES}")
    early = budget - min(settle, budget)
    return [(j if kind == "pipelined" else 1) for j in range(1, early + 1)] + [None] * (budget - early)


def schedule_from_run(run_dir: str) -> dict[str, list[int | None]]:
    """{module: upstream epoch of each epoch, None = final} from a finished run: each module's last checkpoint
    lineage (``checkpoints/<m>/<epoch>.json``: ``upstream_versions`` [[epoch, version]]) and the upstream's
    manifests (``producer.epoch``: the epoch a version was committed after; a version retention removed is taken
    to be the one after epoch = its number, as ``publishes_after`` commits one every epoch by default)."""
    import json
    from pathlib import Path

    from pipeline.store import Store
    run = Path(run_dir)
    store = Store(str(run.parent), run.name, create=False)
    out = {}
    for d in sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir()):
        meta = json.loads(max(d.glob("[0-9]*.json"), key=lambda f: int(f.stem)).read_text())
        up = meta["upstream_stage"]
        final = store.final(up).version
        kept = set(store.versions(up))
        epoch_of = lambda v: int(store.manifest(up, v).producer.get("epoch", v)) if v in kept else v  # noqa: E731
        out[d.name] = [None if v == final else epoch_of(v) for _, v in sorted(meta["upstream_versions"])]
    return out


def _stored(cfg: RunConfig, name: str, h: torch.Tensor, codec: bool) -> torch.Tensor:
    """``h`` as the module above reads it back from the store: with ``codec``, a round trip through the module's
    store codec (``pipeline.store.codec``, its checks included; int8 is calibrated on the whole tensor here, on
    each shard's first rows by the writer)."""
    if not codec:
        return h
    c = get_codec(cfg.module_codec(name), tuple(h.shape[1:]))
    return c.decode(c.encode(h).buffers()[1], len(h)).to(torch.float32, copy=True)


def _train_staged(cfg: RunConfig, ds: Dataset, plan: dict[str, list[int | None]], *,
                  max_steps: int | None, codec: bool) -> list[torch.nn.Module]:
    """Module by module; module i's epoch j on module i-1's version ``plan[i][j]`` (train rows). All epochs on
    the final version (None) is greedy: module i trains every epoch on module i-1's final output."""
    names, modules, objectives, states = build_stack(cfg)
    x_all, cols = as_float(ds), meta_columns(ds)
    rows = np.flatnonzero(cols["split"] == "train")
    meta = {k: cols[k][rows] for k in ("label", "instance", "azimuth", "elevation", "lighting")}
    versions: dict = {None: x_all[rows]}  # upstream epoch (None: final) -> (n, *in_shape of module i)
    for i, name in enumerate(names):
        used = list(plan[name]) if i else [None] * len(plan[name])  # the input is final from the start
        wanted = set(plan[names[i + 1]]) if i + 1 < len(names) else set()
        mine: dict = {}

        def publish(epoch: int, h_used: torch.Tensor, _i=i, _name=name, _mine=mine, _wanted=wanted) -> None:
            if epoch in _wanted:  # the version committed after this epoch, on the input this epoch trained on
                _mine[epoch] = _stored(cfg, _name, embed([modules[_i].eval()], h_used, pooled=False)[0], codec)
                modules[_i].train()

        torch.random.set_rng_state(states[i])  # as the trainer's draws start: after this module's own build
        _train_one(cfg, name, i, modules[i], objectives[i], [versions[k] for k in used], meta,
                   max_steps=max_steps, after_epoch=publish)
        mine[None] = _stored(cfg, name, embed([modules[i].eval()], versions[None], pooled=False)[0], codec)
        versions = mine
    return [m.eval() for m in modules]


def _train_one(cfg: RunConfig, name: str, index: int, module, objective, inputs: list[torch.Tensor],
               meta: dict[str, np.ndarray], *, max_steps: int | None, after_epoch=None) -> None:
    """One module's epochs, epoch j on ``inputs[j]``, batched as the trainer batches (``plan_epoch``, one
    window); ``after_epoch(epoch, input of that epoch)`` after each (1-based)."""
    tc = cfg.module_train(name)
    opt = build_optimizer_for(cfg, name, module, objective)
    pairing = getattr(cfg.stack[name].objective, "pairing", None)
    n = len(inputs[0]) if inputs else 0
    local, unit = np.arange(n), np.zeros(n, dtype=np.int64)
    labels = torch.from_numpy(meta["label"])
    groups = torch.from_numpy(object_ids(meta["label"], meta["instance"])) if pairing == "same_instance" else None
    module.train()
    for epoch, h in enumerate(inputs):
        rng = np.random.default_rng([tc.seed, index, 0, epoch])  # the trainer's (seed, module, generation, epoch)
        plan = plan_epoch(meta, local, unit, pairing=pairing, batch_size=tc.batch_size, buffer=len(local), rng=rng,
                          max_steps=max_steps or tc.max_steps_per_epoch)
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        for b in range(plan.n_batches):
            idx = plan.order[b * tc.batch_size:(b + 1) * tc.batch_size]
            x = h[idx]
            x_pos = h[plan.partner[b * tc.batch_size:(b + 1) * tc.batch_size]] if plan.partner is not None else None
            x, x_pos = loss_inputs(x, x_pos, gen, pairing, cfg.stack[name].objective)
            loss, _ = local_loss(objective, module, x, x_pos, labels[idx], groups[idx] if groups is not None else None)
            _optimize(loss, opt, objective, module)
        if after_epoch is not None:
            after_epoch(epoch + 1, h)


def _optimize(loss: torch.Tensor, opt: torch.optim.Optimizer, objective, module) -> None:
    """One optimizer step on ``loss``, then the objective's own update (MoCo's momentum encoder), as the trainer."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    after = getattr(objective, "after_step", None)
    if after is not None:
        after(module)


def build_optimizer_for(cfg: RunConfig, name: str, module, objective) -> torch.optim.Optimizer:
    tc = cfg.module_train(name)
    params = list(module.parameters()) + list(objective.parameters())
    return torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)


def _partners(pairings, cols, rows, rng) -> dict[str, np.ndarray]:
    """Per metadata pairing used by the stack: (N,) partner row of every train row (from train rows only)."""
    out = {}
    for kind in dict.fromkeys(p for p in pairings if p in METADATA_PAIRINGS):
        local = partner_index(kind, label=cols["label"][rows], instance=cols["instance"][rows],
                              azimuth=cols["azimuth"][rows], elevation=cols["elevation"][rows], rng=rng)
        full = np.arange(len(cols["label"]), dtype=np.int64)
        full[rows] = rows[local]
        out[kind] = full
    return out


def _below(modules, i: int, x: torch.Tensor) -> torch.Tensor:
    """x through modules[:i] without gradients: what module i reads for those samples."""
    with torch.no_grad():
        for m in modules[:i]:
            x = m(x)
    return x


def _step(modules, objectives, optimizers, pairings, x_all, idx, partners, labels_all, groups_all, gen, specs) -> None:
    h = x_all[idx]
    h_pos, pos_kind = None, None
    labels = labels_all[idx]
    for i, (m, o, opt, pairing, spec) in enumerate(zip(modules, objectives, optimizers, pairings, specs)):
        groups = groups_all[idx] if pairing == "same_instance" else None
        a_pos = None
        if pairing in METADATA_PAIRINGS:
            a_pos = h_pos if pos_kind == pairing else _below(modules, i, x_all[partners[pairing][idx]])
        # views (augment, pair_views) only at the first module, as the config allows; the module above reads
        # this one's output of the rows as they are
        loss, _ = local_loss(o, m, *loss_inputs(h, a_pos, gen, pairing, spec), labels, groups)
        _optimize(loss, opt, o, m)
        with torch.no_grad():  # the GIM boundary: the next module sees values, not a graph
            if pairing == "augment" or pairing not in METADATA_PAIRINGS:
                h, h_pos, pos_kind = m(h), None, None
            else:
                both = m(torch.cat([h, a_pos]))
                h, h_pos, pos_kind = *both.chunk(2), pairing


@torch.no_grad()
def embed(modules: list[torch.nn.Module], x: torch.Tensor, *, chunk: int = 512, pooled: bool = True,
          cfg: RunConfig | None = None) -> list:
    """Every module's output for every sample, bottom to top: pooled, one (N, D_i) float32 array per module
    (what the final stage scores); else the tensors themselves, (N, *out_shape_i). With ``cfg`` (the whole
    stack's modules) each output is rounded to its store codec first, as the store hands it on."""
    outs: list[list] = [[] for _ in modules]
    names = list(cfg.stack) if cfg is not None else []
    for start in range(0, len(x), chunk):
        h = x[start:start + chunk]
        for i, m in enumerate(modules):
            h = m(h)
            if cfg is not None:
                h = _stored(cfg, names[i], h, True)
            outs[i].append(pool_to_vector(h).numpy().astype(np.float32) if pooled else h)
    return [np.concatenate(o) if pooled else torch.cat(o) for o in outs]
