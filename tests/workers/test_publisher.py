"""Publishing a full version: bounded chunks whatever the size, train rows only in intermediate versions,
nothing committed when it fails half way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.feed import load_upstream, open_versions
from pipeline.planning import memory
from pipeline.planning.config import load_config
from pipeline.planning.plan import ModulePlan, build_plan
from pipeline.store import Store
from tests.conftest import TINY_NORB
from workers.epochs import publishes_after
from workers.evaluator import Evaluator
from workers.publisher import publish_version

D_IN, D_OUT = 6, 4


class Counting(torch.nn.Module):
    """A linear map that records how many rows each forward call sees; raises at call ``fail_at``."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(D_IN, D_OUT)
        self.calls: list[int] = []
        self.fail_at = fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("boom in the middle of publishing")
        return self.lin(x)


def _upstream(tmp_path, n: int, n_test: int):
    """A store whose stage ``up`` holds n train and n_test test rows of D_IN floats, and its source."""
    store = Store(str(tmp_path / "store"), "r")
    w = store.begin_version("up", codec="float32", final=True, rows_per_shard=64)
    ids = np.arange(n + n_test)
    w.write({"sample_id": ids, "split": ["train"] * n + ["test"] * n_test},
            torch.arange((n + n_test) * D_IN, dtype=torch.float32).reshape(-1, D_IN) / 100)
    return store, open_versions(store, [w.commit()])


def _setup(tmp_path, *, chunk: int = 7, fraction: float = 1.0):
    cfg = load_config(None, TINY_NORB + ["store.rows_per_shard=32"], str(tmp_path / "store"))
    name = next(iter(cfg.stack))
    plan = ModulePlan(name=name, index=0, upstream="up", in_shape=[D_IN], out_shape=[D_OUT], params=0,
                      objective="x", pairing=None, epochs=2, batch_size=4, lr=1e-3, bytes_per_version=None,
                      publish_chunk=chunk, publish_fraction=fraction)
    return cfg, plan


def _publish(store, cfg, plan, src, module, final):
    return publish_version(store, cfg, plan, src, module, torch.device("cpu"), final=final, epoch=1,
                           producer={"module": plan.name}, upstream={"stage": "up", "version": 1})


@pytest.mark.parametrize("n", [50, 400])
def test_rows_per_forward_are_bounded_by_the_chunk_not_the_dataset(tmp_path, n):
    cfg, plan = _setup(tmp_path, chunk=7)
    store, src = _upstream(tmp_path, n, n // 5)
    module = Counting()
    m = _publish(store, cfg, plan, src, module, final=True)
    assert max(module.calls) == 7  # the same peak at 50 and at 400 rows
    assert sum(module.calls) == m.rows == n + n // 5
    out = open_versions(store, [m])
    got = out.fetch(np.arange(len(out)))
    assert got.dtype == torch.float16  # cast on the device before it reached the writer
    expect = module.lin(src.fetch(np.argsort(src.sample_id)[out.sample_id]))  # the upstream rows of out's samples
    torch.testing.assert_close(got.float(), expect.detach(), atol=2e-3, rtol=2e-3)


def test_intermediate_versions_hold_train_rows_only_and_the_final_all(tmp_path):
    cfg, plan = _setup(tmp_path, fraction=1.0)
    store, src = _upstream(tmp_path, 40, 10)
    mid = _publish(store, cfg, plan, src, Counting(), final=False)
    assert mid.splits == {"train": 40}
    thin = _publish(store, cfg, plan.model_copy(update={"publish_fraction": 0.25}), src, Counting(), final=False)
    assert thin.splits == {"train": 16}  # a quarter is 10 rows: raised to 4 batches of 4
    thinner = _publish(store, cfg, plan.model_copy(update={"publish_fraction": 0.25, "batch_size": 2}), src,
                       Counting(), final=False)
    assert thinner.splits == {"train": 10}
    final = _publish(store, cfg, plan, src, Counting(), final=True)
    assert final.splits == {"train": 40, "test": 10}


def test_a_failure_mid_publish_commits_nothing(tmp_path):
    cfg, plan = _setup(tmp_path, chunk=5)
    store, src = _upstream(tmp_path, 60, 0)
    before = store.versions(plan.name)
    module = Counting(fail_at=4)  # three chunks already handed to the writer thread
    with pytest.raises(RuntimeError, match="boom"):
        _publish(store, cfg, plan, src, module, final=True)
    assert store.versions(plan.name) == before
    assert store.final(plan.name) is None
    assert module.training  # back in train mode for the next epoch


def test_float16_overflow_is_refused_not_stored_as_inf(tmp_path):
    cfg, plan = _setup(tmp_path)
    store, src = _upstream(tmp_path, 10, 0)
    module = Counting()
    with torch.no_grad():
        module.lin.weight.fill_(1e5)
    with pytest.raises(Exception, match="float16 range"):
        _publish(store, cfg, plan, src, module, final=True)
    assert store.final(plan.name) is None


def test_publish_chunk_comes_from_memory_not_the_dataset():
    cfg = load_config(None, TINY_NORB + ["resources.memory_per_module=0.5"])
    per_row = memory.inference_bytes(4096, 49 * 256 * 16 * 16)  # the GIM recipe's m1: ~38 MB a row
    assert memory.publish_chunk(cfg, 4096, 49 * 256 * 16 * 16) == int(0.1 * 0.5 * 2**30) // per_row  # a tenth
    roomy = load_config(None, TINY_NORB + ["resources.memory_per_module=64"])
    assert memory.publish_chunk(roomy, 4096, 49 * 256 * 16 * 16) == memory.PUBLISH_CHUNK_BYTES // per_row  # the cap
    assert memory.publish_chunk(cfg, 10, 10) * memory.inference_bytes(10, 10) <= memory.PUBLISH_CHUNK_BYTES


def test_wide_modules_are_thinned_unless_the_user_chose():
    cfg = load_config(None, TINY_NORB)
    assert memory.publish_policy(cfg, epochs=300, version_bytes=2**20) == (1, 1.0)
    assert memory.publish_policy(cfg, epochs=300, version_bytes=2 * 2**30) == (30, 0.25)
    assert memory.publish_policy(cfg, epochs=300, version_bytes=100 * 2**30) == (30, memory.MIN_FRACTION)
    chosen = load_config(None, TINY_NORB + ["schedule.publish_every=1", "schedule.publish_fraction=1.0"])
    assert memory.publish_policy(chosen, epochs=300, version_bytes=100 * 2**30) == (1, 1.0)


def test_the_top_module_publishes_only_its_final_version_unless_the_user_chose(tmp_path):
    plan = build_plan(load_config(None, TINY_NORB), check_paths=False, local_cluster=False)
    every = {m.name: m.publish_every for m in plan.modules}
    top = plan.modules[-1].name
    assert every[top] == 0 and all(v >= 1 for k, v in every.items() if k != top), every
    chosen = build_plan(load_config(None, TINY_NORB + ["schedule.publish_every=2"]), check_paths=False,
                        local_cluster=False)
    assert all(m.publish_every == 2 for m in chosen.modules)
    assert not publishes_after(1, budget=3, publish_every=0, upstream_final=False)


def test_no_intermediate_versions_where_no_module_trains_on_them():
    """Sequential mode starts a module once its upstream is final, and settle_epochs >= epochs makes an async
    module wait for it: intermediate versions would be inference and bytes for nobody."""
    for sets in (["schedule.mode=sequential"], ["schedule.settle_epochs=99"]):
        plan = build_plan(load_config(None, TINY_NORB + sets), check_paths=False, local_cluster=False)
        assert all(m.publish_every == 0 for m in plan.modules), (sets, [m.publish_every for m in plan.modules])
    chosen = build_plan(load_config(None, TINY_NORB + ["schedule.mode=sequential", "schedule.publish_every=2"]),
                        check_paths=False, local_cluster=False)
    assert all(m.publish_every == 2 for m in chosen.modules)


def test_the_planned_memory_holds_two_publishing_chunks_whatever_the_rows():
    cfg = load_config(None, TINY_NORB + ["resources.memory_per_module=8", "feed.buffer_samples=8"])
    row_bytes = lambda c, shape: 2 * int(np.prod(shape)) if c == "float16" else int(np.prod(shape))  # noqa: E731
    parts = [memory.host_memory(cfg, in_shape=[1, 64, 64], out_shape=[49, 256, 16, 16], in_codec="uint8", params=1,
                                batch_size=1, pairing=None, rows=rows, buffer=8, row_bytes=row_bytes,
                                out_codec="float16") for rows in (100_000, 10_000_000)]
    chunk = memory.publish_chunk(cfg, 64 * 64, 49 * 256 * 16 * 16)
    held = chunk * (memory.inference_bytes(64 * 64, 49 * 256 * 16 * 16) + 2 * 49 * 256 * 16 * 16)
    assert parts[0]["publish"] == parts[1]["publish"] > 0
    # publishing replaces the training parts while it runs: together they cover the two chunks and a row group
    assert sum(parts[0][k] for k in ("publish", "window", "readahead", "batch")) >= held


def test_wide_rows_go_into_small_shards_so_the_writer_buffers_little():
    cfg = load_config(None, TINY_NORB + ["store.rows_per_shard=4096"])
    wide = 2 * 49 * 256 * 16 * 16  # the GIM recipe's m1 row in float16: 6.4 MB
    assert memory.publish_shard_rows(cfg, wide) * wide <= memory.PUBLISH_SHARD_BYTES
    assert memory.publish_shard_rows(cfg, 100) == 4096


def test_infinities_of_the_module_itself_are_stored_not_refused(tmp_path):
    cfg, plan = _setup(tmp_path)
    store, src = _upstream(tmp_path, 10, 0)
    module = Counting()
    with torch.no_grad():
        module.lin.bias[0] = float("inf")
    m = _publish(store, cfg, plan, src, module, final=True)
    got = open_versions(store, [m]).fetch(np.arange(10))
    assert torch.isinf(got[:, 0]).all() and torch.isfinite(got[:, 1:]).all()


def test_every_reader_keeps_each_row_with_its_own_sample_id(tmp_path):
    """A shard stores its splits one after the other, so a row's position differs from the order written and
    from one version to the next (other shard sizes regroup them). Every reader must hand out each row's
    tensor with that row's own sample_id and label: one that paired rows by position fails here."""
    cfg, plan = _setup(tmp_path, chunk=5)
    store = Store(str(tmp_path / "store"), "r")
    n = 60
    written = np.random.default_rng(0).permutation(n)  # sample ids, written out of order, splits interleaved

    def rows_of(ids) -> torch.Tensor:  # (len(ids), D_IN): sample i's row is i, i + 1/8, i + 2/8, ...
        return torch.as_tensor(np.asarray(ids), dtype=torch.float32)[:, None] + torch.arange(D_IN) / 8

    w = store.begin_version("up", codec="float32", final=True, rows_per_shard=9)
    w.write({"sample_id": written, "split": np.where(written % 3 == 0, "test", "train"), "label": written % 4},
            rows_of(written))
    src = open_versions(store, [w.commit()])
    module = Counting()
    with torch.no_grad():  # the first D_OUT values of each row: a row's output still names its sample
        module.lin.weight.copy_(torch.eye(D_OUT, D_IN))
        module.lin.bias.zero_()
    m = _publish(store, cfg, plan, src, module, final=True)  # float16, shards of 32 rows

    def check(ids, x, labels=None):
        assert torch.equal(x.float(), rows_of(ids)[:, :x.shape[1]])
        if labels is not None:
            assert np.array_equal(np.asarray(labels), np.asarray(ids) % 4)

    out = open_versions(store, [m])
    # The premise: stored positions differ from the order written and between the two versions.
    assert not np.array_equal(src.sample_id, written) and not np.array_equal(out.sample_id, src.sample_id)
    reader = store.read(plan.name, m.version)
    check(reader.meta.column("sample_id").to_numpy(), reader.tensor(), reader.meta.column("label").to_numpy())
    wanted = np.random.default_rng(1).permutation(n)
    (batch,) = reader.batches(n, sample_ids=wanted)
    check(wanted, batch.x, batch.label.numpy())
    assert np.array_equal(batch.sample_id.numpy(), wanted)
    for rows, x in out.scan():  # the streamed feed's and the publisher's path
        check(out.sample_id[rows], x, out.label[rows])
    check(out.sample_id[wanted[:10]], out.fetch(wanted[:10]))
    up = load_upstream(store, plan.name, m.version)  # the in-memory feed
    check(up.sample_id, up.x, up.label)
    evaluator = Evaluator(store.uri, store.run_id, cfg.model_dump(mode="json"))  # the final stage and exports
    evaluator.setup()
    meta, emb = evaluator.embeddings(plan.name)
    ids = meta.column("sample_id").to_numpy()
    assert np.array_equal(ids, np.arange(n))  # in sample_id order, whatever the stored order
    check(ids, torch.from_numpy(emb), meta.column("label").to_numpy())


def test_chunk_outputs_reuse_two_host_buffers_in_turn(tmp_path):
    """Each chunk's output lands in one of two buffers, so the heap sees the same blocks every chunk; a chunk's
    values stay intact while the next one is computed (the writer's window), and the last short chunk fits."""
    from workers.publisher import infer_chunks

    store, src = _upstream(tmp_path, 23, 0)
    module = Counting()
    seen = []
    for idx, z in infer_chunks(src, module, torch.device("cpu"), None, 5, torch.float16):
        if seen:
            prev_idx, prev_z, prev_copy = seen[-1]
            assert torch.equal(prev_z, prev_copy)  # not overwritten by the chunk after it
        seen.append((idx, z, z.clone()))
    ptrs = [z.untyped_storage().data_ptr() for _, z, _ in seen]
    assert len(seen) == 5 and len(set(ptrs)) == 2 and ptrs[0] == ptrs[2] == ptrs[4] != ptrs[1] == ptrs[3]
    assert seen[-1][1].shape == (3, D_OUT) and seen[-1][1].dtype == torch.float16
    got = torch.cat([c for _, _, c in seen])
    torch.testing.assert_close(got.float(), module.lin(src.fetch(np.concatenate([i for i, _, _ in seen]))).detach(),
                               atol=2e-3, rtol=2e-3)
