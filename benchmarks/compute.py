"""A conv module's training GFLOP/s against this machine's dense matmul GFLOP/s, at the same thread count.

The module is the second of norb-synthetic's layers two to a module (``regrouped_stack``: conv 32->64,
5x5, on 32x16x16 float32 activations, then max-pool) with
its infonce_pair objective; one training step is forward of the pair, loss, backward and Adam. FLOPs per
step are counted by ``torch.utils.flop_counter.FlopCounterMode`` (convs and matmuls only: pooling,
activations and the optimizer are not counted, so the ratio slightly understates the work done). The peak
is the best of a few float32 ``torch.mm`` of 2048x2048 (2*n^3 FLOPs each).
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import cpu_threads, goal_row, regrouped_stack
from pipeline.planning.config import overridden_config, read_source
from pipeline.nn.modules import build_module
from pipeline.nn.objectives import build_objective
from pipeline.planning.plan import build_plan


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def conv_module(batch: int, stage: str = "m2"):
    """(step function, FLOPs per step) for ``stage`` of norb-synthetic's layers two to a module, at 32 px."""
    raw, _ = read_source("norb-synthetic")
    raw["stack"] = regrouped_stack(raw, (2, 4, 6))
    cfg = overridden_config(raw, ["dataset.image_size=32"])
    plan = build_plan(cfg, check_paths=False, local_cluster=False)
    mp = plan.module(stage)
    torch.manual_seed(0)
    module = build_module(cfg.stack[stage], tuple(mp.in_shape))
    objective = build_objective(cfg.stack[stage].objective, tuple(mp.out_shape), plan.num_classes)
    opt = torch.optim.Adam(list(module.parameters()) + list(objective.parameters()), lr=1e-3)
    x = torch.randn(batch, *mp.in_shape)
    x_pos = torch.randn(batch, *mp.in_shape)
    labels = torch.randint(0, 5, (batch,))
    groups = torch.randint(0, 20, (batch,))

    def step():
        z, z_pos = module(torch.cat([x, x_pos])).chunk(2)
        loss, _ = objective(z, z_pos, labels, groups=groups)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return step, counter.get_total_flops(), tuple(mp.in_shape)


def train_gflops(step, flops: int, seconds: float) -> float:
    step()  # warm-up (allocator, oneDNN primitive cache)
    n, t0 = 0, time.perf_counter()
    while True:
        step()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and n >= 3:
            return flops * n / elapsed / 1e9


def run(quick: bool, workdir: str) -> dict:
    batch = 128
    step, flops, in_shape = conv_module(batch)
    rows, details = [], {"batch": batch, "in_shape": in_shape, "flops_per_step": flops}
    before = torch.get_num_threads()
    try:
        for threads in sorted({1, cpu_threads()}):
            torch.set_num_threads(threads)
            peak = matmul_gflops(1024 if quick else 2048, repeats=3 if quick else 5)
            conv = train_gflops(step, flops, 1.5 if quick else 5.0)
            peak = max(peak, matmul_gflops(1024 if quick else 2048, repeats=3 if quick else 5))  # peak on both sides
            details[f"threads_{threads}"] = {"matmul_gflops": peak, "train_gflops": conv}
            rows.append(goal_row("compute", f"GFLOP/s, {threads} thread{'s' * (threads > 1)} (conv module training vs "
                                 "matmul)", conv, peak, at_least=0.7,
                                 note=f"norb m2 conv5x5 32->64 on {in_shape}, batch {batch} pairs, "
                                      f"{flops / 1e9:.2f} GFLOP/step (FlopCounterMode)"))
    finally:
        torch.set_num_threads(before)
    return {"rows": rows, "details": details}
