"""The isostack command line (also `python -m pipeline`).

Each command exits 0 on success; on failure it prints one paragraph naming the
cause and the fix and exits non-zero. Heavy imports (torch, Ray) happen inside
the commands that need them, so `validate` and friends answer quickly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline.errors import ConfigError, IsostackError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="a YAML file or a preset name (default: norb-synthetic)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.epochs=3 --set stack.m2.train.lr=1e-4")
    p.add_argument("--store", default=None, help="store root URI (local path, s3://, gs://); overrides store.uri")


def _add_run_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run id (under --store) or the path/URI of the run's folder")
    p.add_argument("--store", default=None, help="store root the run lives under (default ./isostack-runs)")


DESCRIPTION = ("Train a deep network as a stack of gradient-isolated modules, one Ray actor per module, through a "
               "versioned activation store. `isostack COMMAND --help` describes each command.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isostack", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"isostack {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="validate, ingest, train every module on its own Ray actor, evaluate and export")
    _add_config_args(p)
    p.add_argument("--run-id", default=None, help="name of the run's folder (default: <name>-<timestamp>)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a new local instance)")
    p.add_argument("--no-final-stage", action="store_true", help="stop after training (evaluate/export later)")

    p = sub.add_parser("validate", help="build the plan and report every problem of a config at once")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = sub.add_parser("plan", help="capacity planner: store bytes, bandwidth and recompute FLOPs per module boundary")
    _add_config_args(p)
    p.add_argument("--samples", type=int, default=None, help="samples per version (default: the dataset's, where known)")
    p.add_argument("--throughput", type=float, default=1000.0, help="training throughput, samples/s (default 1000)")
    p.add_argument("--json", action="store_true", help="print the boundaries as JSON")

    p = sub.add_parser("ingest", help="write the dataset into the store as the input stage")
    _add_config_args(p)
    p.add_argument("--run-id", default=None, help="run folder to ingest into")

    p = sub.add_parser("status", help="each module's state, versions, lineage and staleness")
    _add_run_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("retrain", help="re-train one module from its upstream's final version")
    _add_run_arg(p)
    p.add_argument("--module", required=True, help="name of the module to re-train")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override keys of this module (stack.NAME.*) or train.* for the retrain")
    p.add_argument("--address", default=None, help="Ray address")

    p = sub.add_parser("resume", help="continue an interrupted run from the store")
    _add_run_arg(p)
    p.add_argument("--address", default=None, help="Ray address")

    for name, text in (("evaluate", "re-run the final stage's classifiers and pose metrics"),
                       ("export", "re-write embeddings, pose exports, plots, report and the composed model")):
        p = sub.add_parser(name, help=text)
        _add_run_arg(p)

    p = sub.add_parser("embed", help="embed new images with a run's composed encoder")
    _add_run_arg(p)
    p.add_argument("input", help="a .npy of images (N, H, W) / (N, C, H, W) or an image folder")
    p.add_argument("--out", default=None, help="output Parquet file (default: <input stem>.embeddings.parquet)")

    p = sub.add_parser("verify", help="check every committed version's checksums; list orphan files")
    _add_run_arg(p)

    p = sub.add_parser("gc", help="delete orphan files (uncommitted versions, temp files) and apply retention")
    _add_run_arg(p)

    _add_listing_commands(sub)
    return parser


def _add_listing_commands(sub) -> None:
    p = sub.add_parser("runs", help="list the runs in a store: status, modules, headline accuracy, time")
    p.add_argument("--store", default=None, help="store root (default: ISOSTACK_STORE or ./isostack-runs)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("presets", help="list the packaged presets")
    sub.add_parser("schema", help="print the config's JSON Schema")


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("isostack")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # a mistyped flag: the command's own usage, not the top-level one
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    handler = globals()[f"cmd_{args.command}"]
    try:
        return handler(args) or 0
    except IsostackError as exc:
        print(f"isostack {args.command}: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"isostack {args.command}: interrupted; checkpoints and committed versions are kept "
              "(continue with `isostack resume RUN`)", file=sys.stderr)
        return 130


# ---------------------------------------------------------------- commands


def cmd_presets(args) -> int:
    from pipeline.planning.config import DEFAULT_PRESET, preset_description, preset_names

    for name in preset_names():
        mark = " (default)" if name == DEFAULT_PRESET else ""
        print(f"{name:<16}{preset_description(name)}{mark}")
    return 0


def cmd_schema(args) -> int:
    from schemas.config import RunConfig

    print(json.dumps(RunConfig.model_json_schema(), indent=2))
    return 0


def cmd_validate(args) -> int:
    from pipeline.planning.config import load_config
    from pipeline.planning.capacity import describe
    from pipeline.planning.plan import build_plan

    cfg = load_config(args.config, args.overrides, args.store)
    plan = build_plan(cfg)
    print(plan.model_dump_json(indent=2) if args.json else describe(plan, cfg))
    return 0


def cmd_plan(args) -> int:
    import dataclasses

    from pipeline.planning.capacity import capacity, format_capacity, plan_for_capacity
    from pipeline.planning.config import load_config

    cfg = load_config(args.config, args.overrides, args.store)
    plan = plan_for_capacity(cfg)
    samples = args.samples if args.samples is not None else plan.rows
    if not samples or samples < 1 or args.throughput <= 0:
        raise ConfigError([("--samples" if not samples or samples < 1 else "--throughput",
                            f"dataset {plan.dataset!r} has no size known before loading" if samples is None
                            else "must be positive")], "pass --samples N (N >= 1) and --throughput IMG_PER_S (> 0)")
    rows = capacity(cfg, plan, samples, args.throughput)
    if args.json:
        print(json.dumps([{**dataclasses.asdict(b), "shape": list(b.shape)} for b in rows], indent=2))
    else:
        print(format_capacity(rows, samples, args.throughput, stream=cfg.schedule.publish == "stream"))
    return 0


def cmd_ingest(args) -> int:
    from pipeline.planning.config import load_config
    from pipeline.run.driver import prepare_run

    cfg = load_config(args.config, args.overrides, args.store)
    store, _, manifest = prepare_run(cfg, args.run_id)
    print(f"ingested {manifest.rows} samples {manifest.splits} as input/v{manifest.version:04d} in {store.root_uri}")
    return 0


def cmd_run(args) -> int:
    from pipeline.planning.config import load_config
    from pipeline.run.driver import run

    cfg = load_config(args.config, args.overrides, args.store)
    return run(cfg, run_id=args.run_id, address=args.address, final_stage=not args.no_final_stage)


def cmd_status(args) -> int:
    from pipeline.run.driver import status_report
    from pipeline.store.runs import open_run

    store, info = open_run(args.run, args.store)
    report = status_report(store, info)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"run {info['run_id']}: {report['status']}  ({store.root_uri})")
        for name, m in report["modules"].items():
            stale = "  STALE" if m["stale"] else ""
            print(f"  {name:<10}{m['state']:<18}versions {m['versions']}  final v{m['final_version'] or '-'}"
                  f"  upstream {m['upstream_version'] or '-'}  node {m.get('node') or '-'}  device {m.get('device') or '-'}{stale}")
    return 0


def cmd_runs(args) -> int:
    from pipeline.store.runs import list_runs

    rows = list_runs(args.store)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no runs under {args.store or os.environ.get('ISOSTACK_STORE', './isostack-runs')}")
        return 0
    print(f"{'run':<28}{'status':<10}{'modules':<24}{'accuracy':>9}  {'created':<31}updated")
    for r in rows:
        acc = "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.1%}"
        print(f"{r['run_id']:<28}{r['status'] or '-':<10}{','.join(r['modules']):<24}{acc:>9}  "
              f"{r['created_at'] or '-':<31}{r['updated_at'] or '-'}")
    return 0


def cmd_retrain(args) -> int:
    from pipeline.run.driver import retrain

    return retrain(args.run, args.module, store_uri=args.store, overrides=args.overrides, address=args.address)


def cmd_resume(args) -> int:
    from pipeline.run.driver import resume

    return resume(args.run, store_uri=args.store, address=args.address)


def cmd_evaluate(args) -> int:
    from pipeline.run.final_stage import evaluate_run

    return evaluate_run(args.run, store_uri=args.store)


def cmd_export(args) -> int:
    from pipeline.run.final_stage import export_run

    return export_run(args.run, store_uri=args.store)


def cmd_embed(args) -> int:
    from pipeline.run.final_stage import embed_command

    return embed_command(args.run, args.input, out=args.out, store_uri=args.store)


def cmd_verify(args) -> int:
    from pipeline.store.runs import open_run

    store, _ = open_run(args.run, args.store)
    problems, leftovers = store.verify(), store.orphans()
    for p in problems:
        print(p)
    for rel in leftovers:
        print(f"leftover {rel} (uncommitted, no manifest lists it; `isostack gc {args.run}` removes it)")
    if problems:
        print(f"{len(problems)} damaged item(s) in {store.root_uri}", file=sys.stderr)
        return 1
    print(f"ok: every committed version of {store.root_uri} matches its manifest"
          + (f"; {len(leftovers)} leftover(s), not damage" if leftovers else "; no leftovers"))
    return 0


def cmd_gc(args) -> int:
    from pipeline.run.driver import collect_garbage
    from pipeline.store.runs import open_run, run_config

    store, info = open_run(args.run, args.store)
    removed, dropped = collect_garbage(store, run_config(info))
    print(f"removed {len(removed)} orphan path(s); retention dropped {dropped or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
