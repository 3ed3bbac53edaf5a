"""Held-out loss (issue 19): every module records ``<m>/loss/heldout`` on epochs whose upstream has a test split,
it is finite and computed without training (the weights and MoCo's queue of keys stay as they were)."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.feed import open_source
from pipeline.nn.modules import build_module
from pipeline.nn.objectives import build_objective
from pipeline.planning.config import load_config
from pipeline.run.driver import prepare_run
from schemas.objectives import MoCo
from tests.conftest import TINY_NORB
from workers.heldout import heldout_loss
from workers.trainer import ModuleTrainer


def _metric(store, module: str, name: str) -> list[tuple[int, float | None]]:
    rows = pq.read_table(pa.BufferReader(store.read_bytes(f"metrics/{module}.parquet"))).to_pylist()
    return [(r["epoch"], r["value"]) for r in rows if r["name"] == f"{module}/{name}"]


def test_each_module_records_a_heldout_loss_without_training_on_it(tmp_path):
    cfg = load_config(None, TINY_NORB + [
        "train.epochs=2", "train.batch_size=16", "train.max_steps_per_epoch=3", "schedule.poll_seconds=0.02",
        "schedule.mode=sequential"], str(tmp_path))
    cfg = cfg.model_copy(update={"stack": {k: cfg.stack[k] for k in ("m1", "m2")}})
    store, _, _ = prepare_run(cfg, "r")
    for name in cfg.stack:  # m1 to final, then m2 on m1's final version (which holds the test split)
        ModuleTrainer(store.uri, "r", name, cfg.model_dump(mode="json")).run()
    for name in ("m1", "m2"):
        heldout = _metric(store, name, "loss/heldout")
        assert [e for e, _ in heldout] == [1, 2], heldout
        assert all(v is not None and math.isfinite(v) for _, v in heldout), heldout

    # Evaluated in eval mode without gradients: MoCo's queue and the module's weights are untouched.
    src = open_source(store, "m1", store.final("m1").version, cfg.model_dump(mode="json"), torch.device("cpu"))
    in_shape = tuple(src.row_shape)
    module = build_module(cfg.stack["m2"], in_shape)
    with torch.no_grad():
        out_shape = tuple(module(torch.zeros((1, *in_shape))).shape[1:])
    objective = build_objective(MoCo(pairing="same_instance", queue_size=8), out_shape, None, in_shape=in_shape,
                                module=module)
    before = {k: v.clone() for k, v in {**module.state_dict(), **objective.state_dict()}.items()}
    loss = heldout_loss(src, module, objective, pairing="same_instance", batch_size=8, buffer=64,
                        device=torch.device("cpu"), seed=[0])
    assert loss is not None and math.isfinite(loss)
    after = {**module.state_dict(), **objective.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before), "held-out loss changed the module's state"
    assert module.training and objective.training  # modes restored for the next epoch
