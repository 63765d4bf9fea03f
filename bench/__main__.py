"""`python -m bench [NAME ...] [--out bench/results.md]`: runs benchmarks, writes a table."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    # Before torch is imported (bench.registry imports it): no compilation on this path.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch

    from bench import machine, report
    from bench.registry import BENCHMARKS

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results.md")
    # One thread by default: steps this small are dominated by per-op overhead, and the
    # numbers stay steadier when other work shares the machine.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}")

    torch.set_num_threads(args.threads)
    results = [BENCHMARKS[name]() for name in args.names or BENCHMARKS]
    text = report.markdown(machine.describe(), results)
    args.out.write_text(text)
    print(text)
    print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
