"""The GIM STL-10 recipe (preset ``stl10-gim``) at cluster scale, simulated.

Costs per module, all stated assumptions (the simulation is only as good as they are):

- FLOPs: forward FLOPs per image of each module counted with ``torch.utils.flop_counter.FlopCounterMode``
  (convs and matmuls; 2 images through the built module, divided by 2); training = 3x forward (forward +
  backward for activations and weights); the infonce_grid heads are left out (small next to ResNet stages).
- GPU: ``GPU_FLOPS`` sustained mixed-precision FLOP/s per GPU, about 25-30% of an A100's 312 TFLOP/s dense
  fp16 peak, which is what MLPerf-class ResNet-50 training reaches per A100 (~3,500 img/s x 24.6 GFLOP).
- Data: ``IMAGES`` = 100k unlabeled STL-10 images both trained on each epoch and published each version
  (the 13k labelled ones ignored, +13%); activations in float16: 6.4 / 3.2 / 1.6 MB per image after
  m1 / m2 / m3 (the plan's out shapes, 49 patches x C x H x W x 2 bytes).
- Store: the stated bandwidths are the only limits on a write or read (encode / decode / hash assumed to
  keep up: on this repo's 2-core VM the store wrote ~0.37 GB/s per process, so on a real node that needs
  several writer threads per actor); local NVMe: separate 3 GB/s write and 6 GB/s read pools, shared by
  the modules on the node; S3: one 1 GB/s pool per node for reads and writes together (an assumption: a
  tuned many-connection client reached 6.3 GB/s download on a p3dn.24xlarge in github.com/dvassallo/s3-benchmark,
  2019; pyarrow's S3 filesystem with default settings is far below that).
- Schedule: the preset's (300 epochs, publish_every 1, settle_epochs 1, track_upstream), plus a tuned row
  (publish_every 10, publish_fraction 0.1) to show what the knobs buy.
- 3 GPUs: one node, one GPU per module. 8 GPUs: one node, the same 3 modules, each module data-parallel
  over a share of the GPUs chosen to minimise the largest per-GPU training time (greedy: 2 / 3 / 3 GPUs),
  ``DP_EFFICIENCY`` scaling per replica; inference for a publish is split over the replicas too.
"""

from __future__ import annotations

from benchmarks.simulate.model import Cluster, ModuleCost, Schedule, simulate

IMAGES = 100_000
GPU_FLOPS = 80e12
DP_EFFICIENCY = 0.9
EPOCHS = 300
STORES = {
    "local NVMe (3 GB/s write, 6 GB/s read)": dict(write_bw=3e9, read_bw=6e9, duplex=True),
    "S3 (1 GB/s per node, read + write)": dict(write_bw=1e9, read_bw=1e9, duplex=False),
}


def module_flops() -> list[dict]:
    """Forward FLOPs and activation bytes per image of each stl10-gim module (the capacity planner's counts)."""
    from pipeline.planning.capacity import forward_flops, row_bytes
    from pipeline.planning.config import load_config
    from pipeline.planning.plan import build_plan

    cfg = load_config("stl10-gim", ["dataset.path=/unused/stl10"])  # shapes only: no file is read
    plan = build_plan(cfg, check_paths=False, local_cluster=False)
    out, in_bytes = [], row_bytes("uint8", tuple(plan.input_shape))  # the input stage: uint8 gray 64x64
    for name in cfg.stack:
        p = plan.module(name)
        out_bytes = row_bytes(cfg.module_codec(name), tuple(p.out_shape))
        out.append({"name": name, "forward_flops": forward_flops(cfg.stack[name], tuple(p.in_shape)),
                    "in_bytes": in_bytes, "out_bytes": out_bytes, "in_shape": list(p.in_shape),
                    "out_shape": list(p.out_shape)})
        in_bytes = out_bytes
    return out


def gpu_split(train_flops: list[float], gpus: int) -> list[int]:
    """GPUs per module, at least one each, each further GPU to the module with the largest time per GPU."""
    share = [1] * len(train_flops)
    for _ in range(gpus - len(train_flops)):
        i = max(range(len(share)), key=lambda j: train_flops[j] / share[j])
        share[i] += 1
    return share


def costs(flops: list[dict], gpus: int, epochs: int = EPOCHS) -> tuple[list[ModuleCost], list[int]]:
    train = [3 * f["forward_flops"] for f in flops]
    split = gpu_split(train, gpus) if gpus > len(flops) else [1] * len(flops)
    out = []
    for f, g, tr in zip(flops, split, train):
        speed = GPU_FLOPS * (1 + DP_EFFICIENCY * (g - 1))
        out.append(ModuleCost(f["name"], train_s=IMAGES * tr / speed, epochs=epochs,
                              infer_s=IMAGES * f["forward_flops"] / speed, publish_bytes=IMAGES * f["out_bytes"],
                              load_bytes=IMAGES * f["in_bytes"], start_s=30.0))
    return out, split


def scenarios(flops: list[dict], epochs: int = EPOCHS) -> list[dict]:
    rows = []
    preset = Schedule(mode="async", publish_every=1, settle_epochs=1, poll_s=0.5)
    tuned = Schedule(mode="async", publish_every=10, publish_fraction=0.1, settle_epochs=1, poll_s=0.5)
    for gpus in (3, 8):
        c, split = costs(flops, gpus, epochs)
        for store, bw in STORES.items():
            for label, sch in (("async", preset), ("sequential", Schedule(mode="sequential", poll_s=0.5)),
                               ("async, publish_every=10, fraction 0.1", tuned)):
                res = simulate(c, Cluster(**bw), sch)
                name, shares = res.bottleneck()
                rows.append({"gpus": gpus, "gpu_split": split, "store": store, "schedule": label,
                             "wall_h": res.wall_s / 3600, "span_h": res.span_s / 3600,
                             "utilisation": [round(m.utilisation, 3) for m in res.modules],
                             "train_utilisation": [round(m.train_work_s / res.span_s, 3) for m in res.modules],
                             "staleness": res.staleness, "epochs": [m.epochs for m in res.modules],
                             "bottleneck": name, "time_shares": {k: round(v, 3) for k, v in shares.items()},
                             "written_tb": sum(_written(cm, mr, sch) for cm, mr in zip(c, res.modules)) / 1e12})
    return rows


def _written(c: ModuleCost, m, sch: Schedule) -> float:
    return c.publish_bytes * (1 + (m.published - 1) * sch.publish_fraction)


def table(rows: list[dict]) -> str:
    lines = ["| GPUs (per module) | store | schedule | wall h | GPU busy m1/m2/m3 (train only) | staleness mean/max "
             "(epoch end) | written TB | bottleneck (share of module time) |",
             "|---|---|---|---:|---|---|---:|---|"]
    for r in rows:
        util = " / ".join(f"{u:.0%}" for u in r["utilisation"])
        tu = " / ".join(f"{u:.0%}" for u in r["train_utilisation"])
        st = r["staleness"]
        share = r["time_shares"].get(r["bottleneck"], 0)
        lines.append(f"| {r['gpus']} ({'/'.join(map(str, r['gpu_split']))}) | {r['store']} | {r['schedule']} | "
                     f"{r['wall_h']:.1f} | {util} ({tu}) | {st['end_mean']:.2f}/{st['end_max']} | "
                     f"{r['written_tb']:.0f} | {r['bottleneck']} ({share:.0%}) |")
    return "\n".join(lines)
