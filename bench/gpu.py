"""`python -m bench.gpu [NAME ...] [--smoke] [--md PATH] [--json PATH]`: the GPU benchmarks.

Writes one markdown report (bench.report's format, with the GPU, CUDA, driver and Triton
versions in its header, ready to paste into bench/results.md) and one JSON file with every
timing and error. `--smoke` runs tiny shapes on whatever device there is (the CPU in CI).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # before torch is imported
    import torch

    from bench import device as dev
    from bench import gpu_fp8, gpu_moe, machine, report

    modules = {gpu_fp8.NAME: gpu_fp8, gpu_moe.NAME: gpu_moe}
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(modules)})")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU")
    parser.add_argument("--md", type=Path, help="markdown report (default: stdout only)")
    parser.add_argument("--json", type=Path, help="every number, as JSON")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in modules]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {list(modules)}")

    device = dev.default_device()
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device here; --smoke runs tiny shapes on the CPU")
    raw, results = {}, []
    for name in args.names or modules:
        module = modules[name]
        start = time.perf_counter()
        raw[name] = module.measure(device, module.SMOKE if args.smoke else module.FULL)
        raw[name]["wall_s"] = time.perf_counter() - start
        results.append(module.result(raw[name]))
        print(f"{name}: {raw[name]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    header = {**machine.describe(), **dev.describe(device),
              "shapes": "smoke (tiny)" if args.smoke else "full"}
    text = report.markdown(header, results)
    if args.md:
        args.md.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"machine": header, **raw}, indent=1))
    print(text)
    del torch
    return 0


if __name__ == "__main__":
    sys.exit(main())
