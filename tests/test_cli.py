"""The CLI's quick commands, in-process: presets, schema, validate and its errors."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from pipeline.planning.config import preset_names

NEEDS_PATH = {"smallnorb", "stl10-gim"}


def test_presets_lists_default(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "norb-synthetic" in out and "(default)" in out and "stl10-gim" in out


def test_schema_is_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "stack" in schema["properties"] and "dataset" in schema["properties"]
    assert schema["$defs"]["TrainConfig"]["properties"]["epochs"]["description"]


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_validates(preset, tmp_path, capsys):
    args = ["validate", preset]
    if preset in NEEDS_PATH:
        args += ["--set", f"dataset.path={tmp_path}"]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "module" in out and "params" in out


def test_validate_prints_shapes_and_bytes(capsys):
    assert main(["validate", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    m1 = plan["modules"][0]
    assert m1["in_shape"] == [1, 32, 32] and m1["out_shape"][0] == 64 and m1["bytes_per_version"] > 0
    assert [m["upstream"] for m in plan["modules"]] == ["input", "m1"]


@pytest.mark.parametrize("args, words", [
    (["validate", "--set", "train.epoch=3"], ["train.epoch", "did you mean 'epochs'"]),
    (["validate", "--set", "train.epochs=three"], ["train.epochs", "valid integer"]),
    (["validate", "nope-preset"], ["unknown preset 'nope-preset'"]),
    (["validate", "--set", "stack.m7.train.lr=1"], ["no module 'm7'"]),
    (["validate", "--set", "stack.m2.layers.1.kernel=40"], ["stack.m2.layers[1]", "input to m2 is (64, 8, 8)"]),
    (["validate", "digits", "--set", "stack.m1.objective.pairing=same_instance"],
     ["stack.m1.objective.pairing", "'same_instance' needs instance, which dataset 'digits' lacks"]),
    (["validate", "digits", "--set", "stack.m2.objective.pairing=augment"], ["only the first module"]),
    (["validate", "--set", "stack.m1.objective.kind=sfa", "--set", "stack.m1.objective.projection_dim=200"],
     ["stack.m1.train.batch_size", "must exceed the output width (200)"]),
    (["validate", "smallnorb"], ["dataset.path", "needs dataset.path"]),
    (["validate", "smallnorb", "--set", "dataset.path=/no/such/dir"], ["'/no/such/dir' is not a directory"]),
    (["validate", "digits", "--set", "dataset.split=lighting"], ["dataset.split", "lacks"]),
    (["validate", "--set", "resources.gpus_per_module=2"], ["resources.gpus_per_module"]),
])
def test_bad_input_exits_nonzero_naming_cause(args, words, capsys):
    if "resources.gpus_per_module=2" in args:
        import torch

        if torch.cuda.device_count() >= 6:
            pytest.skip("this machine has enough GPUs")
    assert main(args) != 0
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err
    assert "fix:" in err


def test_all_problems_at_once(capsys):
    code = main(["validate", "digits", "--set", "stack.m1.objective.pairing=same_instance",
                 "--set", "stack.m2.layers.1.kernel=40"])
    err = capsys.readouterr().err
    assert code != 0 and "stack.m1.objective.pairing" in err and "stack.m2.layers[1]" in err


def test_status_of_missing_run(tmp_path, capsys):
    assert main(["status", "nosuchrun", "--store", str(tmp_path)]) != 0
    assert "no run 'nosuchrun'" in capsys.readouterr().err


# ---------------------------------------------------------------- a conventional terminal


def test_version_and_help_read_as_plain_text(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"isostack {version('isostack')}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "runs" in text and "COMMAND" in text


def test_a_mistyped_flag_shows_the_command_s_own_usage(capsys):
    with pytest.raises(SystemExit) as done:
        main(["validate", "digits", "--sett", "train.epochs=1"])
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert err.startswith("usage: isostack validate") and "unrecognized arguments: --sett" in err


@pytest.mark.ray
@pytest.mark.own_ray  # the terminal of a run that starts its own Ray (its INFO lines dropped)
@pytest.mark.slow
def test_runs_lists_a_finished_and_a_failed_run(tmp_path):
    import os
    import subprocess
    import sys

    store = tmp_path / "store"
    small = ["--set", "train.epochs=2", "--set", "stack.m1.layers.0.channels=4", "--set", "stack.m2.layers.0.channels=4",
             "--set", "dataset.max_per_split=60", "--set", "export.plots=false", "--set", "export.report=false",
             "--set", "export.model=false", "--set", "evaluate.baselines=false", "--store", str(store)]
    env = {**os.environ, "ISOSTACK_FAULTS": "nan_loss:m2:2", "ISOSTACK_FAULTS_DIR": str(tmp_path / "faults")}
    runs = {"good": {**os.environ}, "bad": env}
    for run_id, run_env in runs.items():
        proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "digits", *small, "--run-id", run_id],
                              capture_output=True, text=True, env=run_env, timeout=300)
        assert (proc.returncode == 0) == (run_id == "good"), proc.stderr[-3000:]
        if run_id == "good":  # a normal run's terminal: no third-party warnings, no Ray INFO lines
            assert "Warning" not in proc.stderr and "INFO" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    listing = subprocess.run([sys.executable, "-m", "pipeline", "runs", "--store", str(store)],
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    lines = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:]}
    assert lines["good"][1:3] == ["finished", "m1,m2"] and lines["good"][3].endswith("%")
    assert lines["bad"][1:4] == ["failed", "m1,m2", "-"]
    rows = {r["run_id"]: r for r in json.loads(subprocess.run(
        [sys.executable, "-m", "pipeline", "runs", "--store", str(store), "--json"],
        capture_output=True, text=True, timeout=60).stdout)}
    assert 0 <= rows["good"]["test_accuracy"] <= 1 and "nan" in rows["bad"]["cause"]
