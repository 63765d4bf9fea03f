"""`python -m bench [NAME ...] [--smoke] [--threads N]`: runs benchmarks (all by default),
CPU and GPU alike; stores each result as `results/<name>.json` and regenerates
`results.md` from every stored result. `--list` names them."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    # Before torch is imported: no compilation on this path.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch

    from bench import runner
    from bench.registry import BENCHMARKS, listing

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes and few repetitions, to check the code runs; GPU "
                             "benchmarks run on the CPU where there is no GPU")
    # One thread by default: steps this small are dominated by per-op overhead, and the
    # numbers stay steadier when other work shares the machine.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path,
                        help="folder of results/ and results.md (default: bench/, or "
                             "bench/smoke/ with --smoke)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing; regenerate results.md from the JSON files "
                             "(e.g. after copying in a GPU run's)")
    args = parser.parse_args(argv)
    if args.list:
        print(listing())
        return 0
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}")
    out = args.out or runner.default_out(args.smoke)
    if args.report_only:
        print(f"regenerated {runner.regenerate(out)}")
        return 0

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        outcomes = runner.run(args.names or list(BENCHMARKS), args.smoke, out)
    finally:  # callers in this process (tests) keep their setting
        torch.set_num_threads(threads)
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
