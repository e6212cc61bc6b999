"""Run benchmark suites: ``python -m benchmarks.run --suite attention [--quick] [--out DIR]``."""

from __future__ import annotations

import argparse
import importlib

from .common import header, write_results

SUITES = ("attention", "kernels", "tuning", "flash_kernel", "decode", "kvcache", "sage", "zoo", "quantization", "flex", "ring")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite", default="all", choices=SUITES + ("all",))
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--out", default=None, help="directory for <suite>.md and PNG plots")
    args = parser.parse_args(argv)
    print(header())
    for suite in SUITES if args.suite == "all" else (args.suite,):
        module = importlib.import_module(f"benchmarks.{suite}")
        tables = module.run(quick=args.quick)
        for table in tables:
            print(table.markdown())
        if args.out:
            print(f"wrote {write_results(suite, tables, args.out)}")


if __name__ == "__main__":
    main()
