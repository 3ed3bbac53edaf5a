"""isostack on real Ray clusters on this machine (127.0.0.1 only).

- a head started here with `ray start --head` and token authentication (a token of its own, in the
  environment: ~/.ray is not touched) and without the venv on its PATH, a tiny run submitted through
  deploy/submit.sh from a shell that has no venv on its PATH either, and the hints it prints run as printed;
- a 3-node `ray.cluster_utils.Cluster`: placement spread puts each module on its own node, pack on one.

Each test stops exactly the Ray processes it started: the process it launched (`ray start --block`, or
the one holding the Cluster), which takes its nodes down with it, then anything still running from that
cluster's own temp dir. `ray stop` is never used: it stops every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import TINY_NORB, split_default_config

pytestmark = [pytest.mark.ray, pytest.mark.own_ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: every socket stays bound until all are picked (one at a time, the kernel may hand
    out a port just released again: two of a head's components got the same one)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"  # a fresh shell's PATH: no venv in it


def loopback_env(**extra: str) -> dict[str, str]:
    """Environment of the Ray processes and clients the tests start (token authentication off unless given)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") and not k.startswith("RAY_AUTH_")}
    env.update({
        "RAY_AUTH_MODE": "disabled",
        # Ray rewrites 127.0.0.1 in an address to the machine's outward IP, where a head bound to loopback
        # does not listen; its single-machine mode (this flag off) keeps every address on 127.0.0.1.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        **extra,
    })
    return env


def short_temp_dir(prefix: str) -> str:
    # Ray puts Unix sockets under its temp dir: the path must stay short (108 bytes in all).
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def stop_processes_under(temp_dir: str, grace_s: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process whose command line names ``temp_dir``, and their descendants."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs[int(entry.name)] = (ppid, cmdline)
    mine = {pid for pid, (_, cmd) in procs.items() if temp_dir in cmd and pid != os.getpid()}
    grew = True
    while grew:  # worker processes rename themselves (ray::IDLE): find them as children
        more = {pid for pid, (ppid, _) in procs.items() if ppid in mine} - mine
        mine |= more
        grew = bool(more)
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0.0)):
        for pid in mine:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in mine):
            time.sleep(0.2)
    return sorted(mine)


# ---------------------------------------------------------------- a head started with `ray start --head`


@pytest.fixture
def ray_head():
    temp = short_temp_dir("isohead")
    token = secrets.token_hex(32)
    # As `.venv/bin/ray start --head` from a shell where the venv is not activated: nothing of it on PATH.
    # TMPDIR: the dashboard's module processes make multiprocessing folders (/tmp/pymp-*) that outlive them when
    # they are killed; in here they go with the rest of this head.
    env = loopback_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=SYSTEM_PATH, TMPDIR=temp)
    names = ("port", "ray-client-server-port", "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
    dashboard, *numbers = free_ports(1 + len(names))
    ports = dict(zip(names, numbers))
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=4", f"--temp-dir={temp}",
           f"--object-store-memory={100 * MIB}", "--disable-usage-stats",
           *(f"--{name}={port}" for name, port in ports.items())]
    log = open(os.path.join(temp, "ray-start.log"), "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start --head exited {head.returncode}:\n{Path(log.name).read_text()[-3000:]}")
            try:
                request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
                urllib.request.urlopen(request, timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the head's dashboard did not answer at {url} in 120 s")
                time.sleep(0.5)
        yield SimpleNamespace(dashboard=url, gcs=f"127.0.0.1:{ports['port']}", env=env, temp=temp, token=token)
    finally:
        # `ray start --block` shuts its own head down on SIGTERM; then whatever is left of this head only.
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        left = stop_processes_under(temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        assert head.poll() is not None and not [p for p in left if Path(f"/proc/{p}").exists()]


def test_submit_script_runs_a_job_on_a_head_started_here(ray_head, tmp_path):
    # Without the token the head turns the client away.
    ray_cli = str(Path(sys.executable).parent / "ray")
    refused = subprocess.run([ray_cli, "job", "list", "--address", ray_head.dashboard], capture_output=True, text=True,
                             env=loopback_env(), timeout=120)
    assert refused.returncode != 0 and "AuthenticationError" in refused.stderr

    # A client elsewhere, venv not activated: the token in a file (as `ray get-auth-token` prints it on the head),
    # nothing in its env, only the path of its `ray`.
    token_file = tmp_path / "token"
    token_file.write_text(ray_head.token)
    store = tmp_path / "store"
    client_env = loopback_env(PATH=SYSTEM_PATH, RAY_BIN=ray_cli)
    proc = subprocess.run(
        [str(ROOT / "deploy" / "submit.sh"), "--address", ray_head.dashboard, "--token-file", str(token_file),
         "digits", "--store", str(store), "--run-id", "job", "--set", "train.epochs=1",
         "--set", "stack.m1.layers.0.channels=8", "--set", "stack.m2.layers.0.channels=8"],
        env=client_env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    job_id = re.search(r"isostack: job (\S+) ->", proc.stdout).group(1)

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head.dashboard, headers={"Authorization": f"Bearer {ray_head.token}"})
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
    summary = json.loads((store / "job" / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert list(summary["modules"]) == ["m1", "m2"]
    for name, module in summary["modules"].items():
        assert module["final_version"] and module["node"], (name, module)
    assert "nearest_centroid" in summary["evaluation"]

    # The printed hints, pasted into a fresh shell (no venv, no token in the env), reach the secured head.
    hints = dict(re.findall(r"^isostack: (follow with|list jobs): +(.+)$", proc.stdout, flags=re.M))
    assert set(hints) == {"follow with", "list jobs"}, proc.stdout
    shell_env = loopback_env(PATH=SYSTEM_PATH)
    shell_env.pop("RAY_AUTH_MODE")
    listed = subprocess.run(["bash", "-c", hints["list jobs"]], env=shell_env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and job_id in listed.stdout, listed.stderr[-3000:]
    logs = subprocess.run(["bash", "-c", hints["follow with"]], env=shell_env, capture_output=True, text=True, timeout=120)
    assert logs.returncode == 0 and "isostack" in logs.stdout and "not found" not in logs.stdout, logs.stderr[-3000:]


# ---------------------------------------------------------------- three nodes


# The cluster lives in a process of its own, so its Ray state (internal KV, address file) never mixes
# with a Ray this pytest process may have initialised for other tests.
_THREE_NODES = """
import json, os, sys
from ray.cluster_utils import Cluster

node_args = json.loads(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
for _ in range(2):
    cluster.add_node(**node_args)
cluster.wait_for_nodes()
print(json.dumps({"address": cluster.address, "nodes": [n.node_id for n in cluster.list_all_nodes()]}), flush=True)
os.dup2(2, 1)  # nothing reads the pipe from here on
sys.stdin.read()  # until the test closes stdin
cluster.shutdown()
"""


@pytest.fixture
def three_nodes():
    """A head and two more nodes, 3 logical CPUs each: room for the whole 3-module stack on any one node."""
    temp = short_temp_dir("isonodes")
    # RAY_TMPDIR: Ray's files and its "current cluster" address file stay in here, so a plain ray.init()
    # elsewhere on the machine never finds (and joins) this cluster.
    env = loopback_env(RAY_TMPDIR=temp, RAY_prestart_worker_first_driver="0")  # no idle workers on 2 cores
    node_args = dict(num_cpus=3, object_store_memory=80 * MIB, node_ip_address="127.0.0.1")
    log = open(os.path.join(temp, "cluster.log"), "w")
    proc = subprocess.Popen([sys.executable, "-c", _THREE_NODES, json.dumps(node_args)], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("{"):
            proc.wait(timeout=30)
            pytest.fail(f"the 3-node cluster did not start:\n{Path(log.name).read_text()[-3000:]}")
        yield SimpleNamespace(**json.loads(line))
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        stop_processes_under(temp)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _three_module_config(tmp_path: Path) -> Path:
    """The tiny default preset's layers in three modules of one CPU each (three_nodes: 3 CPUs a node, so pack
    fits the whole stack on one)."""
    tiny = TINY_NORB + ["train.epochs=1", "schedule.poll_seconds=0.1", "stack.m3.layers.3.features=16",
                        "resources.cpus_per_module=1"] + \
        [f"stack.m{i}.layers.0.channels=8" for i in (1, 2, 3)]
    return split_default_config(tmp_path / "three.yaml", tiny)


def _placed(cluster, config: Path, store: Path, run_id: str, placement: str) -> dict[str, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(config), "--store", str(store), "--run-id", run_id,
         "--address", cluster.address, "--no-final-stage", "--set", f"resources.placement={placement}"],
        env=loopback_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    from pipeline.run.driver import status_report
    from pipeline.store.runs import open_run

    report = status_report(*open_run(run_id, str(store)))
    assert [m["state"] for m in report["modules"].values()] == ["final"] * 3
    return report["modules"]


def test_spread_places_each_module_on_its_own_node_and_pack_on_one(three_nodes, tmp_path):
    config = _three_module_config(tmp_path)
    cluster_nodes = {node_id[:8] for node_id in three_nodes.nodes}

    spread = _placed(three_nodes, config, tmp_path / "store", "spread", "spread")
    nodes = {name: m["node"].rsplit(":", 1)[-1] for name, m in spread.items()}
    assert len(set(nodes.values())) == 3 and set(nodes.values()) == cluster_nodes, spread
    assert all(m["device"] == "cpu" for m in spread.values())

    # One placement group, PACK: all three bundles fit on one node, so they share it.
    packed = _placed(three_nodes, config, tmp_path / "store", "pack", "pack")
    assert len({m["node"] for m in packed.values()}) == 1, packed
