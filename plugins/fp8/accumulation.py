"""Emulated limited-precision GEMM accumulation, and DeepSeek-V3's fix for it.

DeepSeek-V3 (section 3.3.2) found that Hopper tensor cores accumulate FP8 products in a
register that keeps only about 14 mantissa bits, far fewer than FP32's 23; over a long
reduction (K = 4096) the rounding of the running sum adds up. Their fix: let the tensor
cores accumulate only 128 elements of K (one scale tile, conveniently) and then add that
partial sum into an FP32 accumulator on the CUDA cores, where the tile scales are applied.

`matmul_limited_accumulation` emulates both: the running sum is rounded to nearest
(ties to even) to `mantissa_bits` explicit mantissa bits after every addition, and with
`promote_every` the limited sum is flushed into a true FP32 accumulator every so many
elements. It is an error model, not a bit-exact model of the hardware (which aligns
products to the largest exponent and truncates); its purpose is the size of the effect.
"""

from __future__ import annotations

import torch


def round_to_mantissa_bits(x: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """Rounds float32 x to `mantissa_bits` explicit mantissa bits (0..23), to nearest, ties
    to even, keeping float32's exponent range.

    Bit manipulation on the int32 view: add half of the dropped range (minus one, plus the
    kept lowest bit, which makes ties go to even) and clear the dropped bits. A carry out of
    the mantissa correctly bumps the exponent (and overflows to inf past float32's max);
    the sign bit is never touched for finite x because sign-magnitude keeps it on top.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"round_to_mantissa_bits: x has dtype {x.dtype}; expected float32")
    if not 0 <= mantissa_bits <= 23:
        raise ValueError(f"round_to_mantissa_bits: mantissa_bits must be in 0..23 "
                         f"(float32 has 23); got {mantissa_bits}")
    drop = 23 - mantissa_bits
    if drop == 0:
        return x
    bits = x.view(torch.int32)
    kept_lsb = (bits >> drop) & 1
    rounded = (bits + (1 << (drop - 1)) - 1 + kept_lsb) & -(1 << drop)
    return rounded.view(torch.float32)


def matmul_limited_accumulation(a: torch.Tensor, b: torch.Tensor, mantissa_bits: int = 14,
                                promote_every: int | None = None) -> torch.Tensor:
    """a [M, K] @ b [K, N] -> [M, N] float32, with the sum along K held in a
    `mantissa_bits` accumulator; with `promote_every` = n, each n-element chunk of K is
    summed there and then added into an FP32 accumulator (n = 128 is DeepSeek-V3's).

    a and b are float32 (typically dequantized FP8 values). Each product is formed in
    FP32 (exact for E4M3 x E4M3 with power-of-two scales) before it is accumulated.
    Loops over K in Python, each step one vector op over [M, N]: fine for tests, not fast.
    """
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        raise TypeError(f"matmul_limited_accumulation: a and b must be float32; got "
                        f"{a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul_limited_accumulation: need a [M, K] and b [K, N]; got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if promote_every is not None and promote_every <= 0:
        raise ValueError(f"matmul_limited_accumulation: promote_every must be a positive "
                         f"int or None; got {promote_every}")
    (m, k), n = a.shape, b.shape[1]
    fp32_sum = a.new_zeros(m, n)  # [M, N], on the CUDA cores
    limited_sum = a.new_zeros(m, n)  # [M, N], in the tensor cores' accumulator
    for i in range(k):
        product = a[:, i, None] * b[None, i, :]  # [M, N]
        limited_sum = round_to_mantissa_bits(limited_sum + product, mantissa_bits)
        if promote_every is not None and (i + 1) % promote_every == 0:
            fp32_sum += limited_sum
            limited_sum = torch.zeros_like(limited_sum)
    return fp32_sum + limited_sum
