"""`python -m benchmarks [--quick] [--only NAME[,NAME]] [--out DIR]`: run the comparisons, print the table, write JSON.

The JSON goes to ``<out>/<machine>.json`` (``<machine>-quick.json`` with --quick), machine being
``gpu-<name>`` on a CUDA machine and ``cpu-<N>core`` otherwise. With --only, the other comparisons
already in that file are kept, so one comparison can be re-measured alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import re
import socket
import sys
import tempfile
import time
import traceback

from benchmarks import COMPARISONS, cpu_threads

# The schedule simulation (benchmarks/simulate/): real small runs checked against it, then the STL-10 prediction.
# The recipe (benchmarks/recipe.py) trains ResNet-50 modules for tens of minutes: only with --only recipe.
COMPARISONS = [*COMPARISONS, *(n for n in ("simulate", "recipe") if n not in COMPARISONS)]
ON_REQUEST = ("recipe",)


def machine_name() -> str:
    import torch

    if torch.cuda.is_available():
        return "gpu-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return f"cpu-{cpu_threads()}core"


def machine_info() -> dict:
    import torch

    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_threads": cpu_threads(), "processor": platform.processor() or None,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    except OSError:
        pass
    return info


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        a = abs(v)
        return f"{v:.3g}" if a < 10 else f"{v:,.0f}" if a >= 1000 else f"{v:.1f}"
    return str(v)


def table(comparisons: dict) -> str:
    lines = ["| comparison | measure | isostack | baseline | ratio | goal | met | note |",
             "|---|---|---:|---:|---:|---|---|---|"]
    for name in COMPARISONS:
        result = comparisons.get(name)
        if result is None:
            continue
        if "error" in result:
            lines.append(f"| {name} | failed | - | - | - | - | - | {result['error'].splitlines()[-1]} |")
            continue
        for r in result["rows"]:
            met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
            lines.append(f"| {r['comparison']} | {r['measure']} | {_fmt(r['isostack'])} | {_fmt(r['baseline'])} | "
                         f"{ratio} | {r['goal'] or '-'} | {met} | {r['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the smallest sizes (a smoke run of the harness, ~3 min)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(COMPARISONS)}")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"), help="folder for the JSON")
    args = p.parse_args(argv)
    names = [n for n in COMPARISONS if n not in ON_REQUEST] if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in COMPARISONS]
    if unknown:
        p.error(f"unknown comparison(s) {', '.join(unknown)}; choose from {', '.join(COMPARISONS)}")

    os.makedirs(args.out, exist_ok=True)
    machine = machine_name()
    path = os.path.join(args.out, f"{machine}{'-quick' if args.quick else ''}.json")
    previous = {}
    if args.only and os.path.exists(path):
        with open(path) as f:
            previous = json.load(f).get("comparisons", {})
    comparisons = dict(previous)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="isostack-bench-") as workdir:
        for name in names:
            print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                mod = importlib.import_module(f"benchmarks.{name}")
                sub = os.path.join(workdir, name)
                os.makedirs(sub)
                result = mod.run(quick=args.quick, workdir=sub)
                result["rows"] = [r.as_dict() for r in result["rows"]]
            except Exception:  # noqa: BLE001 - one failed comparison must not lose the others' numbers
                result = {"error": traceback.format_exc()}
                print(result["error"], file=sys.stderr)
            result["seconds"] = round(time.perf_counter() - t0, 1)
            result["measured_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            comparisons[name] = result
            print(f"[benchmarks] {name}: {result['seconds']} s", file=sys.stderr, flush=True)
    doc = {"machine": machine, "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "quick": args.quick, "command": "python -m benchmarks" + (" --quick" if args.quick else "")
           + (f" --only {args.only}" if args.only else ""), "seconds": round(time.perf_counter() - t_all, 1),
           "info": machine_info(), "comparisons": comparisons}
    if args.only and os.path.exists(path):
        # Merge at write time too: a comparison another process wrote while these ran is kept, not overwritten.
        with open(path) as f:
            doc["comparisons"] = {**json.load(f).get("comparisons", {}), **{n: comparisons[n] for n in names}}
        comparisons = doc["comparisons"]
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, default=str)
    os.replace(tmp, path)
    print(f"\n{machine} ({doc['info'].get('cpu_model') or doc['info']['platform']}), {doc['timestamp']}, "
          f"{doc['seconds']} s{' (quick)' if args.quick else ''}\n")
    print(table(comparisons))
    print(f"\nwritten: {path}")
    return 1 if any("error" in comparisons[n] for n in names) else 0


if __name__ == "__main__":
    sys.exit(main())
