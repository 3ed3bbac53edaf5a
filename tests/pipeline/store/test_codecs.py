"""Tensor codecs through the real store: round trips within each codec's error bound, zstd, refusals."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.errors import StoreError
from pipeline.store import Store, get_codec
from pipeline.store.codec import channel_axis
from tests.pipeline.store.test_store import by_sample_id, make_meta, write_version


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(str(tmp_path / "runs"), "run-1")


def relu_maps(n: int = 24, c: int = 6, hw: int = 5, seed: int = 0) -> torch.Tensor:
    """ReLU feature maps whose channels differ in scale by 1e4: one global scale would fail them."""
    g = torch.Generator().manual_seed(seed)
    gains = torch.logspace(-2, 2, c).view(1, c, 1, 1)
    return torch.relu(torch.randn(n, c, hw, hw, generator=g)) * gains


def test_channel_axis_of_each_row_layout():
    assert channel_axis((8, 4, 4)) == 0 and channel_axis((16,)) == 0
    assert channel_axis((49, 8, 2, 2)) == 1 and channel_axis((7, 32)) == 1 and channel_axis(()) is None


@pytest.mark.parametrize("shape", [(6, 5, 5), (3, 6, 2, 2), (6,)])
def test_int8_round_trip_within_half_a_step_per_channel(store, shape):
    x = torch.randn(30, *shape) * torch.logspace(-2, 2, 6).view(*[6 if d == channel_axis(shape) else 1 for d in range(len(shape))])
    m = write_version(store, "m1", x, codec="int8", rows_per_shard=30)  # one shard, calibrated on all its rows
    assert m.codec == "int8" and m.dtype == "uint8" and m.codec_stats["clipped"] == 0
    y = by_sample_id(store.read("m1", m.version))
    axis = 1 + channel_axis(shape)
    other = tuple(d for d in range(x.dim()) if d != axis)
    scale = (x.amax(dim=other) - x.amin(dim=other)) / 255
    err = (y - x).abs().amax(dim=other)
    assert torch.all(err <= scale / 2 * 1.001 + 1e-6), (err / scale)
    assert m.codec_stats["max_abs_error"] == pytest.approx(float((y - x).abs().max()), rel=1e-5)
    path = f"{store.root_uri}/store/m1/v{m.version:04d}/{m.shards[0].path}"
    md = pq.ParquetFile(path).metadata  # a row group per split
    size = sum(md.row_group(g).column(7).total_compressed_size for g in range(md.num_row_groups))
    assert x.numel() <= size < x.numel() + 200 * md.num_row_groups  # a byte per value, plus page headers


def test_int8_params_are_per_shard_and_relu_zeros_stay_exact(store):
    x = relu_maps(24)
    x[12:] *= 3  # the second shard's range is three times wider
    m = write_version(store, "m1", x, codec="int8", rows_per_shard=12)
    r = store.read("m1", m.version)
    y = by_sample_id(r)
    assert torch.equal(y[x == 0], x[x == 0])
    params = [get_codec("int8", m.shape)]  # a fresh codec has no params: they live in each shard's schema
    assert params[0].params == {}
    scales = [pq.read_schema(f"{store.root_uri}/store/m1/v{m.version:04d}/{s.path}").metadata[b"codec_params"]
              for s in m.shards]
    assert scales[0] != scales[1] and m.codec_stats["clipped"] == 0
    assert "scale" not in m.arrow_schema  # the manifest keeps the schema, not one shard's params


def test_int8_clips_values_beyond_the_calibrated_range_and_reports_them(store):
    x = relu_maps(20)
    w = store.begin_version("m1", codec="int8", rows_per_shard=20)
    w.write(make_meta(10), x[:10])  # calibrates the shard
    big = x[10:] * 4
    with pytest.warns(UserWarning, match="clipped"):
        w.write(make_meta(10, 10), big)
        m = w.commit()
    stats = m.codec_stats
    assert 0 < stats["clipped"] < stats["values"] == x.numel() and stats["clipped_fraction"] == stats["clipped"] / stats["values"]
    y = by_sample_id(store.read("m1", m.version))
    top = x[:10].amax(dim=(0, 2, 3)).view(1, -1, 1, 1)
    assert torch.all(y[10:] <= top * (1 + 1e-5))  # clipped to the calibrated maximum, not wrapped around


@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "NaN/inf")])
def test_int8_refuses_non_finite_values_naming_the_cause(store, bad, word):
    x = relu_maps(4)
    x[2, 1, 0, 0] = bad
    w = store.begin_version("m1", codec="int8")
    with pytest.raises(StoreError, match=word) as e:
        w.write(make_meta(4), x)
    assert "float32" in str(e.value)  # the fix
    with pytest.raises(StoreError, match="failed"):
        w.commit()


def test_int8_refuses_a_range_float32_cannot_hold(store):
    x = torch.tensor([[-3e38], [3e38]])
    with pytest.raises(StoreError, match="wider than float32"):
        store.begin_version("m1", codec="int8").write(make_meta(2), x)


def test_int8_damaged_params_are_refused():
    with pytest.raises(StoreError, match="do not fit"):
        get_codec("int8", (4, 2, 2), {"axis": 0, "scale": [1.0], "offset": [0.0]})


@pytest.mark.parametrize("codec, rel", [("float16", 2.0 ** -11), ("bfloat16", 2.0 ** -8)])
def test_half_codecs_round_trip_within_their_relative_precision(store, codec, rel):
    x = relu_maps(16) + 0.01  # normal numbers: the relative bound holds
    m = write_version(store, "m1", x, codec=codec, rows_per_shard=8)
    y = by_sample_id(store.read("m1", m.version))
    assert torch.all((y - x).abs() <= x.abs() * rel)
    assert m.codec_stats == {}


@pytest.mark.parametrize("codec", ["float32", "float16", "int8"])
def test_zstd_round_trip_matches_uncompressed_and_is_smaller_on_relu_maps(store, codec):
    x = relu_maps(32, c=4, hw=8)
    plain = write_version(store, "m1", x, codec=codec, rows_per_shard=16)
    packed = write_version(store, "m1", x, codec=codec, rows_per_shard=16, zstd_level=3)
    a, b = store.read("m1", plain.version).tensor(), store.read("m1", packed.version).tensor()
    assert torch.equal(a, b)
    assert sum(s.bytes for s in packed.shards) < 0.9 * sum(s.bytes for s in plain.shards)  # half the values are 0
    path = f"{store.root_uri}/store/m1/v{packed.version:04d}/{packed.shards[0].path}"
    assert pq.ParquetFile(path).metadata.row_group(0).column(7).compression == "ZSTD"
    assert store.verify() == []


def test_bad_zstd_level_is_refused(store):
    with pytest.raises(StoreError, match="zstd level"):
        store.begin_version("m1", codec="float16", zstd_level=30)


@pytest.mark.parametrize("codec", ["bfloat16", "int8"])
def test_a_trainer_feed_keeps_values_float16_cannot_hold(store, codec):
    """bfloat16 and int8 versions are fed without passing through float16's 65504 ceiling."""
    from pipeline.feed import load_upstream

    x = torch.rand(12, 4, 3, 3) * 1e5 + 7e4  # every value beyond float16's range
    m = write_version(store, "m1", x, codec=codec, rows_per_shard=12)
    up = load_upstream(store, "m1", m.version)
    fed = up.x.float()[np.argsort(up.sample_id)]  # row i: sample i
    assert torch.isfinite(fed).all()
    assert torch.allclose(fed, x, rtol=1e-2), (fed - x).abs().max()
