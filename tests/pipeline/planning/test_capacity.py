"""The capacity planner: its bytes per version against what a real tiny run wrote, FLOPs, stream bounds, the CLI."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.planning.capacity import capacity, format_capacity, forward_flops, plan_for_capacity, version_bytes
from pipeline.cli import main
from pipeline.planning.config import load_config
from pipeline.run.driver import prepare_run
from tests.conftest import TINY_NORB, split_default_config
from workers.trainer import ModuleTrainer

STACK = TINY_NORB + ["train.epochs=1", "train.batch_size=32", "schedule.poll_seconds=0.05",
                     "schedule.settle_epochs=0", "train.max_steps_per_epoch=2"]


def test_planned_bytes_per_version_match_the_manifests_of_a_real_run(tmp_path):
    torch.set_num_threads(1)
    cfg = load_config(None, STACK + ["stack.m1.store.codec=int8", "stack.m2.store.codec=bfloat16",
                                     "store.rows_per_shard=200"], str(tmp_path / "store"))
    cfg = cfg.model_copy(update={"stack": {k: cfg.stack[k] for k in ("m1", "m2")}})
    store, _, _ = prepare_run(cfg, "r")
    config = cfg.model_dump(mode="json")
    for name in ("m1", "m2"):
        ModuleTrainer(store.uri, "r", name, config).run()
    plan = plan_for_capacity(cfg)
    rows = store.final("input").rows
    planned = {b.stage: b for b in capacity(cfg, plan, rows, 100.0)}
    for stage, codec in (("input", "uint8"), ("m1", "int8"), ("m2", "bfloat16")):
        final = store.final(stage)
        written = sum(s.bytes for s in final.shards)
        assert final.codec == codec and planned[stage].codec == codec
        # Full shards of 200 rows, or (a zero-copy codec written a unit at a time, units being one split's
        # rows of a shard) short ones of at least half that, as VersionWriter promises; the last may be shorter.
        assert sum(s.rows for s in final.shards) == rows and len(final.shards) >= math.ceil(rows / 200)
        assert all(100 <= s.rows <= 200 for s in final.shards[:-1]), [s.rows for s in final.shards]
        assert planned[stage].bytes_per_version == pytest.approx(written, rel=0.10), stage
    # Each stage is read by the one above at the given throughput (the top by the final stage).
    assert planned["m1"].read_by == ("m2",) and planned["m2"].read_by == ("final",)
    assert planned["m1"].read_bytes_per_s == pytest.approx(100.0 * planned["m1"].bytes_per_sample)


def test_a_non_materialized_boundary_costs_weights_and_recompute_flops(tmp_path):
    # The default's layers in four modules (m1: conv-pool), so that two boundaries in a row are recomputed.
    four = str(split_default_config(tmp_path / "four.yaml", cuts=(2, 4, 6)))
    cfg = load_config(four, ["stack.m1.store.materialize=false", "stack.m2.store.materialize=false"], None)
    plan = plan_for_capacity(cfg)
    b = {x.stage: x for x in capacity(cfg, plan, 1000, 500.0)}
    assert b["m1"].bytes_per_sample == 0 and b["m1"].read_bytes_per_s == 0
    assert b["m1"].bytes_per_version == plan.module("m1").params * 4  # float32 weights only
    # m1 is a 5x5 conv 1 -> 32 channels on 32x32 ('same' padding): 2 FLOPs per multiply-add.
    conv = 2 * 1 * 25 * 32 * 32 * 32
    assert b["m1"].recompute_flops_per_sample == forward_flops(cfg.stack["m1"], (1, 32, 32)) == conv
    # m2's rows are rebuilt from the input through m1 and m2; the input is read by m2 and m3.
    assert b["m2"].recompute_flops_per_sample == conv + forward_flops(cfg.stack["m2"], tuple(plan.module("m2").in_shape))
    assert b["input"].read_by == ("m1", "m2", "m3")
    assert "GFLOP" in format_capacity(list(b.values()), 1000, 500.0)


def test_stream_mode_bounds_what_a_stage_holds_by_the_window():
    full = load_config(None, [], None)
    stream = load_config(None, ["schedule.publish=stream", "store.window_samples=1000", "stack.m2.store.zstd_level=5"], None)
    plan = plan_for_capacity(full)
    a = {x.stage: x for x in capacity(full, plan, 100_000, 1.0)}
    b = {x.stage: x for x in capacity(stream, plan, 100_000, 1.0)}
    window = version_bytes("float16", tuple(plan.module("m1").out_shape), 1000, stream.store.rows_per_shard)
    assert b["m1"].held_bytes == window + b["m1"].bytes_per_version < a["m1"].held_bytes
    assert b["m2"].upper_bound and "≤" in format_capacity(list(b.values()), 100_000, 1.0, stream=True)


def test_cli_plan_prints_the_stl10_gim_numbers_of_the_issue(capsys):
    # GIM's STL-10 recipe needs no data to be sized: 6.4 / 3.2 / 1.6 MB per image in float16.
    assert main(["plan", "stl10-gim", "--samples", "100000", "--throughput", "1000"]) == 0
    out = capsys.readouterr().out
    for stage, gb in (("m1", "642.3 GB"), ("m2", "321.1 GB"), ("m3", "160.6 GB")):
        line = next(x for x in out.splitlines() if x.startswith(stage))
        assert gb in line
    assert main(["plan", "stl10-gim", "--samples", "0"]) != 0


def test_validate_predicts_each_actors_memory_and_refuses_a_config_over_budget():
    from pipeline.errors import ConfigError
    from pipeline.planning.capacity import describe
    from pipeline.planning.plan import build_plan

    # m1's output wide (256 x 8 x 8 float16, 32 KB a row, as m2's input was in the four-module default's at 64 x 16 x 16)
    wide = ["dataset.image_size=32", "stack.m1.layers.2.channels=256", "resources.memory_per_module=64"]
    cfg = load_config(None, wide, None)
    plan = build_plan(cfg, check_paths=False, local_cluster=False)
    m2 = plan.module("m2")
    assert m2.host_memory["window"] > 0 and m2.buffer_samples >= 1
    text = describe(plan, cfg)
    assert "host memory per module actor" in text and "buffer" in text
    # The same stack with a huge shuffle buffer on a small budget (m2's fixed parts alone take ~0.93 GiB):
    # refused, naming the key and the knob.
    tight = load_config(None, wide[:-1] + ["resources.memory_per_module=1.25", "feed.buffer_samples=100000",
                                           "dataset.max_per_split=100000"], None)
    with pytest.raises(ConfigError) as err:
        build_plan(tight, check_paths=False, local_cluster=False)
    keys = [k for k, _ in err.value.problems]
    assert "resources.memory_per_module" in keys
    assert "feed.buffer_samples" in str(err.value)
    # An automatic buffer shrinks to what the budget allows instead.
    auto = load_config(None, wide[:-1] + ["resources.memory_per_module=1.25"], None)
    small = build_plan(auto, check_paths=False, local_cluster=False).module("m2")
    assert small.buffer_samples <= m2.buffer_samples


def test_an_automatic_shuffle_window_is_sized_for_shuffling_not_to_fill_the_budget():
    from pipeline.planning import memory

    roomy = load_config(None, ["resources.memory_per_module=64"], None)  # 16 GiB would fit in a quarter of it
    wide = 2 * 49 * 256 * 16 * 16  # the GIM recipe's m1 row in float16: 6.4 MB
    rows = memory.buffer_samples(roomy, wide, batch_size=32)
    assert rows == 2 * 32  # 256 MiB holds 20 such rows and their partners: two batches, 410 MB, not 2,600 rows
    m3_row = 2 * 49 * 1024 * 4 * 4  # m2's float16 row: 1.6 MB
    assert rows * wide > memory.AUTO_BUFFER_BYTES >= memory.buffer_samples(roomy, m3_row, 32) * m3_row
    assert memory.buffer_samples(roomy, 4096, batch_size=32) == memory.MAX_AUTO_BUFFER  # small rows: many rows
    tight = load_config(None, ["resources.memory_per_module=0.25"], None)  # a quarter of it is 64 MiB
    assert memory.buffer_samples(tight, 16384, 32) == 2**26 // (2 * 16384)  # 2,048 rows and partners, not 8,192
    chosen = load_config(None, ["resources.memory_per_module=64", "feed.buffer_samples=5000"], None)
    assert memory.buffer_samples(chosen, wide, 32) == 5000


def test_a_cpu_step_too_wide_for_its_budget_is_micro_batched_and_its_memory_planned_so():
    from pipeline.nn.footprint import saved_bytes
    from pipeline.planning import memory
    from pipeline.planning.plan import build_plan

    gim = ["dataset.kind=synthetic_norb", "resources.gpus_per_module=0"]
    roomy = build_plan(load_config("stl10-gim", gim + ["resources.memory_per_module=64"], None),
                       check_paths=False, local_cluster=False)
    tight = build_plan(load_config("stl10-gim", gim + ["resources.memory_per_module=2.5"], None),
                       check_paths=False, local_cluster=False)
    # with room to spare, a CPU micro-batch saves at most CPU_MICRO_BYTES for autograd, and the next one would not
    for m in roomy.modules:
        assert m.micro_batch * m.saved_bytes <= memory.CPU_MICRO_BYTES < (m.micro_batch + 1) * m.saved_bytes, m.name
    assert [m.micro_batch for m in roomy.modules] == [8, 8, 11]
    m1 = tight.module("m1")
    assert 1 <= m1.micro_batch < roomy.module("m1").micro_batch  # the budget bites first: half of 2.5 GiB
    assert m1.host_memory["batch"] <= 2.5 * 2**30 / 2 < roomy.module("m1").host_memory["batch"]
    # what autograd keeps for one m1 sample: 3 bottlenecks' ReLU outputs over 49 patches of 16x16 (46 MiB)
    assert 40 * 2**20 < saved_bytes(load_config("stl10-gim", gim, None).stack["m1"], (1, 64, 64)) < 50 * 2**20
    # the user's choice wins, on any device; on a GPU the whole batch runs at once
    chosen = build_plan(load_config("stl10-gim", gim + ["resources.memory_per_module=4", "stack.m1.train.micro_batch=4",
                                                        "train.micro_batch=64"], None),
                        check_paths=False, local_cluster=False)
    assert [m.micro_batch for m in chosen.modules] == [4, 32, 32]
    gpu = build_plan(load_config("stl10-gim", ["dataset.kind=synthetic_norb", "resources.gpus_per_module=1"], None),
                     check_paths=False, local_cluster=False)
    assert [m.micro_batch for m in gpu.modules] == [32, 32, 32]


def test_the_footprint_counted_on_cpu_is_the_meta_devices_and_leaves_the_rng_alone(monkeypatch):
    import torch

    from pipeline.nn import footprint

    cfg = load_config("norb-synthetic", [], None)
    shapes = {"m1": (1, 32, 32), "m2": (64, 8, 8)}
    state = torch.random.get_rng_state()
    on_cpu = {name: footprint._measure(cfg.stack[name], shape) for name, shape in shapes.items()}
    assert torch.equal(torch.random.get_rng_state(), state)  # building the module drew its weights on a forked rng
    monkeypatch.setattr(footprint, "CPU_COUNT_MAX_PARAMS", 0)  # every module "too large": counted on the meta device
    on_meta = {name: footprint._measure(cfg.stack[name], shape) for name, shape in shapes.items()}
    assert on_cpu == on_meta and all(n > 0 for n in on_cpu.values())


def test_a_module_actor_plans_with_the_runs_footprints_instead_of_measuring_them(monkeypatch):
    from pipeline.nn import footprint
    from pipeline.planning.plan import build_plan

    monkeypatch.setattr(footprint, "_KNOWN", {})
    gim = ["dataset.kind=synthetic_norb", "resources.gpus_per_module=0", "resources.memory_per_module=64"]
    cfg = load_config("stl10-gim", gim, None)
    plan = build_plan(cfg, check_paths=False, local_cluster=False)
    assert 40 * 2**20 < plan.module("m1").saved_bytes < 50 * 2**20  # measured, and kept in the plan (run.json)
    assert all(m.saved_bytes > 0 for m in plan.modules)
    # run.json as the driver wrote it, with m1's footprint 100x over: an actor believes the plan, not a new forward
    info = {"config": cfg.model_dump(mode="json"), "plan": plan.model_dump(mode="json")}
    info["plan"]["modules"][0]["saved_bytes"] *= 100
    monkeypatch.setattr(footprint, "_KNOWN", {})
    footprint.remember_planned(info)
    again = build_plan(cfg, check_paths=False, local_cluster=False)
    assert again.module("m1").saved_bytes == 100 * plan.module("m1").saved_bytes
    assert again.module("m1").micro_batch < 8 == plan.module("m1").micro_batch  # planned with it
    # a retrain that changed m1 (a narrower first layer: another footprint) measures it again
    changed = load_config("stl10-gim", gim + ["stack.m1.layers.0.channels=32"], None)
    assert build_plan(changed, check_paths=False, local_cluster=False).module("m1").saved_bytes < plan.module("m1").saved_bytes
    known = dict(footprint._KNOWN)
    footprint.remember_planned(None)  # no run.json, or one without a plan (an older run): nothing changes
    footprint.remember_planned({"config": info["config"]})
    assert footprint._KNOWN == known
