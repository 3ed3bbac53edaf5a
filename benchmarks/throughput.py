"""A module's training samples/s fed from the store against the same module fed from tensors in memory.

Both sides train norb-synthetic's m2 (conv 32->64 5x5 + max-pool, infonce_pair on same-instance pairs)
for the same steps on the same batches, with 1 torch thread (an actor's default ``cpus_per_module``).

- store-fed: the trainer's path. A float16 version of (32, 16, 16) activations is committed to a store,
  ``load_upstream`` decodes it, and ``PairedBatches`` gathers, pairs and casts each batch in its
  prefetch thread while the step runs.
- memory-fed: every batch (x, x_pos as float32, labels, groups) built before the clock starts, so only
  the training step is timed: the ideal a feed can approach.

Epochs of the two sides alternate and each side's best epoch counts (the machine is shared). The decode of
the version (once per upstream version, i.e. at most once per epoch) is reported as its own row.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pyarrow as pa
import torch

from benchmarks import goal_row
from pipeline.planning.config import load_config
from pipeline.feed import PairedBatches, load_upstream
from pipeline.nn.modules import build_module
from pipeline.nn.objectives import build_objective
from pipeline.planning.plan import build_plan
from pipeline.store import Store


def _norb_like_meta(n: int) -> pa.Table:
    """NORB-shaped metadata: 5 categories x 10 instances x azimuth/elevation/lighting grid."""
    i = np.arange(n)
    return pa.table({
        "sample_id": i.astype(np.int64), "split": np.where(i % 2 == 0, "train", "test"),
        "label": (i % 5).astype(np.int64), "instance": ((i // 5) % 10).astype(np.int64),
        "azimuth": ((i // 50) % 18 * 20).astype(np.float64), "elevation": ((i // 900) % 9 * 5 + 30).astype(np.float64),
        "lighting": ((i // 8100) % 6).astype(np.int64)})


def _module(stage: str = "m2"):
    cfg = load_config("norb-synthetic", ["dataset.image_size=32"])
    plan = build_plan(cfg, check_paths=False, local_cluster=False)
    mp = plan.module(stage)
    torch.manual_seed(0)
    module = build_module(cfg.stack[stage], tuple(mp.in_shape))
    objective = build_objective(cfg.stack[stage].objective, tuple(mp.out_shape), plan.num_classes)
    return module, objective, tuple(mp.in_shape), cfg.stack[stage].objective.pairing


def _train(module, objective, opt, batches) -> int:
    samples = 0
    for b in batches:
        z, z_pos = module(torch.cat([b.x, b.x_pos])).chunk(2)
        loss, _ = objective(z, z_pos, b.labels, groups=b.groups)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        samples += len(b.x)
    return samples


def run(quick: bool, workdir: str) -> dict:
    n, batch, steps, epochs = (1024, 128, 4, 2) if quick else (4096, 128, 16, 4)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module, objective, in_shape, pairing = _module()
        store = Store(workdir, "throughput")
        x = torch.randn((n, *in_shape), generator=torch.Generator().manual_seed(0)).to(torch.float16)
        w = store.begin_version("m1", codec="float16", final=True)
        w.write(_norb_like_meta(n), x)
        version = w.commit().version

        sides = {}
        for side in ("store", "memory"):
            m, o = copy.deepcopy(module), copy.deepcopy(objective)
            sides[side] = (m, o, torch.optim.Adam(list(m.parameters()) + list(o.parameters()), lr=1e-3))
        best = {"store": float("inf"), "memory": float("inf"), "decode": float("inf")}
        samples = {}
        for epoch in range(epochs + 1):  # epoch 0 is the warm-up of both sides
            t0 = time.perf_counter()
            up = load_upstream(store, "m1", version)
            decode = time.perf_counter() - t0
            rng = lambda: np.random.default_rng([0, epoch])  # noqa: E731 - the same batches on both sides
            kw = dict(batch_size=batch, pairing=pairing, device=torch.device("cpu"), max_steps=steps)

            t0 = time.perf_counter()
            samples["store"] = _train(*sides["store"], PairedBatches(up, rng=rng(), **kw))
            t_store = time.perf_counter() - t0

            in_memory = list(PairedBatches(up, rng=rng(), **kw))  # built before the clock: data already in memory
            t0 = time.perf_counter()
            samples["memory"] = _train(*sides["memory"], in_memory)
            t_memory = time.perf_counter() - t0
            if epoch > 0:
                best["store"] = min(best["store"], t_store)
                best["memory"] = min(best["memory"], t_memory)
                best["decode"] = min(best["decode"], decode)
        store_rate = samples["store"] / best["store"]
        memory_rate = samples["memory"] / best["memory"]
        with_decode = samples["store"] / (best["store"] + best["decode"])
    finally:
        torch.set_num_threads(before)
    note = f"norb m2 on {n} float16 {in_shape} rows, batch {batch}, {steps} steps/epoch, best of {epochs} epochs"
    rows = [
        goal_row("trainer throughput", "samples/s (store-fed vs memory-fed)", store_rate, memory_rate, at_least=0.9,
                 note=note),
        goal_row("trainer throughput", "samples/s incl. decoding the version each epoch", with_decode, memory_rate,
                 note=f"decode {best['decode'] * 1e3:.0f} ms for {n} rows; a full epoch amortises it over "
                      f"{n // 2 // batch} steps, here over {steps}"),
    ]
    details = {"rows": n, "batch": batch, "steps": steps, "epochs": epochs, "seconds": best, "samples": samples}
    return {"rows": rows, "details": details}
