"""The activation store on real files: round trips, the commit protocol, integrity, upkeep."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.errors import IntegrityError, StoreError
from pipeline.store import META_COLUMNS, Batch, Store, meta_schema
from pipeline.store.bench import measure_io

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def make_meta(n: int, start: int = 0, *, test_every: int = 3) -> pa.Table:
    ids = np.arange(start, start + n, dtype=np.int64)
    return pa.table({
        "sample_id": ids,
        "split": ["test" if i % test_every == 0 else "train" for i in ids],
        "label": pa.array([int(i % 5) if i % 4 else None for i in ids], pa.int64()),
        "instance": pa.array([int(i % 7) for i in ids], pa.int64()),
        "azimuth": pa.array([float(20 * (i % 18)) if i % 6 else None for i in ids], pa.float32()),
        "elevation": pa.array([30.0 + 5 * (i % 9) for i in ids], pa.float32()),
        "lighting": pa.array([None if i % 2 else int(i % 6) for i in ids], pa.int64()),
    })


def by_sample_id(reader, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The version's rows as one tensor whose row i is sample i (the tests' ids are 0..N-1), matched by ``sample_id``.

    Not the stored order: a shard stores its rows one split after the other.
    """
    ids = reader.meta.column("sample_id").to_numpy()
    y = reader.tensor(dtype=dtype)
    assert len(ids) == len(y) and np.array_equal(np.sort(ids), np.arange(len(y)))
    return torch.empty_like(y).index_copy_(0, torch.from_numpy(ids), y)


def write_version(store: Store, stage: str, x: torch.Tensor, *, codec: str = "float32", rows_per_shard: int = 7,
                  pieces: int = 1, **kw):
    w = store.begin_version(stage, codec=codec, rows_per_shard=rows_per_shard, **kw)
    bounds = np.linspace(0, len(x), pieces + 1).astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        w.write(make_meta(hi - lo, lo), x[lo:hi])
    return w.commit()


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(str(tmp_path / "runs"), "run-1")


# ------------------------------------------------------------ round trips


def test_float32_round_trip_is_bit_exact_over_many_writes_and_shards(store):
    x = torch.randn(50, 3, 4, 4)
    x[0, 0, 0, 0] = float("inf")
    x[1, 0, 0, 0] = -0.0
    m = write_version(store, "m1", x, codec="float32", rows_per_shard=7, pieces=4)
    # The pieces share the caller's memory, so a tail of >= half a shard is written short rather than copied.
    assert m.rows == 50 and [s.rows for s in m.shards] == [7, 5, 7, 6, 7, 5, 7, 6]
    assert m.shape == [3, 4, 4] and m.codec == m.dtype == "float32"
    assert m.splits == {"test": 17, "train": 33}
    y = by_sample_id(store.read("m1", m.version), dtype=torch.float32)
    assert y.shape == x.shape and torch.equal(y.view(torch.int32), x.view(torch.int32))


def test_float16_round_trip_of_representable_values(store):
    x = (torch.randn(30, 8) * 100).to(torch.float16).to(torch.float32)
    m = write_version(store, "m1", x, codec="float16", rows_per_shard=8, pieces=3)
    assert [s.rows for s in m.shards] == [8, 8, 8, 6]  # the cast made new memory: pending rows wait, full shards
    r = store.read("m1", m.version)
    assert torch.equal(by_sample_id(r), x)
    assert torch.equal(by_sample_id(r, dtype=torch.float16), x.half())
    assert m.dtype == "float16" and "x: fixed_size_binary[16]" in m.arrow_schema


def test_uint8_pixels_round_trip(store):
    x = torch.randint(0, 256, (20, 1, 6, 6), dtype=torch.uint8)
    m = write_version(store, "input", x.numpy(), codec="uint8", rows_per_shard=6, final=True)
    r = store.read("input", m.version)
    assert torch.equal(by_sample_id(r, dtype=torch.uint8), x)
    assert torch.equal(by_sample_id(r), x.float())


def test_bfloat16_round_trip(store):
    x = torch.randn(10, 3).to(torch.bfloat16)
    m = write_version(store, "m1", x, codec="bfloat16", rows_per_shard=4)
    r = store.read("m1", m.version)
    assert m.dtype == "bfloat16" and torch.equal(by_sample_id(r, dtype=torch.bfloat16), x)
    assert torch.equal(by_sample_id(r), x.float())


def test_codecs_refuse_what_they_would_corrupt(store):
    w = store.begin_version("input", codec="uint8")
    with pytest.raises(StoreError, match="uint8"):
        w.write(make_meta(2), torch.rand(2, 3))
    w = store.begin_version("m1", codec="float16")
    with pytest.raises(StoreError, match="float16 range"):
        w.write(make_meta(2), torch.tensor([[1.0], [1e6]]))
    with pytest.raises(StoreError, match="unknown tensor codec"):
        store.begin_version("m1", codec="int4")


def test_a_reused_tensor_buffer_does_not_change_pending_rows(store):
    buf = np.zeros((3, 2), dtype=np.float32)
    w = store.begin_version("m1", codec="float32", rows_per_shard=100)
    for k in range(3):
        buf[:] = k
        w.write(make_meta(3, 3 * k), buf)
    m = w.commit()
    assert by_sample_id(store.read("m1", m.version))[:, 0].tolist() == [0.0] * 3 + [1.0] * 3 + [2.0] * 3


def test_split_row_groups_store_each_shard_one_split_after_the_other(store):
    x = torch.randn(40, 3)
    w = store.begin_version("m1", codec="float32", rows_per_shard=16, split_row_groups=True)
    w.write(make_meta(40), x)  # every 3rd row (from 0) a test row
    m = w.commit()
    assert [s.rows for s in m.shards] == [16, 16, 8] and m.splits == {"test": 14, "train": 26}
    r = store.read("m1", m.version)
    r.verify()
    ids = r.meta.column("sample_id").to_numpy()
    split = np.array(r.meta.column("split").to_pylist())
    assert sorted(ids.tolist()) == list(range(40)) and torch.equal(r.tensor(), x[ids])  # rows keep their tensors
    assert ids[:16].tolist() == [0, 3, 6, 9, 12, 15] + [i for i in range(16) if i % 3]  # first split seen first
    lo = 0
    for _, _, n in r.row_groups():  # no row group mixes splits
        assert len(set(split[lo:lo + n])) == 1
        lo += n
    (batch,) = r.batches(40, sample_ids=[5, 0, 39])
    assert torch.equal(batch.x, x[[5, 0, 39]])


def test_metadata_nulls_and_missing_columns_survive(store):
    m = write_version(store, "m1", torch.zeros(12, 2), rows_per_shard=5)
    meta = store.read("m1", m.version).meta
    assert meta.schema == meta_schema() and tuple(meta.column_names) == META_COLUMNS
    assert meta.sort_by("sample_id").equals(pa.Table.from_arrays(list(make_meta(12).columns), schema=meta_schema()))
    (batch,) = store.read("m1", m.version).batches(12, sample_ids=range(12))
    assert batch.label[0].item() == -1 and batch.label[1].item() == 1
    assert torch.isnan(batch.azimuth[0]) and batch.azimuth[1].item() == 20.0
    assert batch.lighting[1].item() == -1 and batch.lighting[2].item() == 2

    w = store.begin_version("input", codec="float32")
    w.write({"sample_id": [0, 1], "split": ["train", "test"]}, torch.ones(2, 1))
    meta = store.read("input", w.commit().version).meta
    assert meta.column("label").null_count == 2 and meta.column("azimuth").type == pa.float32()


def test_bad_metadata_is_refused(store):
    w = store.begin_version("m1", codec="float32")
    with pytest.raises(StoreError, match="unknown metadata columns"):
        w.write({"sample_id": [0], "split": ["train"], "colour": [1]}, torch.ones(1, 1))
    with pytest.raises(StoreError, match="sample_id"):
        w.write({"split": ["train"]}, torch.ones(1, 1))
    with pytest.raises(StoreError, match="3 rows"):
        w.write(make_meta(3), torch.ones(2, 1))
    w.write(make_meta(2), torch.ones(2, 1))
    with pytest.raises(StoreError, match="shape"):
        w.write(make_meta(2, 2), torch.ones(2, 3))
    w.write(make_meta(1, 1), torch.ones(1, 1))
    with pytest.raises(StoreError, match="repeat"):
        w.commit()
    with pytest.raises(StoreError, match="no rows"):
        store.begin_version("m2").commit()


# ------------------------------------------------------------ batches


def ids_of(batches: list[Batch]) -> list[int]:
    return [i for b in batches for i in b.sample_id.tolist()]


def test_batches_by_split_ids_and_shuffle_cover_each_row_once(store):
    x = torch.randn(41, 2, 3)
    m = write_version(store, "m1", x, rows_per_shard=6, pieces=2)
    r = store.read("m1", m.version)
    ids = r.meta.column("sample_id").to_numpy()
    split = np.array(r.meta.column("split").to_pylist())

    plain = list(r.batches(8))  # stored order: per shard, one split after the other
    assert ids_of(plain) == ids.tolist() and sorted(ids.tolist()) == list(range(41))
    assert [len(b) for b in plain] == [8] * 5 + [1]
    assert torch.equal(torch.cat([b.x for b in plain]), x[ids])

    train = list(r.batches(5, split="train"))
    assert ids_of(train) == ids[split == "train"].tolist()
    assert all((b.split == "train").all() for b in train)

    wanted = [40, 3, 17, 0, 22]
    (picked,) = r.batches(10, sample_ids=wanted)
    assert picked.sample_id.tolist() == wanted and torch.equal(picked.x, x[wanted])
    with pytest.raises(StoreError, match="not in"):
        next(r.batches(4, sample_ids=[1, 999]))

    shuffled = list(r.batches(8, shuffle=True, seed=3))
    order = ids_of(shuffled)
    assert sorted(order) == list(range(41)) and order != list(range(41))
    assert order == ids_of(r.batches(8, shuffle=True, seed=3)) != ids_of(r.batches(8, shuffle=True, seed=4))
    for b in shuffled:
        assert torch.equal(b.x, x[b.sample_id])
        assert b.label.tolist() == [int(i % 5) if i % 4 else -1 for i in b.sample_id.tolist()]

    test_shuffled = list(r.batches(4, split="test", shuffle=True, drop_last=True, dtype=torch.float64))
    assert all(len(b) == 4 and b.x.dtype == torch.float64 for b in test_shuffled)
    assert len(set(ids_of(test_shuffled))) == 4 * (int((split == "test").sum()) // 4)


# ------------------------------------------------------------ commit protocol


def test_a_writer_that_never_commits_leaves_only_an_orphan(store):
    w = store.begin_version("m1", codec="float32", rows_per_shard=4)
    w.write(make_meta(10), torch.ones(10, 2))  # two shards on disk, two rows pending
    assert store.versions("m1") == [] and store.newest("m1") is None and store.stages() == []
    with pytest.raises(StoreError, match="no committed version 1"):
        store.read("m1", 1)
    assert store.orphans() == ["store/m1/v0001"]

    m = write_version(store, "m1", torch.ones(5, 2))
    assert m.version == 2 and store.versions("m1") == [2]
    assert store.gc() == ["store/m1/v0001"] and store.orphans() == []
    assert store.versions("m1") == [2] and store.verify() == []
    store.begin_version("m1").write(make_meta(1), torch.ones(1, 2))  # v3, never committed
    assert store.gc() == ["store/m1/v0003"]
    assert store.begin_version("m1").version == 4  # not 3: a gc'd number stays used


def test_a_writer_killed_with_sigkill_leaves_no_version(tmp_path):
    root = str(tmp_path / "runs")
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {REPO!r})
        from pipeline.store import Store
        from tests.pipeline.store.test_store import make_meta
        w = Store({root!r}, "run-1").begin_version("m1", codec="float32", rows_per_shard=4)
        w.write(make_meta(10), torch.ones(10, 2))
        print("written", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
    store = Store(root, "run-1")
    assert len([n for n in store.list_dir("store/m1/v0001") if n.endswith(".parquet")]) >= 2
    assert store.versions("m1") == [] and store.orphans() == ["store/m1/v0001"]
    assert store.begin_version("m1").version == 2
    assert "store/m1/v0001" in store.gc() and not store.exists("store/m1/v0001")


def test_abort_deletes_shards_and_context_manager_never_commits(store):
    w = store.begin_version("m1", codec="float32", rows_per_shard=2)
    w.write(make_meta(5), torch.ones(5, 1))
    w.abort()
    assert [n for n in store.list_dir("store/m1/v0001") if n.endswith(".parquet")] == []
    with pytest.raises(StoreError, match="aborted"):
        w.commit()
    with store.begin_version("m1", codec="float32") as w2:
        w2.write(make_meta(2), torch.ones(2, 1))
    assert store.versions("m1") == []


def test_stray_files_in_a_committed_version_are_orphans(store):
    m = write_version(store, "m1", torch.ones(9, 2), rows_per_shard=4)
    vdir = f"store/m1/v{m.version:04d}"
    store.write_bytes(f"{vdir}/.part-dead.parquet.tmp", b"half a shard")
    store.write_bytes(f"{vdir}/part-extra.parquet", b"not listed")
    assert store.orphans() == [f"{vdir}/.part-dead.parquet.tmp", f"{vdir}/part-extra.parquet"]
    assert store.verify("m1") == []  # leftovers are not damage: verify passes, orphans() names them
    assert store.orphans(older_than_s=3600) == [] and store.orphans(stages=["m2"]) == []
    assert len(store.gc()) == 2 and store.verify() == []
    assert torch.equal(store.read("m1", m.version, verify=True).tensor(), torch.ones(9, 2))


# ------------------------------------------------------------ integrity


def test_a_flipped_byte_is_caught_by_verify(store):
    m = write_version(store, "m1", torch.randn(20, 16), rows_per_shard=8)
    shard = m.shards[1]
    path = os.path.join(store.root_uri, "store", "m1", "v0001", shard.path)
    with open(path, "r+b") as f:
        f.seek(shard.bytes // 2)
        byte = f.read(1)
        f.seek(shard.bytes // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IntegrityError) as err:
        store.read("m1", m.version, verify=True)
    assert shard.path in str(err.value) and shard.sha256 in str(err.value)
    assert err.value.fix
    problems = store.verify()
    assert len(problems) == 1 and shard.path in problems[0]


def _flip_tensor_byte(path: str) -> None:
    """Flip one byte in the middle of the tensor column's data page (not in a header the reader parses first)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    col = next(meta.row_group(0).column(i) for i in range(meta.num_columns)
               if meta.row_group(0).column(i).path_in_schema == "x")
    at = col.data_page_offset + col.total_compressed_size // 2
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))


def test_a_flipped_byte_is_refused_on_a_normal_read(store):
    # Without page checksums this read returned the damaged value (one bit of a float) and training went on.
    m = write_version(store, "m1", torch.zeros(20, 16), rows_per_shard=8)
    shard = m.shards[1]
    _flip_tensor_byte(os.path.join(store.root_uri, "store", "m1", "v0001", shard.path))
    with pytest.raises(IntegrityError) as err:
        store.read("m1", m.version).tensor()  # verify=False: the reading path every trainer uses
    assert shard.path in str(err.value) and "isostack verify" in err.value.fix


def test_a_missing_shard_is_named(store):
    m = write_version(store, "m1", torch.randn(20, 4), rows_per_shard=8)
    gone = m.shards[2].path
    os.remove(os.path.join(store.root_uri, "store", "m1", "v0001", gone))
    for verify in (False, True):
        with pytest.raises(IntegrityError, match=gone):
            store.read("m1", m.version, verify=verify)
    assert any(gone in p for p in store.verify("m1"))


def test_errors_pickle_with_their_fix(store):
    with pytest.raises(StoreError) as err:
        store.manifest("m1", 4)
    back = pickle.loads(pickle.dumps(err.value))
    assert type(back) is StoreError and back.fix == err.value.fix and back.cause == err.value.cause


# ------------------------------------------------------------ versions and retention


def test_versions_newest_final_and_retention(store):
    x = torch.ones(3, 1)
    for v in range(1, 7):
        write_version(store, "m1", x, final=(v == 2), producer={"epoch": v}, upstream={"stage": "input", "version": 1})
    assert store.versions("m1") == [1, 2, 3, 4, 5, 6] and store.stages() == ["m1"]
    assert store.newest("m1").version == 6 and store.final("m1").version == 2
    assert store.manifest("m1", 4).producer == {"epoch": 4}
    assert store.manifest("m1", 4).upstream == {"stage": "input", "version": 1}

    assert store.apply_retention("m1", keep=2, pinned={3}) == [1, 4]
    assert store.versions("m1") == [2, 3, 5, 6]
    assert not store.exists("store/m1/v0001") and store.orphans() == []
    assert store.apply_retention("m1", keep=10) == []
    assert store.apply_retention("m1", keep=0) == [3, 5, 6] and store.versions("m1") == [2]
    assert store.begin_version("m1").version == 7


def test_a_half_deleted_version_is_invisible(store):
    write_version(store, "m1", torch.ones(3, 1))
    write_version(store, "m1", torch.ones(3, 1))
    store.delete("store/m1/v0001/_MANIFEST.json")  # a retention that crashed after step one
    assert store.versions("m1") == [2] and store.gc() == ["store/m1/v0001"]


# ------------------------------------------------------------ the root and small files


def test_an_unwritable_root_names_the_uri(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    uri = str(blocker / "store")
    with pytest.raises(StoreError) as err:
        Store(uri, "run-1")
    assert uri in str(err.value) and err.value.fix


def test_small_files_are_atomic_and_stay_under_the_root(store):
    store.write_json("run.json", {"run_id": "run-1", "status": "running"})
    store.write_json("run.json", {"run_id": "run-1", "status": "done"})
    assert store.read_json("run.json") == {"run_id": "run-1", "status": "done"}
    store.write_bytes("checkpoints/m1/3.json", b"{}")
    assert store.read_bytes("checkpoints/m1/3.json") == b"{}"
    assert store.read_json("nope.json") is None and store.read_bytes("nope.bin") is None
    assert store.list_dir("") == ["checkpoints", "run.json"] and store.list_dir("absent") == []
    assert store.exists("checkpoints/m1") and not store.exists("checkpoints/m2")
    store.delete("checkpoints")
    store.delete("checkpoints")
    assert store.list_dir("") == ["run.json"]
    with pytest.raises(StoreError, match="leaves the run root"):
        store.read_json("../other-run/run.json")
    store.write_bytes("bad.json", b"{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        store.read_json("bad.json")


def test_file_uri_and_pickled_store_see_the_same_run(tmp_path):
    uri = f"file://{tmp_path}/runs"
    store = Store(uri, "run-1")
    assert store.root_uri == f"{uri}/run-1"
    m = write_version(store, "m1", torch.arange(6.0).view(3, 2))
    again = pickle.loads(pickle.dumps(store))
    assert again.versions("m1") == [m.version]
    assert torch.equal(Store(str(tmp_path / "runs"), "run-1").read("m1", 1).tensor(), torch.arange(6.0).view(3, 2))


def test_measure_io_reports_rates(tmp_path):
    out = measure_io(str(tmp_path), mb=2, repeats=1)
    for key in ("store_write_mb_s", "store_read_mb_s", "file_write_mb_s", "file_read_mb_s"):
        assert out[key] > 0


def test_an_object_store_behaves_like_a_disk(monkeypatch):
    """The non-local code paths (single PUTs, prefixes as directories) against moto's S3."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    for key, value in dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1").items():
        monkeypatch.setenv(key, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="isostack")
        uri = f"s3://isostack/runs?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        store = Store(uri, "run-1")
        assert store.root_uri.startswith("s3://isostack/runs/run-1?")
        store.write_json("run.json", {"run_id": "run-1"})
        assert store.read_json("run.json") == {"run_id": "run-1"} and store.read_json("absent.json") is None
        x = torch.randn(10, 2)
        m = write_version(store, "m1", x, rows_per_shard=4)
        store.begin_version("m1", codec="float32", rows_per_shard=4).write(make_meta(5), torch.ones(5, 2))
        assert store.versions("m1") == [m.version] and store.stages() == ["m1"]
        assert torch.equal(by_sample_id(store.read("m1", m.version, verify=True)), x)
        assert store.orphans() == ["store/m1/v0002"] and store.gc() == ["store/m1/v0002"]
        assert store.begin_version("m1").version == 3
    finally:
        server.stop()


def test_final_and_newest_skip_a_version_removed_after_listing(store, monkeypatch):
    """A stream ring trims versions while readers look: a version listed then removed is skipped, not an error."""
    x = torch.randn(6, 3)
    write_version(store, "m1", x, final=True)
    write_version(store, "m1", x)
    listed = store.versions("m1")
    real = store.versions
    calls = {"n": 0}

    def stale_then_real(stage):
        calls["n"] += 1
        return listed + [listed[-1] + 1] if calls["n"] == 1 else real(stage)  # v3 was listed, then trimmed

    monkeypatch.setattr(store, "versions", stale_then_real)
    assert store.final("m1").version == listed[0]
    calls["n"] = 0
    assert store.newest("m1").version == listed[-1]


def test_listing_a_stage_while_its_directory_is_created_is_never_an_error(tmp_path):
    """pyarrow's local listing can fail with "not found" for a directory made while it lists (it looks again
    and finds it); a reader polling a stage whose first version another process is writing must get a list."""
    import threading

    from pipeline.store.fs import RunFS

    failures = []
    for trial in range(300):
        fs = RunFS(str(tmp_path / str(trial)), "r")
        made = threading.Thread(target=os.makedirs, args=(fs.path("store/m1/v000001"),))
        made.start()
        for _ in range(20):
            try:
                fs.listdir("store/m1")
            except Exception as exc:  # noqa: BLE001 - counted, and the test fails on any
                failures.append(repr(exc))
        made.join()
    assert not failures, failures[:3]
    assert [i.base_name for i in fs.listdir("store/m1")] == ["v000001"]
