"""The FP8 linear product: all three GEMMs with block-scaled E4M3 operands, as DeepSeek-V3.

    Fprop   y  = x  @ W^T    x: 1x128 tiles (per token)     W: 128x128 blocks
    Dgrad   dx = dy @ W      dy: 1x128 tiles (per token)    W: 128x128 blocks
    Wgrad   dW = dy^T @ x    dy, x: 128x1 tiles (128 tokens of one channel)

x and dy are each quantized once, both ways from one read (`quantize_with_transposed`):
1x128 tiles along channels for Fprop and Dgrad, and along tokens (x^T, dy^T, tokens
zero-padded to whole tiles) for Wgrad. Backward keeps only x^T in FP8 with its scales, not
x in the training dtype: about half the bytes for BF16 training, and Wgrad's x^T comes from
x itself rather than from a second quantization of x's FP8 copy. An input that arrives in
FP8 (dispatched tokens) is kept as it came and re-tiled along tokens in backward. Products
accumulate in FP32; outputs come back in x's dtype.

Plain torch (no Megatron import): the modules that put it into a model are in
`plugins.fp8.modules`.
"""

from __future__ import annotations

from typing import Callable

import torch

from plugins.common.quantize import (
    quantize_with_transposed,
    raise_if_non_finite,
    requantize_transposed,
)
from plugins.common.wgrad import WgradSink
from plugins.fp8 import backends
from plugins.fp8.weight_cache import WEIGHT, quantize_weight, quantize_weight_transposed

ACTIVATION = (1, 128)


def _quantized_with_transposed(t: torch.Tensor, pad_cols: bool = False
                               ) -> tuple[backends.Operand, backends.Operand]:
    """t [tokens, k] and t^T [k, tokens_p] in 1x128 tiles, from one read of t (tokens_p:
    whole tiles; with pad_cols k too, in t only). Unchecked for inf and NaN (no host sync):
    the caller checks the scales once the GEMMs are queued (`_check_operands`); a bad
    tile's scale is inf meanwhile, so nothing it touches comes out finite."""
    rowwise, transposed = quantize_with_transposed(t, check_finite=False, pad_cols=pad_cols)
    return backends.Operand(*rowwise, ACTIVATION), backends.Operand(*transposed, ACTIVATION)


def _check_operands(*operands: tuple[str, backends.Operand]) -> None:
    """One host sync for all of them; then the error names the operand and its tile."""
    if not operands or bool(torch.stack([torch.isfinite(op.scales).all()
                                         for _, op in operands]).all()):
        return
    for what, op in operands:
        raise_if_non_finite(op.scales, op.block, f"fp8_linear: the {what}")


class FP8Linear(torch.autograd.Function):
    """y = x W^T. Only `in` (every GEMM's or Fprop's reduction dim) must be a multiple of
    128. A ragged `out` (MLA's 576-row kv down-projection) is zero-padded to whole 128x128
    weight blocks, as DeepSeek's checkpoints lay out its scales; a ragged token count
    (an expert's share of a batch) is zero-padded to whole 128-token Wgrad tiles.

    `x_q`, `x_scales`: x already in FP8 with 1x128 tiles (the MoE plugin's FP8 dispatch
    delivers tokens so); Fprop and the backward cache use them as they are. `w_q`,
    `w_scales`: W already in FP8 (`quantize_weight`, as `FP8WeightCache` keeps it), used
    in forward and, transposed, in backward; otherwise W is quantized in each. `w_t`: a
    callable giving W^T in FP8 (`FP8WeightCache.get_transposed`), asked in backward.
    Products come out of the GEMMs in the training dtype (x's for y, dy's for dx, W's for
    dW), rounded once from their FP32 sums.

    Inf or NaN in x or W (forward) or dy (backward) raises ValueError naming the tensor
    and tile. Each direction waits for the GPU once, after its GEMMs are queued, so the
    GPU stays busy while the host waits.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, backend: str,
                x_q: torch.Tensor | None = None, x_scales: torch.Tensor | None = None,
                w_q: torch.Tensor | None = None, w_scales: torch.Tensor | None = None,
                wgrad: WgradSink | None = None,
                w_t: Callable[[], backends.Operand] | None = None):
        gemm = backends.BACKENDS[backend]
        shape, out = x.shape, weight.shape[0]
        checks = []  # what was quantized here; given operands were checked by their makers
        x_t = None  # x^T for Wgrad, when quantized here
        if x_q is None:
            # [tokens, in], [in, tokens_p]
            xq, x_t = _quantized_with_transposed(x.reshape(-1, shape[-1]))
            checks.append(("input x (from the layer before)", xq))
        elif x_q.shape != (x.numel() // shape[-1], shape[-1]):
            raise ValueError(f"fp8_linear: x_fp8 holds {tuple(x_q.shape)}, x is {tuple(shape)}")
        else:
            xq = backends.Operand(x_q, x_scales, ACTIVATION)
        if w_q is None:
            wq = quantize_weight(weight, check_finite=False)                 # [out_p, in]
            checks.append(("weight", wq))
        else:
            wq = backends.Operand(w_q, w_scales, WEIGHT)
        y = gemm(xq, wq, x.dtype)                                            # [tokens, out_p]
        if y.shape[1] != out:  # compact: a layer that saves y must not hold the padding
            y = y[:, :out].contiguous()                                      # [tokens, out]
        _check_operands(*checks)
        # For backward: x^T as Wgrad takes it, or the given FP8 input (re-tiled there); and
        # a given FP8 weight, held anyway.
        kept = x_t if x_t is not None else xq
        ctx.save_for_backward(kept.q, kept.scales, weight, w_q, w_scales)
        ctx.backend, ctx.shape, ctx.wgrad, ctx.w_t = backend, shape, wgrad, w_t
        ctx.x_transposed = x_t is not None
        return y.view(*shape[:-1], out)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_q, x_scales, weight, w_q, w_scales = ctx.saved_tensors
        gemm = backends.BACKENDS[ctx.backend]
        dy2d = dy.reshape(-1, dy.shape[-1])                                  # [tokens, out]
        # Dgrad: dx = dy @ W, contracting over `out`: W^T is [in, out_p] in 128x128 blocks.
        # dy^T for Wgrad from the same read: [out, tokens_p], the token count padded.
        dyq, dy_t = _quantized_with_transposed(dy2d, pad_cols=True)        # [tokens, out_p]
        # 128x128 blocks are square: W^T's blocks are W's transposed, bit for bit. A given
        # FP8 weight with no W^T is transposed byte by byte; else W^T is quantized straight
        # from W (checked in forward).
        if ctx.w_t is not None:
            wtq = ctx.w_t()                                                  # [in, out_p]
        elif w_q is not None:
            wtq = backends.Operand(w_q.t().contiguous(), w_scales.t().contiguous(), WEIGHT)
        else:
            wtq = quantize_weight_transposed(weight, check_finite=False)
        dx = gemm(dyq, wtq, dy.dtype).view(ctx.shape)

        x_transposed = ctx.x_transposed  # x_q, x_scales hold x^T; else x as it was given

        def wgrad() -> torch.Tensor:
            # Wgrad: dW = dy^T @ x, contracting over tokens: both tiled along tokens, the
            # token count zero-padded to whole tiles; a given FP8 x re-tiled from its bytes.
            if x_transposed:
                x_t = backends.Operand(x_q, x_scales, ACTIVATION)             # [in, tokens_p]
            else:
                x_t = backends.Operand(*requantize_transposed(x_q, x_scales, pad_rows=True),
                                       ACTIVATION)                           # [in, tokens_p]
            return gemm(dy_t, x_t, weight.dtype)                             # [out, in]

        dw = None
        if ctx.wgrad is None:
            dw = wgrad()
        else:  # --delay-wgrad-compute: the W runs it; dy is checked now, through dyq
            ctx.wgrad.defer(wgrad)
        _check_operands(("output gradient dy", dyq))
        return dx, dw, None, None, None, None, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, backend: str = "emulated",
               x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
               weight_fp8: backends.Operand | None = None,
               wgrad: WgradSink | None = None,
               weight_fp8_t: Callable[[], backends.Operand] | None = None) -> torch.Tensor:
    """x [..., in] @ weight[out, in]^T with all three GEMMs in FP8. `x_fp8`: (q, scales) of
    x [tokens, in] in 1x128 tiles, when the caller already has x in FP8; `weight_fp8`: the
    weight as `quantize_weight` gives it (from an `FP8WeightCache`); `weight_fp8_t`: a
    callable giving W^T as `quantize_weight_transposed` does (`FP8WeightCache.get_transposed`),
    called in backward; `wgrad`: where to defer the Wgrad GEMM (`plugins.common.wgrad`),
    None to run it in backward."""
    x_q, x_scales = x_fp8 if x_fp8 is not None else (None, None)
    w_q, w_scales = (weight_fp8.q, weight_fp8.scales) if weight_fp8 is not None else (None, None)
    return FP8Linear.apply(x, weight, backend, x_q, x_scales, w_q, w_scales, wgrad,
                           weight_fp8_t)
