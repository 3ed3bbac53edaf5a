"""Peak memory of one module trained alone against end-to-end training of the same stack.

The stack is the stl10-gim preset: a pre-activation ResNet-50 (no BN) in 3 modules on 64x64 gray images cut
into a 7x7 grid of 16x16 patches, each module with its infonce_grid loss. "Alone" is what one module actor
does per step: its upstream activations (float32 batch) -> module -> its loss -> backward -> Adam.
"End to end" is the same three modules composed with one infonce_grid loss at the top and full backprop.
Each side runs a few steps in a fresh subprocess; peak = its VmHWM (``ru_maxrss`` is kept as well, see
``_vm_hwm``) on CPU and
``torch.cuda.max_memory_allocated`` on a GPU. An idle process (torch and isostack imported, nothing built)
is measured the same way, so the table shows the raw RSS ratio and the ratio above that floor.
Not included on either side: the actor's upstream version held in memory and Ray's worker overhead.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from benchmarks import goal_row, python


def _child(mode: str, batch: int, steps: int) -> dict:
    import torch

    from pipeline.planning.config import load_config
    from pipeline.nn.modules import build_module
    from pipeline.nn.objectives import build_objective
    from pipeline.planning.plan import build_plan

    torch.set_num_threads(2)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config("stl10-gim", ["dataset.path=/unused/stl10"])  # shapes only: no file is read
    plan = build_plan(cfg, check_paths=False, local_cluster=False)
    names = list(cfg.stack)
    torch.manual_seed(0)
    if mode == "idle":
        modules, top = [], None
    elif mode == "e2e":
        modules, top = names, names[-1]
    else:
        modules, top = [mode], mode
    nets = [build_module(cfg.stack[n], tuple(plan.module(n).in_shape)).to(dev) for n in modules]
    params, objective = [p for net in nets for p in net.parameters()], None
    if top is not None:
        objective = build_objective(cfg.stack[top].objective, tuple(plan.module(top).out_shape), plan.num_classes).to(dev)
        params += list(objective.parameters())
        opt = torch.optim.Adam(params, lr=2e-4)
        x = torch.randn(batch, *plan.module(modules[0]).in_shape, device=dev)
        for _ in range(steps):
            z = x
            for net in nets:
                z = net(z)
            loss, _ = objective(z, None, None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    out = {"mode": mode, "batch": batch, "steps": steps, "params": sum(p.numel() for p in params),
           "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
           "rss_bytes": _vm_hwm()}
    if dev.type == "cuda":
        out["cuda_bytes"] = torch.cuda.max_memory_allocated()
    return out


def _vm_hwm() -> int:
    """Peak RSS of this process image: VmHWM, which exec resets.

    ``ru_maxrss`` is not enough on Linux: it keeps the high-water mark of the process before ``exec``, so a
    child forked from a big harness reports the harness's peak (measured: 1.55 GiB for every child).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure(mode: str, batch: int, steps: int) -> dict:
    code = f"import json, benchmarks.memory as m; print(json.dumps(m._child({mode!r}, {batch}, {steps})))"
    proc = subprocess.run([python(), "-c", code], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool, workdir: str) -> dict:
    batch, steps = (2, 2) if quick else (4, 3)
    runs = {mode: _measure(mode, batch, steps) for mode in ("idle", "m1", "m2", "m3", "e2e")}
    gib = 2**30
    key = "cuda_bytes" if "cuda_bytes" in runs["e2e"] else "rss_bytes"
    alone = {m: runs[m][key] for m in ("m1", "m2", "m3")}
    largest = max(alone, key=alone.get)
    e2e = runs["e2e"][key]
    floor = runs["idle"][key]
    what = "CUDA max allocated" if key == "cuda_bytes" else "peak RSS"
    shape = f"batch {batch} images (x49 patches), {steps} steps; per module GiB: " + \
        ", ".join(f"{m} {alone[m] / gib:.2f}" for m in alone)
    rows = [goal_row("memory", f"{what} GiB, largest module alone ({largest}) vs end-to-end", alone[largest] / gib,
                     e2e / gib, at_most=0.45, note=f"ResNet-50 preact, 3 modules, 64x64; {shape}")]
    if key == "rss_bytes":
        rows.append(goal_row("memory", f"peak RSS above an idle process GiB ({largest} vs end-to-end)",
                             (alone[largest] - floor) / gib, (e2e - floor) / gib, at_most=0.45,
                             note=f"idle process (torch + isostack imported) {floor / gib:.2f} GiB"))
    return {"rows": rows, "details": runs}


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
