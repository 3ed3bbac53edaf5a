"""Loading configs: YAML files, packaged presets and ``--set key=value`` overrides.

Imports no Ray and no torch, so every config error is found before anything
heavy starts. Every problem becomes one entry of a ``ConfigError`` naming its
key path.
"""

from __future__ import annotations

import difflib
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.errors import ConfigError
from schemas import config as schema
from schemas.config import RunConfig

DEFAULT_PRESET = "norb-synthetic"

# Tags of the discriminated unions: pydantic puts them into error locations
# (stack.m1.layers.0.conv.channels); users never write them.


def _union_tags(*unions: Any) -> frozenset[str]:
    """Every tag value of the discriminated unions (layer `type`, objective `kind`), read from the schema itself,
    so a new layer or objective needs no edit here."""
    tags: set[str] = set()
    for union in unions:
        for member in typing.get_args(typing.get_args(union)[0]):
            field = member.model_fields.get("type") or member.model_fields.get("kind")
            tags.update(typing.get_args(field.annotation))
    return frozenset(tags)


# pydantic puts the tag of a discriminated union's member into an error's location
# (stack.m1.objective.moco.temperature); a `--set` path has no such step, so it is dropped.
_UNION_TAGS = _union_tags(schema.Layer, schema.Objective)


def preset_names() -> list[str]:
    """Names of the packaged presets (the YAML files in pipeline/presets)."""
    folder = resources.files("pipeline") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    return (resources.files("pipeline") / "presets" / f"{name}.yaml").read_text()


def preset_description(name: str) -> str:
    """The first comment line of a preset, shown by `isostack presets`."""
    for line in preset_text(name).splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def read_source(source: str | None) -> tuple[dict[str, Any], str]:
    """The raw mapping of a YAML file or preset name, and a label for messages."""
    source = source or DEFAULT_PRESET
    path = Path(source)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise ConfigError([("", f"config file {source!r} does not exist")],
                              fix="pass an existing YAML file, or a preset name from `isostack presets`")
        text, label = path.read_text(), str(path)
    elif source in preset_names():
        text, label = preset_text(source), f"preset {source!r}"
    else:
        close = difflib.get_close_matches(source, preset_names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError([("", f"unknown preset {source!r}{hint}; presets: {', '.join(preset_names())}")],
                          fix="pass a preset name from `isostack presets` or a path to a YAML file")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([("", f"{label} is not valid YAML: {exc}")], fix=f"fix the YAML syntax in {label}") from None
    if not isinstance(raw, dict):
        raise ConfigError([("", f"{label} must be a mapping of keys, found {type(raw).__name__}")])
    return raw, label


def load_config(source: str | None = None, overrides: list[str] = (), store: str | None = None) -> RunConfig:
    """Read a preset or YAML file, apply ``--set`` overrides and validate.

    All problems (of the file and of every override) are reported together.
    """
    raw, label = read_source(source)
    return overridden_config(raw, overrides, store=store,
                             fix=f"edit {label} or the --set values at the key paths above; "
                                 "`isostack schema` prints every key with its type")


def overridden_config(raw: dict[str, Any], overrides: list[str], *, fix: str = "", store: str | None = None,
                      problems: list[tuple[str, str]] = ()) -> RunConfig:
    """The one path from a raw config mapping and ``--set`` items to a validated RunConfig (run, retrain).

    ``store`` replaces ``store.uri``; ``problems`` are the caller's own, reported with every problem of the
    overrides and of the result in one ConfigError.
    """
    problems = list(problems)
    for item in overrides:
        problems += apply_override(raw, item)
    if store is not None:
        raw.setdefault("store", {})["uri"] = store
    config = None
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems += validation_problems(exc)
    if problems:
        raise ConfigError(_dedupe(problems), fix=fix)
    return config


def apply_override(raw: dict[str, Any], item: str) -> list[tuple[str, str]]:
    """Apply one ``key.path=value`` to the raw mapping; return problems (empty when fine).

    The key must exist in the schema (a module must exist in the stack); the
    value is parsed as YAML (``3`` is an int, ``[1, 2]`` a list) and its type is
    checked when the whole config is validated.
    """
    if "=" not in item:
        return [(item, "an override must look like key.path=value (e.g. train.epochs=3)")]
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    problem = _check_path(parts, raw)
    if problem:
        return [(key, problem)]
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node[int(part)] if isinstance(node, list) else node.get(part)
        if child is None:
            child = {}
            node[part] = child
        node = child
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
        if last in ("kind", "type"):
            _prune_to_member(node, last, value)
    return []


def _prune_to_member(node: dict[str, Any], tag: str, value: Any) -> None:
    """Switching a union member (objective.kind=sfa) drops the keys only the old member had."""
    for model in vars(schema).values():
        if isinstance(model, type) and issubclass(model, BaseModel) and tag in model.model_fields:
            if value in typing.get_args(model.model_fields[tag].annotation):
                for key in [k for k in node if k not in model.model_fields]:
                    del node[key]
                return


def _check_path(parts: list[str], raw: Any, model: Any = RunConfig, prefix: list[str] = ()) -> str | None:
    """Why ``parts`` is not a key the schema has, or None when it is."""
    node: Any = raw
    for depth, part in enumerate(parts):
        where = ".".join([*prefix, *parts[:depth]]) or "the top level"
        if isinstance(model, type) and issubclass(model, BaseModel):
            fields = model.model_fields
            if part not in fields:
                close = difflib.get_close_matches(part, list(fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                return f"no key {part!r} under {where}{hint}; keys there: {', '.join(fields)}"
            model = fields[part].annotation
            node = node.get(part) if isinstance(node, dict) else None
            continue
        origin = getattr(model, "__origin__", None)
        args = getattr(model, "__args__", ())
        if origin is dict:
            if not isinstance(node, dict) or part not in node:
                names = ", ".join(node) if isinstance(node, dict) else "none"
                return f"no module {part!r} in the stack; modules: {names}"
            model, node = args[1], node[part]
            continue
        if origin is list:
            if not part.isdigit() or not isinstance(node, list) or int(part) >= len(node):
                size = len(node) if isinstance(node, list) else 0
                return f"{part!r} is not an index of {where} (it has {size} entries)"
            model, node = args[0], node[int(part)]
            model = _resolve_union(model, node)
            continue
        model = _resolve_union(model, node)
        if isinstance(model, type) and issubclass(model, BaseModel):
            return _check_path(parts[depth:], node if node is not None else {}, model, [*prefix, *parts[:depth]])
        return f"{where} is a plain value; it has no key {part!r}"
    return None


def _resolve_union(model: Any, node: Any) -> Any:
    """The member of a (discriminated) union that ``node`` selects."""
    args = typing.get_args(model)
    if typing.get_origin(model) is typing.Annotated:
        return _resolve_union(args[0], node)
    members = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    if not members:
        return model
    for member in members:
        for tag_field in ("type", "kind"):
            field = member.model_fields.get(tag_field)
            if field is None or not isinstance(node, dict):
                continue
            allowed = typing.get_args(field.annotation)
            if node.get(tag_field, field.default) in allowed:
                return member
    return members[0]


def validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """Turn pydantic's errors into (key.path, message) pairs."""
    problems = []
    for err in exc.errors():
        loc = list(err["loc"])
        clean = [str(p) for i, p in enumerate(loc)
                 if not (p in _UNION_TAGS and i > 0 and (isinstance(loc[i - 1], int) or loc[i - 1] == "objective"))]
        path = ".".join(clean)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?); `isostack schema` lists the keys allowed here"
        elif "input" in err and err["type"] not in {"missing", "union_tag_invalid"} and "credentials" not in msg:
            msg = f"{msg}, found {err['input']!r}"
        problems.append((path, msg))
    return problems


def _dedupe(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen, out = set(), []
    for p in problems:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
