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

from dataclasses import dataclass
from typing import Callable

import torch

from plugins.common.quantize import Quantizer, quantize_with_transposed, requantize_transposed
from plugins.common.wgrad import WgradSink
from plugins.fp8 import backends
from plugins.fp8.non_finite import BACKWARD, DY, FPROP, X, EagerChecks, NonFiniteFlags
from plugins.fp8.non_finite import WEIGHT as W
from plugins.fp8.weight_cache import WEIGHT, quantize_weight, quantize_weight_transposed

ACTIVATION = (1, 128)


@dataclass(frozen=True)
class MainGrad:
    """Where Wgrad adds its product under `--gradient-accumulation-fusion`, as Megatron's
    own linear does (tensor_parallel/layers.py, LinearWithGradAccumulationAndAsyncCommunication):
    `into`, FP32 (the parameter's `main_grad`, or one expert's slice of it), and `param`,
    whose `grad_added_to_main_grad` tells Megatron's DDP hook that its gradient is there
    already."""

    into: torch.Tensor
    param: torch.nn.Parameter

    def added(self) -> torch.Tensor | None:
        """What backward returns for the weight once its product is in `into`: Megatron's
        dummy (its values unused: the DDP hook skips a gradient added to main_grad), or
        None where no DDP hook will look."""
        if not hasattr(self.param, "grad_added_to_main_grad"):
            return None
        self.param.grad_added_to_main_grad = True
        if getattr(self.param, "zero_out_wgrad", False):
            return torch.zeros(self.into.shape, dtype=self.param.dtype, device=self.into.device)
        return torch.empty(self.into.shape, dtype=self.param.dtype, device=self.into.device)


def _quantized_with_transposed(t: torch.Tensor, pad_cols: bool = False,
                               quantizer: Quantizer | None = None
                               ) -> tuple[backends.Operand, backends.Operand]:
    """t [tokens, k] and t^T [k, tokens_p] in 1x128 tiles, from one read of t (tokens_p:
    whole tiles; with pad_cols k too, in t only). Unchecked for inf and NaN (no host sync):
    the caller records the scales once the GEMMs are queued (`non_finite`); a bad tile's
    scale is inf meanwhile, so nothing it touches comes out finite."""
    rowwise, transposed = quantize_with_transposed(t, check_finite=False, pad_cols=pad_cols,
                                                   quantizer=quantizer)
    return backends.Operand(*rowwise, ACTIVATION), backends.Operand(*transposed, ACTIVATION)


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

    Inf or NaN in x or W (forward) or dy (backward) goes to `checks`, once the GEMMs are
    queued: `EagerChecks` raises ValueError naming the tensor and tile (a wait on the GPU
    per direction); a module's `NonFiniteFlags` records it on the device, with no wait,
    for the step's check (`plugins.fp8.non_finite`). Given FP8 operands were checked by
    their makers.

    `main_grad`: Wgrad's product goes into `main_grad.into` (FP32) instead of being
    returned (`MainGrad`); a deferred Wgrad (`wgrad`) returns it to the W, which adds it
    there.

    `quantizer`: where x's device quantizes (`plugins.common.quantize.Quantizer`, decided
    once by the module); None decides it per quantization.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, backend: str,
                x_q: torch.Tensor | None = None, x_scales: torch.Tensor | None = None,
                w_q: torch.Tensor | None = None, w_scales: torch.Tensor | None = None,
                wgrad: WgradSink | None = None,
                w_t: Callable[[], backends.Operand] | None = None,
                checks: EagerChecks | NonFiniteFlags | None = None,
                main_grad: MainGrad | None = None, quantizer: Quantizer | None = None):
        gemm = backends.BACKENDS[backend]
        checks = EagerChecks() if checks is None else checks
        shape, out = x.shape, weight.shape[0]
        quantized = []  # what was quantized here, for `checks`
        x_t = None  # x^T for Wgrad, when quantized here
        if x_q is None:
            # [tokens, in], [in, tokens_p]
            xq, x_t = _quantized_with_transposed(x.reshape(-1, shape[-1]), quantizer=quantizer)
            quantized.append((X, xq.scales, xq.block))
        elif x_q.shape != (x.numel() // shape[-1], shape[-1]):
            raise ValueError(f"fp8_linear: x_fp8 holds {tuple(x_q.shape)}, x is {tuple(shape)}")
        else:
            xq = backends.Operand(x_q, x_scales, ACTIVATION)
        if w_q is None:
            wq = quantize_weight(weight, check_finite=False, quantizer=quantizer)  # [out_p, in]
            quantized.append((W, wq.scales, wq.block))
        else:
            wq = backends.Operand(w_q, w_scales, WEIGHT)
        y = gemm(xq, wq, x.dtype)                                            # [tokens, out_p]
        if y.shape[1] != out:  # compact: a layer that saves y must not hold the padding
            y = y[:, :out].contiguous()                                      # [tokens, out]
        checks.record(FPROP, *quantized)
        # For backward: x^T as Wgrad takes it, or the given FP8 input (re-tiled there); and
        # a given FP8 weight, held anyway.
        kept = x_t if x_t is not None else xq
        ctx.save_for_backward(kept.q, kept.scales, weight, w_q, w_scales)
        ctx.backend, ctx.shape, ctx.wgrad, ctx.w_t = backend, shape, wgrad, w_t
        ctx.x_transposed = x_t is not None
        ctx.checks, ctx.main_grad, ctx.quantizer = checks, main_grad, quantizer
        return y.view(*shape[:-1], out)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_q, x_scales, weight, w_q, w_scales = ctx.saved_tensors
        gemm = backends.BACKENDS[ctx.backend]
        dy2d = dy.reshape(-1, dy.shape[-1])                                  # [tokens, out]
        # Dgrad: dx = dy @ W, contracting over `out`: W^T is [in, out_p] in 128x128 blocks.
        # dy^T for Wgrad from the same read: [out, tokens_p], the token count padded.
        quantizer = ctx.quantizer
        dyq, dy_t = _quantized_with_transposed(dy2d, True, quantizer)        # [tokens, out_p]
        # 128x128 blocks are square: W^T's blocks are W's transposed, bit for bit. A given
        # FP8 weight with no W^T is transposed byte by byte; else W^T is quantized straight
        # from W (checked in forward).
        if ctx.w_t is not None:
            wtq = ctx.w_t()                                                  # [in, out_p]
        elif w_q is not None:
            wtq = backends.Operand(w_q.t().contiguous(), w_scales.t().contiguous(), WEIGHT)
        else:
            wtq = quantize_weight_transposed(weight, check_finite=False, quantizer=quantizer)
        dx = gemm(dyq, wtq, dy.dtype).view(ctx.shape)

        x_transposed = ctx.x_transposed  # x_q, x_scales hold x^T; else x as it was given

        def wgrad(into: torch.Tensor | None = None) -> torch.Tensor | None:
            # Wgrad: dW = dy^T @ x, contracting over tokens: both tiled along tokens, the
            # token count zero-padded to whole tiles; a given FP8 x re-tiled from its bytes.
            if x_transposed:
                x_t = backends.Operand(x_q, x_scales, ACTIVATION)             # [in, tokens_p]
            else:
                x_t = backends.Operand(*requantize_transposed(  # [in, tokens_p]
                    x_q, x_scales, pad_rows=True, quantizer=quantizer), ACTIVATION)
            if into is not None:  # added to main_grad in (or right after) the GEMM
                backends.ACCUMULATING[ctx.backend](dy_t, x_t, into)
                return None
            return gemm(dy_t, x_t, weight.dtype)                             # [out, in]

        dw = None
        if ctx.wgrad is not None:  # --delay-wgrad-compute: the W runs it; dy is checked
            ctx.wgrad.defer(wgrad)  # now, through dyq
        elif ctx.main_grad is not None:  # --gradient-accumulation-fusion
            wgrad(ctx.main_grad.into)
            dw = ctx.main_grad.added()
        else:
            dw = wgrad()
        ctx.checks.record(BACKWARD, (DY, dyq.scales, dyq.block))
        return dx, dw, None, None, None, None, None, None, None, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, backend: str = "emulated",
               x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
               weight_fp8: backends.Operand | None = None,
               wgrad: WgradSink | None = None,
               weight_fp8_t: Callable[[], backends.Operand] | None = None,
               non_finite: NonFiniteFlags | None = None,
               main_grad: MainGrad | None = None,
               quantizer: Quantizer | None = None) -> torch.Tensor:
    """x [..., in] @ weight[out, in]^T with all three GEMMs in FP8. `x_fp8`: (q, scales) of
    x [tokens, in] in 1x128 tiles, when the caller already has x in FP8; `weight_fp8`: the
    weight as `quantize_weight` gives it (from an `FP8WeightCache`); `weight_fp8_t`: a
    callable giving W^T as `quantize_weight_transposed` does (`FP8WeightCache.get_transposed`),
    called in backward; `wgrad`: where to defer the Wgrad GEMM (`plugins.common.wgrad`),
    None to run it in backward.

    Inf or NaN in an operand quantized here: with `non_finite` (a module's
    `NonFiniteFlags`), recorded on the device without a wait, for its owner to read once
    per step; without (plain torch), raised at once as ValueError naming the operand and
    tile, at the cost of one wait on the GPU per direction. `main_grad`: add the weight
    gradient into `main_grad.into` (FP32) rather than return it (`MainGrad`,
    `--gradient-accumulation-fusion`). `quantizer`: where x's device quantizes, decided
    once (`plugins.common.quantize.Quantizer`); None decides it per quantization."""
    x_q, x_scales = x_fp8 if x_fp8 is not None else (None, None)
    w_q, w_scales = (weight_fp8.q, weight_fp8.scales) if weight_fp8 is not None else (None, None)
    return FP8Linear.apply(x, weight, backend, x_q, x_scales, w_q, w_scales, wgrad,
                           weight_fp8_t, non_finite, main_grad, quantizer)
