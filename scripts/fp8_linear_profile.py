"""Where an FP8 linear's time goes on a GPU: `python scripts/fp8_linear_profile.py [N K ...]`.

For each weight [N, K] (default DeepSeek-V3's [7168, 2048] and [7168, 16384]) and 4096 bf16
tokens, one forward + backward of `fp8_linear` (`torch` backend) against BF16 `F.linear`:
- GPU time per call (CUDA events) and host time to queue it;
- the same without the inf/NaN checks' host sync (`linear._check_operands` off), which
  tells a host-bound call (host time = GPU time) from a GPU-bound one;
- torch.profiler's kernels by GPU time, and cProfile's host functions by own time.
This is how bench/gpu-runs.md's 2026-11-26 (second session) profile was taken.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from plugins.fp8 import linear
from plugins.fp8.linear import fp8_linear

TOKENS, CALLS = 4096, 20


def fp8(x, w):
    return fp8_linear(x, w, "torch")


def step(fn, x, w, dy) -> None:
    torch.autograd.grad(fn(x, w), (x, w), dy)


def timed(fn, x, w, dy) -> tuple[float, float]:
    """(GPU ms, host ms) per call, over CALLS calls after warm-up."""
    for _ in range(3):
        step(fn, x, w, dy)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    began = time.perf_counter()
    start.record()
    for _ in range(CALLS):
        step(fn, x, w, dy)
    end.record()
    host = (time.perf_counter() - began) * 1e3 / CALLS
    torch.cuda.synchronize()
    return start.elapsed_time(end) / CALLS, host


def main(sizes: list[int]) -> None:
    weights = list(zip(sizes[::2], sizes[1::2])) or [(7168, 2048), (7168, 16384)]
    checks = linear._check_operands
    for n, k in weights:
        x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(TOKENS, n, device="cuda", dtype=torch.bfloat16)
        print(f"== weight [{n}, {k}], {TOKENS} tokens, forward + backward")
        print("BF16 F.linear     GPU %.3f ms, host %.3f ms" % timed(F.linear, x, w, dy))
        print("fp8_linear        GPU %.3f ms, host %.3f ms" % timed(fp8, x, w, dy))
        linear._check_operands = lambda *operands: None
        try:
            print("  without sync    GPU %.3f ms, host %.3f ms" % timed(fp8, x, w, dy))
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step(fp8, x, w, dy)
                torch.cuda.synchronize()
        finally:
            linear._check_operands = checks
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15,
                                        max_name_column_width=60))
        host = cProfile.Profile()
        host.enable()
        for _ in range(CALLS):
            step(fp8, x, w, dy)
        torch.cuda.synchronize()
        host.disable()
        pstats.Stats(host).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]])
