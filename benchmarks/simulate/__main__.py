"""`python -m benchmarks.simulate [--no-measure] [--quick]`: the STL-10 prediction table, and (unless
--no-measure) the check against real small runs here. Writes nothing; ``python -m benchmarks --only simulate``
records the same into benchmarks/results/<machine>.json."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile


def main(argv: list[str] | None = None) -> int:
    from benchmarks.simulate import check, stl10

    p = argparse.ArgumentParser(prog="python -m benchmarks.simulate", description=__doc__.splitlines()[0])
    p.add_argument("--no-measure", action="store_true", help="skip the real runs (no Ray): the STL-10 table only")
    p.add_argument("--quick", action="store_true", help="the check at the smallest size, 2 modules only")
    args = p.parse_args(argv)
    if not args.no_measure:
        with tempfile.TemporaryDirectory(prefix="isostack-sim-") as wd:
            measured = check(wd, args.quick)
        print("| modules | prediction | simulated s | measured s | error |\n|---|---|---:|---:|---:|")
        for key, res in measured.items():
            if key.endswith("_modules"):
                for label, pr in res["predicted"].items():
                    print(f"| {key[0]} | {label} | {pr['span_s']:.2f} | {pr['measured_span_s']:.2f} | "
                          f"{pr['error']:+.1%} |")
        print()
    flops = stl10.module_flops()
    print("forward GFLOP per image:", json.dumps({f["name"]: round(f["forward_flops"] / 1e9, 2) for f in flops}))
    print(stl10.table(stl10.scenarios(flops)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
