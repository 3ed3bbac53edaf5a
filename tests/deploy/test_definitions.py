"""The deploy files agree with each other and with the CLI: one entrypoint, one image, room for every preset.

Parsed only (PyYAML, text); nothing is started, so this runs in the unit tier.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.planning.config import load_config, preset_names
from pipeline.errors import ConfigError
from pipeline.planning.plan import build_plan
from pipeline.run.scheduler import module_bundle, resolve_gpus

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RAY_VERSION = next(re.fullmatch(r"ray\[default\]==(\S+)", d).group(1)
                   for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
# The image's Python is the one the project is built and tested with (the Makefile's interpreter).
PY_TAG = "py" + re.search(r"PYTHON \?= python(\d)\.(\d+)", (ROOT / "Makefile").read_text()).expand(r"\1\2")
BASE_IMAGE = f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-gpu"
ISOSTACK_IMAGE = f"isostack:{PYPROJECT['project']['version']}-ray{RAY_VERSION}-{PY_TAG}-gpu"


def _yaml(name: str):
    return yaml.safe_load((DEPLOY / name).read_text())


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def _kuberay_specs() -> dict[str, dict]:
    return {"raycluster.yaml": _yaml("kuberay/raycluster.yaml")["spec"],
            "rayjob.yaml": _yaml("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]}


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _submit(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "ISOSTACK_STORE"))}
    proc = subprocess.run([str(DEPLOY / "submit.sh"), *args], capture_output=True, text=True, env=env, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


# ---------------------------------------------------------------- versions and images


def test_the_pinned_ray_is_the_installed_one():
    import ray

    assert ray.__version__ == RAY_VERSION


def test_one_base_image_for_dockerfile_and_cluster_launcher():
    froms = re.findall(r"^FROM\s+(\S+)", _dockerfile(), flags=re.M)
    assert froms == [BASE_IMAGE]
    cluster = _yaml("cluster.yaml")
    assert cluster["docker"]["image"] == BASE_IMAGE
    for key in ("head_image", "worker_image"):
        assert cluster["docker"].get(key, BASE_IMAGE) == BASE_IMAGE
    for node_type in cluster["available_node_types"].values():
        assert node_type.get("docker", {}).get("worker_image", BASE_IMAGE) == BASE_IMAGE


def test_kuberay_runs_the_image_the_dockerfile_builds():
    assert f"-t {ISOSTACK_IMAGE} " in _dockerfile()  # the documented build command tags it
    for name, spec in _kuberay_specs().items():
        assert spec["rayVersion"] == RAY_VERSION, name
        images = {c["image"].rsplit("/", 1)[-1] for c in _containers(spec)}  # a registry prefix may be added
        assert images == {ISOSTACK_IMAGE}, name


def test_dockerfile_installs_every_package_of_the_project():
    text = _dockerfile()
    for package in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        top = package.rstrip("*")
        assert re.search(rf"^COPY\b.*\s{top}/\s", text, flags=re.M), top
    assert re.search(r"pip install .*--no-deps \.", text) and "isostack presets" in text


def test_the_two_kuberay_manifests_describe_the_same_cluster():
    specs = _kuberay_specs()
    assert specs["raycluster.yaml"] == specs["rayjob.yaml"]


# ---------------------------------------------------------------- entrypoint and runtime env


def test_submit_script_runs_isostack_run_with_the_runtime_env():
    out = _submit("--dry-run", "--address", "http://127.0.0.1:8265", "norb-synthetic", "--store", "s3://bucket/runs",
                  "--set", "train.epochs=1").stdout
    argv = shlex.split(out)
    cut = argv.index("--")
    ray_args, entry = argv[:cut], argv[cut + 1:]
    # `ray` from PATH, else the checkout's .venv/bin/ray (no venv needs to be activated)
    assert os.path.basename(ray_args[0]) == "ray" and ray_args[1:3] == ["job", "submit"]
    assert ray_args[ray_args.index("--working-dir") + 1] == "."
    assert ray_args[ray_args.index("--runtime-env") + 1] == "deploy/runtime_env.yaml"
    assert ray_args[ray_args.index("--address") + 1] == "http://127.0.0.1:8265"
    # Not `isostack ...`: the head's PATH may not have it; deploy/job.sh finds the cluster's interpreter.
    assert entry[:4] == ["sh", "deploy/job.sh", "run", "norb-synthetic"]
    args = build_parser().parse_args(entry[2:])
    assert args.store == "s3://bucket/runs" and args.overrides == ["train.epochs=1"] and args.run_id


def test_submit_sends_the_same_job_again_while_a_new_head_has_no_job_agent(tmp_path):
    """A head just started answers "No available agent to submit job" until its job agent is up (Ray 2.60, seen in
    this suite on a loaded machine); the script submits the same job again. Here a stand-in for `ray` gives that
    answer once: the submission is sent twice with the same id and its outcome is the script's."""
    calls = tmp_path / "calls"
    fake = tmp_path / "ray"
    fake.write_text("#!/usr/bin/env bash\n"
                    f"echo \"$*\" >> {calls}\n"
                    f"if [[ $(wc -l < {calls}) -lt 2 ]]; then\n"
                    "  echo 'RuntimeError: Request failed with status code 503: No available agent to submit job, "
                    "please try again later.' >&2; exit 1\nfi\n"
                    "echo \"Job 'x' succeeded\"\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "ISOSTACK_STORE"))}
    proc = subprocess.run([str(DEPLOY / "submit.sh"), "--address", "http://127.0.0.1:1", "--submission-id", "sub-1",
                           "digits", "--store", "/shared/runs"], capture_output=True, text=True, timeout=60,
                          env={**env, "RAY_BIN": str(fake), "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr
    sent = calls.read_text().splitlines()
    assert len(sent) == 2 and sent[0] == sent[1] and "--submission-id sub-1" in sent[0]
    assert "not up yet" in proc.stderr and "SUCCEEDED" in proc.stdout
    # Any other failure is final: one submission, its exit status.
    calls.write_text("x\n" * 5)
    fake.write_text(fake.read_text().replace('echo "Job', "echo 'boom' >&2; exit 3 #"))
    proc = subprocess.run([str(DEPLOY / "submit.sh"), "--address", "http://127.0.0.1:1", "digits", "--store",
                           "/shared/runs"], capture_output=True, text=True, timeout=60,
                          env={**env, "RAY_BIN": str(fake), "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 3 and len(calls.read_text().splitlines()) == 6 and "not up yet" not in proc.stderr


def test_rayjob_entrypoint_is_the_same_command():
    job = _yaml("kuberay/rayjob.yaml")
    entry = shlex.split(job["spec"]["entrypoint"])
    # `python -m pipeline`: the image's interpreter, whatever PATH the pod's shell has (deploy/job.sh does the same)
    assert entry[:4] == ["python", "-m", "pipeline", "run"]
    assert PYPROJECT["project"]["scripts"]["isostack"] == "pipeline.cli:main"
    args = build_parser().parse_args(entry[3:])
    assert "://" in args.store, "a cluster job needs a store every pod reaches"
    build_plan(load_config(args.config, args.overrides, args.store), check_paths=False, local_cluster=False)


def test_runtime_env_is_shared_and_holds_no_credentials():
    env = _yaml("runtime_env.yaml")
    assert set(env) <= {"excludes", "env_vars"}, "working_dir comes from submit.sh (--working-dir .)"
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert {".venv/", ".git/", "isostack-runs/"} <= set(env["excludes"])
    job_env = yaml.safe_load(_yaml("kuberay/rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert job_env["env_vars"] == env["env_vars"]
    secret = re.compile(r"AWS_|GOOGLE_|SECRET|TOKEN|PASSWORD|KEY", re.I)
    assert not [k for e in (env, job_env) for k in e["env_vars"] if secret.search(k)]


def test_rayjob_cleans_up_after_itself():
    spec = _yaml("kuberay/rayjob.yaml")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True


def test_token_authentication_is_on_everywhere():
    cluster = _yaml("cluster.yaml")
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c)
    assert any(dst.endswith("/.ray/auth_token") for dst in cluster["file_mounts"]), "every node needs the token"
    assert "--dashboard-host=127.0.0.1" in " ".join(cluster["head_start_ray_commands"])  # reached by `ray dashboard`
    for name, spec in _kuberay_specs().items():
        assert spec["authOptions"]["mode"] == "token", name


def test_cluster_launcher_installs_this_checkout():
    cluster = _yaml("cluster.yaml")
    mount = next(dst for dst, src in cluster["file_mounts"].items() if src == ".")
    assert any("pip install" in c and mount in c for c in cluster["setup_commands"])


@pytest.mark.parametrize("store", ["runs", "./isostack-runs"])
def test_submit_refuses_a_store_the_cluster_cannot_reach(store):
    proc = _submit("--dry-run", "digits", "--store", store, check=False)
    assert proc.returncode == 2 and "relative path" in proc.stderr
    proc = _submit("--dry-run", "digits", check=False)
    assert proc.returncode == 2 and "--store" in proc.stderr


# ---------------------------------------------------------------- capacity for every preset


def _gpu_groups() -> dict[str, tuple[float, float, int, int]]:
    """(CPUs, GPUs, fewest nodes, most nodes) of every GPU worker type the deploy files define."""
    groups = {}
    cluster = _yaml("cluster.yaml")
    for name, node in cluster["available_node_types"].items():
        res = node.get("resources", {})
        if res.get("GPU", 0) > 0:
            groups[f"cluster.yaml:{name}"] = (res["CPU"], res["GPU"], node["min_workers"],
                                              min(node["max_workers"], cluster["max_workers"]))
    for file, spec in _kuberay_specs().items():
        for group in spec["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            params = group.get("rayStartParams") or {}
            cpus = float(params.get("num-cpus", _k8s_cpu(limits["cpu"])))
            gpus = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
            if gpus > 0:
                groups[f"{file}:{group['groupName']}"] = (cpus, gpus, group["minReplicas"], group["maxReplicas"])
    return groups


def _k8s_cpu(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_every_deploy_file_has_a_gpu_worker_group_that_never_scales_to_zero():
    groups = _gpu_groups()
    assert {k.split(":")[0] for k in groups} == {"cluster.yaml", "raycluster.yaml", "rayjob.yaml"}
    # gpus_per_module 'auto' resolves from the GPUs present when the run starts: none would mean CPU.
    assert all(fewest >= 1 for _, _, fewest, _ in groups.values()), groups


@pytest.mark.parametrize("preset", preset_names())
def test_gpu_workers_can_host_every_module_of_the_preset(preset):
    try:
        cfg = load_config(preset)
        build_plan(cfg, check_paths=False, local_cluster=False)
    except ConfigError as exc:  # presets that read local files need a path, as on a cluster
        assert any(path == "dataset.path" for path, _ in exc.problems), exc.message
        cfg = load_config(preset, [f"dataset.path=/data/{preset}"])
    plan = build_plan(cfg, check_paths=False, local_cluster=False)
    gpus = resolve_gpus(cfg, cluster_gpus=1.0)
    bundle = module_bundle(cfg, gpus)
    at_once = len(plan.modules) if cfg.schedule.mode == "async" else 1
    for group, (cpus, node_gpus, _, nodes) in _gpu_groups().items():
        per_node = min(cpus // bundle["CPU"], node_gpus // bundle["GPU"] if "GPU" in bundle else math.inf)
        assert per_node >= 1, f"{group}: a node ({cpus} CPU, {node_gpus} GPU) cannot host one module of {preset} {bundle}"
        assert per_node * nodes >= at_once, f"{group}: {nodes} nodes host {per_node * nodes} of {preset}'s {at_once} modules"
