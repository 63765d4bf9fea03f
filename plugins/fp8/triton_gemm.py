"""Block-scaled FP8 GEMM as a Triton kernel: C = A @ B^T.

Each program computes a BLOCK_M x BLOCK_N tile of C. It walks K in chunks of 128 (the
scale granularity): one FP8 x FP8 tensor-core product per chunk accumulated in FP32,
multiplied by the chunk's scales (A: one per row, 1x128; B: one per row or per 128 rows,
1x128 or 128x128) and added to an FP32 accumulator. Scaling each 128-wide partial sum
in FP32 is DeepSeek-V3's promotion of partial sums, so nothing accumulates at the tensor
cores' limited precision over the whole of K.

On a GPU it needs FP8 tensor cores (sm89/sm90); `TRITON_INTERPRET=1` runs the same
kernel on the CPU (slowly), which is how the tests check it against the emulated backend.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK_K = 128


@triton.jit
def _block_scaled_gemm(a, b, c, a_scales, b_scales, M, N, K, a_scale_stride, b_scale_stride,
                       B_ROWS_PER_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)      # of A and C
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)      # rows of B, cols of C
    ks = tl.arange(0, BLOCK_K)
    in_rows, in_cols = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for chunk in range(0, tl.cdiv(K, BLOCK_K)):
        k = chunk * BLOCK_K + ks
        a_tile = tl.load(a + rows[:, None] * K + k[None, :], mask=in_rows[:, None], other=0.0)
        b_tile = tl.load(b + cols[:, None] * K + k[None, :], mask=in_cols[:, None], other=0.0)
        partial = tl.dot(a_tile, tl.trans(b_tile), out_dtype=tl.float32)   # [BM, BN]
        sa = tl.load(a_scales + rows * a_scale_stride + chunk, mask=in_rows, other=0.0)
        sb = tl.load(b_scales + (cols // B_ROWS_PER_SCALE) * b_scale_stride + chunk,
                     mask=in_cols, other=0.0)
        acc += partial * sa[:, None] * sb[None, :]
    tl.store(c + rows[:, None] * N + cols[None, :], acc, mask=in_rows[:, None] & in_cols[None, :])


def available() -> str | None:
    """None when the kernel can run here, else why not."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (TRITON_INTERPRET=1 runs it on the CPU, for tests)"
    if torch.cuda.get_device_capability() < (8, 9):
        return "FP8 tensor cores need sm89 or newer"
    return None


def triton_gemm(a, b) -> torch.Tensor:
    """a, b: `backends.Operand`s; a in 1x128 tiles, b in 1x128 tiles or 128x128 blocks."""
    if a.block != (1, BLOCK_K) or b.block not in ((1, BLOCK_K), (BLOCK_K, BLOCK_K)):
        raise ValueError(f"triton FP8 GEMM takes A in 1x128 tiles and B in 1x128 or 128x128; "
                         f"got {a.block} and {b.block}")
    (M, K), N = a.q.shape, b.q.shape[0]
    c = torch.empty(M, N, dtype=torch.float32, device=a.q.device)
    block_m, block_n = 64, 128
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _block_scaled_gemm[grid](
        a.q.contiguous(), b.q.contiguous(), c, a.scales.contiguous(), b.scales.contiguous(),
        M, N, K, a.scales.shape[1], b.scales.shape[1],
        B_ROWS_PER_SCALE=b.block[0], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K)
    return c
