"""The streaming feed reads an ``s3://`` store (moto's server on 127.0.0.1) with the same code and order as a local one."""

from __future__ import annotations

import numpy as np

from pipeline.store import Store
from tests.deploy.test_s3 import ACCESS_KEY, BUCKET, SECRET_KEY, moto_s3  # noqa: F401 - the server fixture
from tests.pipeline.feed.test_streaming import _epoch, _ids, make_version
from pipeline.feed import open_versions


def test_streaming_from_s3_matches_local(moto_s3, tmp_path, monkeypatch):  # noqa: F811
    _, port = moto_s3
    for key, value in {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    remote = Store(f"s3://{BUCKET}/feed?endpoint_override=127.0.0.1:{port}&scheme=http", "r")
    local = Store(str(tmp_path), "r")
    orders = []
    for store in (remote, local):
        make_version(store, rows_per_shard=8)
        src = open_versions(store, [store.newest("m1")])
        assert len(src.units) == 18  # 72 rows in 9 shards of 8, each a train and a test row group: read one by one
        plan, feed, batches = _epoch(src, "neighbor_pose", buffer=16)
        orders.append(np.concatenate([_ids(b) for b in batches]))
        assert feed.max_rows_held < len(src)
    np.testing.assert_array_equal(orders[0], orders[1])
