"""FP8 linear layers: all three GEMMs with block-scaled E4M3 operands, as DeepSeek-V3.

    Fprop   y  = x  @ W^T    x: 1x128 tiles (per token)     W: 128x128 blocks
    Dgrad   dx = dy @ W      dy: 1x128 tiles (per token)    W: 128x128 blocks
    Wgrad   dW = dy^T @ x    dy, x: 128x1 tiles (128 tokens of one channel)

The layer input is kept for backward in FP8 with its 1x128 scales, not in the training
dtype: about half the bytes for BF16 training. Wgrad needs x tiled along tokens, so the
cached x is dequantized and quantized again along the other axis (as DeepSeek's kernels
transpose the cache). Products accumulate in FP32; outputs come back in x's dtype.

`FP8ColumnParallelLinear` and `FP8RowParallelLinear` are Megatron's linear layers with
only their GEMM function replaced; tensor/sequence-parallel communication is Megatron's.
"""

from __future__ import annotations

from functools import partial

import torch

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from plugins.fp8 import backends
from plugins.fp8.quantize import dequantize, quantize

ACTIVATION, WEIGHT, ALONG_TOKENS = (1, 128), (128, 128), (128, 1)


class FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, backend: str) -> torch.Tensor:
        gemm = backends.BACKENDS[backend]
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])                                  # [tokens, in]
        xq = backends.Operand(*quantize(x2d, ACTIVATION), ACTIVATION)
        wq = backends.Operand(*quantize(weight, WEIGHT), WEIGHT)
        y = gemm(xq, wq)                                                # [tokens, out] fp32
        ctx.save_for_backward(xq.q, xq.scales, weight)                 # the FP8 cache
        ctx.backend, ctx.shape = backend, shape
        return y.to(x.dtype).view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xq, x_scales, weight = ctx.saved_tensors
        gemm = backends.BACKENDS[ctx.backend]
        dy2d = dy.reshape(-1, dy.shape[-1])                             # [tokens, out]
        # Dgrad: dx = dy @ W, contracting over `out`: W^T is [in, out] in 128x128 blocks.
        dyq = backends.Operand(*quantize(dy2d, ACTIVATION), ACTIVATION)
        wtq = backends.Operand(*quantize(weight.t().contiguous(), WEIGHT), WEIGHT)
        dx = gemm(dyq, wtq).to(dy.dtype).view(ctx.shape)
        # Wgrad: dW = dy^T @ x, contracting over tokens: both tiled along tokens.
        x = dequantize(xq, x_scales, ACTIVATION)
        dy_t = backends.Operand(*quantize(dy2d.t().contiguous(), ACTIVATION), ACTIVATION)
        x_t = backends.Operand(*quantize(x.t().contiguous(), ACTIVATION), ACTIVATION)
        dw = gemm(dy_t, x_t).to(weight.dtype)                           # [out, in]
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, backend: str = "emulated") -> torch.Tensor:
    return FP8Linear.apply(x, weight, backend)


def _fp8_forward_impl(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                      sequence_parallel, *, backend: str, tp_group=None, **unused):
    """Megatron's `linear_with_grad_accumulation_and_async_allreduce` contract with the
    GEMMs in FP8: all-gather the input under sequence parallelism, all-reduce its
    gradient under plain TP (both through Megatron's own mappings)."""
    if gradient_accumulation_fusion:
        raise ValueError("--plugins fp8 needs --no-gradient-accumulation-fusion (the fused "
                         "wgrad kernel would bypass the FP8 Wgrad GEMM)")
    if sequence_parallel:
        input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True,
                                                     group=tp_group)
    elif allreduce_dgrad:
        input = copy_to_tensor_model_parallel_region(input, group=tp_group)
    output = fp8_linear(input, weight, backend)
    return output if bias is None else output + bias


class FP8ColumnParallelLinear(ColumnParallelLinear):
    def __init__(self, *args, fp8_backend: str = "emulated", **kwargs):
        super().__init__(*args, **kwargs)
        self._forward_impl = partial(_fp8_forward_impl, backend=fp8_backend)


class FP8RowParallelLinear(RowParallelLinear):
    def __init__(self, *args, fp8_backend: str = "emulated", **kwargs):
        super().__init__(*args, **kwargs)
        self._forward_impl = partial(_fp8_forward_impl, backend=fp8_backend)
