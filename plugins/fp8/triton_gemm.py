"""Block-scaled FP8 GEMM as a Triton kernel: C = A @ B^T.

Each program computes a BLOCK_M x BLOCK_N tile of C. It walks K in chunks of 128 (the
scale granularity): one FP8 x FP8 tensor-core product per chunk accumulated in FP32,
multiplied by the chunk's scales (A: one per row, 1x128; B: one per row or per 128 rows,
1x128 or 128x128) and added to an FP32 accumulator. Scaling each 128-wide partial sum
in FP32 is DeepSeek-V3's promotion of partial sums, so nothing accumulates at the tensor
cores' limited precision over the whole of K.

Tile shape, warps and pipeline stages are autotuned on the GPU (`CONFIGS`, sized for H100),
once per (N, K's power-of-two bucket, B's scale block); programs run in grouped order, so
neighbours share A and B rows in L2.

On a GPU it needs FP8 tensor cores (sm89/sm90); `TRITON_INTERPRET=1` runs the same
kernel on the CPU (slowly), with `INTERPRETER_CONFIG` alone and no benchmarking, which is
how the tests check it against the emulated backend.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

BLOCK_K = 128  # the scale granularity along K: not tunable


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int,
            group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "GROUP_M": group_m},
                         num_warps=num_warps, num_stages=num_stages)


# Hopper candidates (BLOCK_M, BLOCK_N, num_warps, num_stages), starting points not yet
# timed on a GPU. How they are sized:
# - Shared memory: each pipeline stage holds an FP8 A tile and B tile, (BLOCK_M + BLOCK_N)
#   x 128 bytes: 24 KiB at 64x128, 48 KiB at 128x256. All fit the 227 KiB a block may use
#   on H100 (4 x 48 KiB = 192 KiB is the largest); `_fitting` drops those over a smaller
#   GPU's (sm89: 99 KiB) before anything is compiled.
# - Registers: the loop holds two FP32 tiles, the chunk's product and the running sum, so
#   one warpgroup (4 warps) holding 128x128 or 64x256 would need 256 registers per thread
#   for them alone: those tiles get 8 warps. 128x256 needs 256 even with 8 warps and may
#   spill: one config of it, for the tuner to weigh against its better operand reuse.
CONFIGS = tuple(_config(*c) for c in (
    (64, 128, 4, 3), (64, 128, 4, 4),
    (128, 128, 8, 3), (128, 128, 8, 4),
    (64, 256, 8, 3), (64, 256, 8, 4),
    (128, 256, 8, 3),
))
# The interpreter cannot benchmark: one fixed config. GROUP_M 2 so that the tests' few tile
# rows still make several groups, the last one short (GROUP_M changes only the order).
INTERPRETER_CONFIG = _config(64, 128, num_warps=4, num_stages=3, group_m=2)


def _shared_bytes(config: triton.Config) -> int:
    """Shared memory of the software pipeline, at most: per stage the A and B tiles (FP8)
    and their float32 scales."""
    rows = config.kwargs["BLOCK_M"] + config.kwargs["BLOCK_N"]
    return config.num_stages * rows * (BLOCK_K + 4)


def _fitting_configs(configs, limit: int) -> list[triton.Config]:
    """The configs within `limit` bytes of shared memory; if none, the smallest (whose
    launch then fails naming the shortfall)."""
    fitting = [c for c in configs if _shared_bytes(c) <= limit]
    return fitting or [min(configs, key=_shared_bytes)]


def _fitting(configs, named_args, **kwargs) -> list[triton.Config]:
    """The autotuner's early prune: drops what cannot fit this device's shared memory per
    block (the bound Triton's launcher checks), so it is never compiled. The autotuner
    would also skip such a config (its OutOfResources times as inf), after compiling it."""
    device = named_args["c"].device.index
    limit = triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"]
    return _fitting_configs(configs, limit)


@triton.jit
def _block_scaled_gemm(a, b, c, a_scales, b_scales, M, N, K, a_scale_stride, a_scale_stride_k,
                       b_scale_stride, b_scale_stride_k, K_BUCKET,
                       B_ROWS_PER_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       ACCUMULATE: tl.constexpr = False):
    # a_scales [M, K / 128] and b_scales (one row per B_ROWS_PER_SCALE rows of B) are read
    # through their strides (row, K-block): outer-dim-major or row-major alike.
    # K_BUCKET is unused here: it is part of the autotuning key (see `_tuned_gemm`).
    # ACCUMULATE: C += A @ B^T into C's FP32 values (Wgrad into Megatron's main_grad), in
    # the epilogue: no product tensor written and read back.
    # Grouped order over the 1-D grid: consecutive programs take GROUP_M tile rows and go
    # down them one tile column at a time, so the programs running together share A rows
    # and B rows in L2 instead of each streaming its own.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_tile_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tl.cdiv(M, BLOCK_M) - first_tile_m, GROUP_M)  # last may be short
    tile_m = first_tile_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)      # of A and C
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)      # rows of B, cols of C
    ks = tl.arange(0, BLOCK_K)
    in_rows, in_cols = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for chunk in range(0, tl.cdiv(K, BLOCK_K)):
        k = chunk * BLOCK_K + ks
        a_tile = tl.load(a + rows[:, None] * K + k[None, :], mask=in_rows[:, None], other=0.0)
        b_tile = tl.load(b + cols[:, None] * K + k[None, :], mask=in_cols[:, None], other=0.0)
        partial = tl.dot(a_tile, tl.trans(b_tile), out_dtype=tl.float32)   # [BM, BN]
        sa = tl.load(a_scales + rows * a_scale_stride + chunk * a_scale_stride_k,
                     mask=in_rows, other=0.0)
        sb = tl.load(b_scales + (cols // B_ROWS_PER_SCALE) * b_scale_stride
                     + chunk * b_scale_stride_k, mask=in_cols, other=0.0)
        acc += partial * sa[:, None] * sb[None, :]
    in_c = in_rows[:, None] & in_cols[None, :]
    if ACCUMULATE:
        acc += tl.load(c + rows[:, None] * N + cols[None, :], mask=in_c, other=0.0)
    tl.store(c + rows[:, None] * N + cols[None, :], acc, mask=in_c)


# Tuned once per key. M (tokens) is not in it: MoE experts get a different token count on
# almost every call, and re-tuning for each would stall training; the best tile depends
# mostly on N and K. Wgrad's K is a token count too (dW = dy^T x), so K enters as its
# power-of-two bucket. (The autotuner also keys on the tensors' dtypes.)
_tuned_gemm = triton.autotune(
    configs=[INTERPRETER_CONFIG] if isinstance(_block_scaled_gemm, InterpretedFunction)
    else list(CONFIGS),
    key=["N", "K_BUCKET", "B_ROWS_PER_SCALE"],
    prune_configs_by={"early_config_prune": _fitting},
)(_block_scaled_gemm)


def available() -> str | None:
    """None when the kernel can run here, else why not."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (TRITON_INTERPRET=1 runs it on the CPU, for tests)"
    if torch.cuda.get_device_capability() < (8, 9):
        return "FP8 tensor cores need sm89 or newer"
    return None


def _launch(kernel, a, b, accumulate_into: torch.Tensor | None = None, **meta) -> torch.Tensor:
    """C = A @ B^T by `kernel`: `_tuned_gemm`, or `_block_scaled_gemm` with `meta` naming
    BLOCK_M, BLOCK_N and GROUP_M (how the tests run each GPU config interpreted). With
    `accumulate_into` (FP32 [M, N], contiguous) C is that tensor, and the product is
    added to it."""
    (M, K), N = a.q.shape, b.q.shape[0]
    c = accumulate_into
    if c is None:
        c = torch.empty(M, N, dtype=torch.float32, device=a.q.device)
    elif c.shape != (M, N) or c.dtype != torch.float32 or not c.is_contiguous():
        raise ValueError(f"triton FP8 GEMM accumulates into a contiguous float32 [{M}, {N}]; "
                         f"got {c.dtype} {tuple(c.shape)}")

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    # The scales as they are laid out (the fused quantizers write 1x128 scales
    # outer-dim-major for cuBLAS): read through their strides, not copied.
    kernel[grid](
        a.q.contiguous(), b.q.contiguous(), c, a.scales, b.scales,
        M, N, K, *a.scales.stride(), *b.scales.stride(), triton.next_power_of_2(K),
        B_ROWS_PER_SCALE=b.block[0], BLOCK_K=BLOCK_K, ACCUMULATE=accumulate_into is not None,
        **meta)
    return c


def triton_gemm(a, b, accumulate_into: torch.Tensor | None = None) -> torch.Tensor:
    """a, b: `backends.Operand`s; a in 1x128 tiles, b in 1x128 tiles or 128x128 blocks.
    `accumulate_into`: a float32 [m, n] tensor the product is added to (and returned).

    The first call for a new (N, K bucket, B block) on a GPU autotunes: it compiles and
    times every config that fits (seconds), so a benchmark's warm-up must include it."""
    if a.block != (1, BLOCK_K) or b.block not in ((1, BLOCK_K), (BLOCK_K, BLOCK_K)):
        raise ValueError(f"triton FP8 GEMM takes A in 1x128 tiles and B in 1x128 or 128x128; "
                         f"got {a.block} and {b.block}")
    return _launch(_tuned_gemm, a, b, accumulate_into)


def tuned_config() -> str:
    """The config the latest `triton_gemm` call ran with (the autotuner's choice)."""
    config = _tuned_gemm.best_config
    return (f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}, "
            f"GROUP_M {config.kwargs['GROUP_M']}, {config.num_warps} warps, "
            f"{config.num_stages} stages")
