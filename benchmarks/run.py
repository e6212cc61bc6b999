"""Run benchmark suites: ``python -m benchmarks.run --suite attention [--quick] [--out DIR]``.

``--suite all --out benchmarks/results/<device>`` writes the full report: ``<suite>.md`` and its PNG
plots per suite, and ``README.md`` linking them (a suite that fails is named there; the others run).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from .common import header, write_results

SUITES = ("attention", "kernels", "tuning", "flash_kernel", "decode", "kvcache", "sage", "zoo", "quantization", "flex", "ring", "models", "host_overhead")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite", default="all", choices=SUITES + ("all",))
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--out", default=None, help="directory for <suite>.md and PNG plots")
    args = parser.parse_args(argv)
    print(header())
    everything = args.suite == "all"
    outcomes = {}
    for suite in SUITES if everything else (args.suite,):
        try:
            module = importlib.import_module(f"benchmarks.{suite}")
            tables = module.run(quick=args.quick)
        except Exception:  # the report goes on with the next suite and names the failure
            if not everything:
                raise
            outcomes[suite] = "failed: " + traceback.format_exc().strip().splitlines()[-1]
            print(f"suite {suite} {outcomes[suite]}", file=sys.stderr)
            continue
        for table in tables:
            print(table.markdown())
        outcomes[suite] = f"{len(tables)} tables"
        if args.out:
            print(f"wrote {write_results(suite, tables, args.out)}")
    if everything and args.out:
        print(f"wrote {write_index(outcomes, args.out)}")
    if any(o.startswith("failed") for o in outcomes.values()):
        sys.exit(1)


def write_index(outcomes: dict, out_dir: str) -> str:
    """``README.md`` of a full report: device, date, MLX version and a link (or the failure) per suite."""
    lines = ["# Benchmark report", "", header(), "| suite | result |", "|---|---|"]
    for suite, outcome in outcomes.items():
        shown = f"[{suite}]({suite}.md)" if not outcome.startswith("failed") else suite
        lines.append(f"| {shown} | {outcome} |")
    path = os.path.join(out_dir, "README.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    main()
