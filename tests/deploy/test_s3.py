"""The whole life of a run on an S3 store: run, retrain, final stage against moto's S3 server on 127.0.0.1.

Credentials live only in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); afterwards every
object of the run is downloaded and must not contain them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.own_ray, pytest.mark.slow]

ACCESS_KEY = "AKIAISOSTACKFAKE0001"
SECRET_KEY = "isostack+FAKE/secret0123456789abcdefABCDEF"
BUCKET = "isostack-test"
TINY = ["train.epochs=1", "stack.m1.layers.0.channels=8", "stack.m2.layers.0.channels=8", "dataset.max_per_split=60",
        "export.plots=false", "export.model=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_s3():
    """moto's S3 server on a free loopback port, with one empty bucket; stopped by its pid."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start on {endpoint} (exit {server.poll()})")
                time.sleep(0.2)
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
        client.create_bucket(Bucket=BUCKET)
        yield client, port
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **extra})
    return env


def isostack(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, \
        f"isostack {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def s3_run(moto_s3):
    """run -> status -> retrain m2 -> evaluate, on s3://BUCKET/runs; the endpoint two ways pyarrow reads it."""
    client, port = moto_s3
    store = f"s3://{BUCKET}/runs?endpoint_override=127.0.0.1:{port}&scheme=http"
    env = _env()
    out = {"run": isostack("run", "digits", *[a for s in TINY for a in ("--set", s)], "--store", store,
                           "--run-id", "s3run", env=env)}
    out["status"] = isostack("status", "s3run", "--store", store, "--json", env=env)
    out["retrain"] = isostack("retrain", "s3run", "--module", "m2", "--store", store, env=env)
    # The same store by a plain URI, the endpoint from AWS_ENDPOINT_URL (pyarrow >= 16 reads it).
    out["evaluate"] = isostack("evaluate", "s3run", "--store", f"s3://{BUCKET}/runs",
                               env=_env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}"))
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="runs/s3run/")
            for o in page.get("Contents", [])]
    objects = {k: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}
    return store, out, objects


def test_run_retrain_and_final_stage_on_s3(s3_run):
    store, out, objects = s3_run
    summary = json.loads(objects["runs/s3run/summary.json"])
    assert summary["status"] == "finished"
    assert all(m["final_version"] for m in summary["modules"].values())
    info = json.loads(objects["runs/s3run/run.json"])
    assert info["generations"] == {"m2": 1} and info["config"]["store"]["uri"] == store
    status = json.loads(out["status"].stdout)
    assert [m["state"] for m in status["modules"].values()] == ["final", "final"]
    assert all(m["node"] for m in status["modules"].values())
    # The final stage after the retrain scored m2's new final version.
    assert summary["evaluation"]["source"]["version"] == summary["modules"]["m2"]["final_version"] > 1
    for name in ("report.html", "embeddings.parquet", "metrics/m1.parquet", "metrics/m2.retrain-1.parquet"):
        assert objects.get(f"runs/s3run/{name}"), name


def test_commits_are_manifest_puts_with_no_temp_objects(s3_run, monkeypatch):
    store, _, objects = s3_run
    assert not [k for k in objects if ".tmp" in k or "/." in k]
    for key in [k for k in objects if "/store/" in k and k.endswith(".parquet")]:
        assert f"{key.rsplit('/', 1)[0]}/_MANIFEST.json" in objects, key
    for name, value in _env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    from pipeline.store import Store

    assert Store(store, "s3run", create=False).verify() == []


def test_no_object_of_the_run_holds_the_credentials(s3_run):
    _, _, objects = s3_run
    assert len(objects) > 20
    needles = {ACCESS_KEY, SECRET_KEY, urllib.parse.quote(SECRET_KEY, safe=""), urllib.parse.quote_plus(SECRET_KEY)}
    leaks = {key: [n for n in needles if n.encode() in body] for key, body in objects.items()}
    assert not {k: v for k, v in leaks.items() if v}
