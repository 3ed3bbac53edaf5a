"""The official GIM way, as the reference for the schedules comparison: one process, one loop.

Every batch goes up the whole stack; each module computes its own loss on its input and the activations
are ``detach()``-ed before the next module, so no gradient crosses a module boundary (Löwe et al. 2019,
``GreedyInfoMax/vision``: ``loss`` per module, ``.detach()`` between them). All modules step on every
batch for ``train.epochs`` epochs. Same config, data (the run's ingested ``input`` version), pairing,
modules, objectives, optimiser and seeds as the isostack trainer; no store, no Ray, no checkpoints.
As in the official code, each module's input is the module below's output on the same batch (computed once,
in training mode, then detached), and nothing is written between modules. ``python -m
benchmarks.reference_gim CONFIG_JSON STORE RUN_ID THREADS [retain]`` runs it alone in a fresh process (the
recipe benchmark measures that process's memory) and prints the result as JSON; ``retain`` gives it the
module actors' C heap policy (``pipeline.feed.heap.retain_freed_memory``), which the official code does not have.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pipeline.final.evaluation import classify
from pipeline.feed import PairedBatches, load_upstream, to_float
from pipeline.feed.heap import retain_freed_memory
from pipeline.nn.modules import build_module, pool_to_vector
from pipeline.nn.objectives import build_objective
from pipeline.nn.pairing import loss_inputs
from pipeline.planning.plan import build_plan
from pipeline.store import Store
from schemas.config import RunConfig


def train_reference(cfg: RunConfig, store: Store, *, threads: int, score: bool = True) -> dict:
    """Train the stack in one loop; returns wall seconds (load + training), the parameters per module and
    (``score``) the nearest-centroid accuracy. As in GIM's loop, the module above reads the outputs of what the
    module below trained on, views included (augment, pair_views), not of the plain rows as isostack's modules do:
    one forward a module and step, which is what this reference times."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    plan = build_plan(cfg, check_paths=False, local_cluster=False)
    names = list(cfg.stack)
    up = load_upstream(store, "input", store.final("input").version)
    device = torch.device("cpu")
    modules, objectives, optimizers = [], [], []
    for name in names:
        mp, tc = plan.module(name), cfg.module_train(name)
        torch.manual_seed(tc.seed + 1000 * mp.index)
        m = build_module(cfg.stack[name], tuple(mp.in_shape))
        o = build_objective(cfg.stack[name].objective, tuple(mp.out_shape), plan.num_classes)
        modules.append(m)
        objectives.append(o)
        optimizers.append(torch.optim.Adam(list(m.parameters()) + list(o.parameters()), lr=tc.lr,
                                           weight_decay=tc.weight_decay))
    pairings = [getattr(cfg.stack[n].objective, "pairing", None) for n in names]
    data_pairing = next((p for p in pairings if p in ("same_instance", "neighbor_pose")), None)
    if any(p in ("same_instance", "neighbor_pose") and p != data_pairing for p in pairings):
        raise NotImplementedError("the reference loop feeds one metadata pairing to every module")
    tc = cfg.module_train(names[0])
    gen = torch.Generator().manual_seed(tc.seed)
    specs = [cfg.stack[n].objective for n in names]  # views (augment, pair_views) at the first module only
    steps = 0
    for epoch in range(tc.epochs):
        rng = np.random.default_rng([tc.seed, 0, 0, epoch])
        for batch in PairedBatches(up, batch_size=tc.batch_size, pairing=data_pairing, rng=rng, device=device,
                                   max_steps=tc.max_steps_per_epoch):
            x, x_pos = batch.x, batch.x_pos
            for m, o, opt, pairing, spec in zip(modules, objectives, optimizers, pairings, specs):
                a, a_pos = loss_inputs(x, x_pos, gen, pairing, spec)
                if a_pos is not None:  # as the trainer: a pair whenever the feed gives one
                    z, z_pos = m(torch.cat([a, a_pos])).chunk(2)
                else:
                    z, z_pos = m(a), None
                loss, _ = o(z, z_pos, batch.labels, groups=batch.groups)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                # the GIM boundary: the next module sees values, not a graph
                x = z.detach()
                x_pos = z_pos.detach() if z_pos is not None else None
            steps += 1
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "steps": steps, "epochs": tc.epochs, "threads": threads,
            "samples": int((up.split == "train").sum()),
            "params": {n: sum(p.numel() for p in m.parameters()) for n, m in zip(names, modules)},
            "nearest_centroid": _nearest_centroid(modules, up, cfg) if score else None}


def _nearest_centroid(modules, up, cfg: RunConfig) -> float:
    """Test accuracy of sklearn's NearestCentroid on the pooled top embedding (as the final stage scores it)."""
    for m in modules:
        m.eval()
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(up.x), 512):
            z = to_float(up.x[start:start + 512], torch.device("cpu"))
            for m in modules:
                z = m(z)
            chunks.append(pool_to_vector(z.to(torch.float16).float()))  # float16 as the store keeps it
    emb = torch.cat(chunks).numpy().astype(np.float32)
    train, test = up.split == "train", up.split == "test"
    result = classify(emb[train], up.label[train], emb[test], up.label[test], knn_k=cfg.evaluate.knn_k,
                      probe_iters=cfg.evaluate.linear_probe_epochs)
    return float(result["nearest_centroid"]["test_accuracy"])


if __name__ == "__main__":
    import json
    import sys

    config_json, store_uri, run_id, n_threads = sys.argv[1:5]
    if sys.argv[5:] == ["retain"]:  # the module actors' heap policy, to show what it alone is worth to this loop
        retain_freed_memory()
    with open(config_json) as f:
        run_cfg = RunConfig.model_validate(json.load(f))
    print(json.dumps(train_reference(run_cfg, Store(store_uri, run_id, create=False), threads=int(n_threads),
                                     score=False)))
