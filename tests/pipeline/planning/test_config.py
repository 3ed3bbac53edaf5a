"""Configs: presets load, overrides address the keys of DESIGN.md, bad input names its key path."""

from __future__ import annotations

import pytest

from pipeline.planning.config import DEFAULT_PRESET, apply_override, load_config, preset_names
from pipeline.errors import ConfigError
from schemas.config import RunConfig


def test_every_preset_loads():
    names = preset_names()
    assert DEFAULT_PRESET in names
    assert {"norb-synthetic", "digits", "pose", "smallnorb", "stl10-gim"} <= set(names)
    for name in names:
        assert isinstance(load_config(name), RunConfig)


def test_default_is_used_without_argument():
    assert load_config(None).name == load_config(DEFAULT_PRESET).name


@pytest.mark.parametrize("item, check", [
    ("train.epochs=7", lambda c: c.train.epochs == 7),
    ("train.lr=1e-4", lambda c: c.train.lr == 1e-4),
    ("train.batch_size=16", lambda c: c.train.batch_size == 16),
    ("dataset.kind=digits", lambda c: c.dataset.kind == "digits"),
    ("dataset.path=/data/norb", lambda c: c.dataset.path == "/data/norb"),
    ("dataset.image_size=48", lambda c: c.dataset.image_size == 48),
    ("dataset.categories=[0,2]", lambda c: c.dataset.categories == [0, 2]),
    ("dataset.instances=[4,0]", lambda c: c.dataset.instances == [4, 0]),
    ("dataset.split=lighting", lambda c: c.dataset.split == "lighting"),
    ("schedule.mode=sequential", lambda c: c.schedule.mode == "sequential"),
    ("schedule.publish_every=2", lambda c: c.schedule.publish_every == 2),
    ("schedule.publish_fraction=0.5", lambda c: c.schedule.publish_fraction == 0.5),
    ("resources.gpus_per_module=0.5", lambda c: c.resources.gpus_per_module == 0.5),
    ("resources.cpus_per_module=2", lambda c: c.resources.cpus_per_module == 2),
    ("stack.m2.train.epochs=3", lambda c: c.module_train("m2").epochs == 3 and c.module_train("m1").epochs != 3),
    ("stack.m1.objective.temperature=0.5", lambda c: c.stack["m1"].objective.temperature == 0.5),
    ("stack.m1.layers.0.channels=8", lambda c: c.stack["m1"].layers[0].channels == 8),
])
def test_overrides_address_design_keys(item, check):
    assert check(load_config(DEFAULT_PRESET, [item]))


@pytest.mark.parametrize("items, path, words", [
    (["train.epoch=3"], "train.epoch", "did you mean 'epochs'"),
    (["stack.m9.train.epochs=3"], "stack.m9.train.epochs", "no module 'm9'"),
    (["train.epochs=abc"], "train.epochs", "valid integer"),
    (["schedule.mode=fast"], "schedule.mode", "'async' or 'sequential'"),
    (["dataset.kind=mnist"], "dataset.kind", "synthetic_norb"),
    (["stack.m1.layers.9.channels=3"], "stack.m1.layers.9.channels", "not an index"),
    (["trainepochs"], "trainepochs", "key.path=value"),
    (["stack.m1.normalize.kernel=23.0"], "stack.m1.normalize.kernel", "a fraction of the image's side between 0 and 1"),
    (["stack.m1.normalize.kernel=1"], "stack.m1.normalize.kernel", "at least 3 pixels"),
])
def test_bad_overrides_name_the_key(items, path, words):
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT_PRESET, items)
    assert path in err.value.message and words in err.value.message


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT_PRESET, ["train.epoch=3", "train.lr=-1", "stack.m1.layers.0.channels=x"])
    paths = [p for p, _ in err.value.problems]
    assert "train.epoch" in paths and "train.lr" in paths and "stack.m1.layers.0.channels" in paths


def test_misspelt_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stack:\n  m1:\n    layers: [{type: conv, channels: 4}]\n    objectiv: {kind: sfa}\ntrian: {epochs: 1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    paths = [p for p, _ in err.value.problems]
    assert "stack.m1.objectiv" in paths and "trian" in paths


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="unknown preset 'norb-synth'.*did you mean 'norb-synthetic'"):
        load_config("norb-synth")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/config.yaml")


def test_override_leaves_other_keys():
    raw = {"train": {"epochs": 1}}
    assert apply_override(raw, "train.lr=0.1") == []
    assert raw == {"train": {"epochs": 1, "lr": 0.1}}


def test_errors_pickle_across_processes():
    import pickle

    err = ConfigError([("train.lr", "must be > 0")], fix="set it")
    back = pickle.loads(pickle.dumps(err))
    assert back.problems == err.problems and back.fix == "set it" and "train.lr" in str(back)


# ---------------------------------------------------------------- the new objectives in the plan


@pytest.mark.parametrize("kind, extra", [
    ("cpc_ar", {"context": "masked_conv"}), ("dim", {"estimator": "jsd"}), ("moco", {"momentum": 0.9}),
    ("autoencoder", {"hidden": 8}), ("aet", {"rotation": 30.0}),
])
def test_new_objectives_are_configurable_and_plan(kind, extra):
    from pipeline.planning.plan import build_plan

    sets = [f"stack.m1.objective.kind={kind}"] + [f"stack.m1.objective.{k}={v}" for k, v in extra.items()]
    cfg = load_config(DEFAULT_PRESET, sets)
    assert cfg.stack["m1"].objective.kind == kind
    assert build_plan(cfg, check_paths=False).modules[0].objective == kind
    schema = RunConfig.model_json_schema()
    for name, model in schema["$defs"].items():  # a description on every field of every objective
        if model.get("properties", {}).get("kind", {}).get("const") == kind:
            assert all("description" in p for f, p in model["properties"].items() if f != "kind"), name


@pytest.mark.parametrize("sets, path, words", [
    (["stack.m2.objective.kind=aet"], "stack.m2.objective.kind", "only the first module"),
    (["stack.m2.objective.kind=dim"], "stack.m2.objective.kind", "no locations"),
    (["stack.m2.objective.kind=cpc_ar"], "stack.m2.objective.kind", "vector"),
    (["stack.m1.objective.kind=cpc_ar", "stack.m1.objective.context=masked_conv", "stack.m1.objective.bptt_steps=2"],
     "stack.m1.objective.bptt_steps", "gru"),
    (["stack.m1.objective.kind=moco", "stack.m1.objective.pairing=patch_grid"], "stack.m1.objective.pairing",
     "needs sample pairs"),
    (["stack.m2.objective.kind=moco", "stack.m2.objective.pairing=augment"], "stack.m2.objective.pairing",
     "only the first module"),
    (["stack.m2.objective.pair_views=true"], "stack.m2.objective.pair_views", "only the first module"),
    (["stack.m1.objective.kind=supervised_local"], "stack.m1.objective.pair_views", "no partner rows"),
    (["stack.m1.objective.kind=autoencoder", "stack.m1.layers.3.type=global_pool", "dataset.image_size=64",
      "stack.m1.objective.hidden=20000"], "stack.m1.objective.hidden", "lower objective.hidden"),
])
def test_new_objectives_validate_in_the_plan(sets, path, words):
    from pipeline.planning.plan import build_plan

    with pytest.raises(ConfigError) as err:
        build_plan(load_config(DEFAULT_PRESET, sets), check_paths=False)
    assert any(p == path and words in m for p, m in err.value.problems), err.value.message


@pytest.mark.parametrize("kind, field, bad", [
    ("moco", "temperature", "-1"), ("dim", "max_locations", "0"), ("cpc_ar", "steps", "0"), ("vinfonce", "kl_weight", "-2"),
])
def test_a_bad_value_of_any_objective_is_reported_at_a_path_set_can_address(kind, field, bad):
    path = f"stack.m1.objective.{field}"
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT_PRESET, [f"stack.m1.objective.kind={kind}", f"{path}={bad}"])
    assert path in [p for p, _ in err.value.problems], err.value.message
    # The reported path is one `--set` accepts: fixing it there loads.
    fixed = load_config(DEFAULT_PRESET, [f"stack.m1.objective.kind={kind}", f"{path}=1"])
    assert fixed.stack["m1"].objective.kind == kind
