"""SwiGLU whose input is kept for backward in FP8 and whose output is recomputed.

DeepSeek-V3 caches the SwiGLU input (the fc1 output, twice the FFN width) in FP8 with
1x128 scales and recomputes the activation in backward. Megatron's unfused SwiGLU keeps
three tensors in the training dtype (the gate half, its SiLU, the linear half): 6 bytes
per FFN channel in BF16, against 2 bytes (plus scales) here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plugins.common.quantize import Quantizer, dequantize, quantize

TILE = (1, 128)


class FP8CachedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, quantizer: Quantizer | None = None) -> torch.Tensor:
        gate, linear = x.chunk(2, dim=-1)                          # [..., F] each
        # Unchecked (no host sync): inf or NaN in x makes the output inf or NaN too, which
        # the next FP8 linear reports; the cache's scale is inf, so backward stays so.
        ctx.save_for_backward(*quantize(x.reshape(-1, x.shape[-1]), TILE, check_finite=False,
                                        quantizer=quantizer))
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return F.silu(gate) * linear

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        q, scales = ctx.saved_tensors
        x = dequantize(q, scales, TILE).view(ctx.shape)
        gate, linear = x.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        d_gate = dy * linear * sig * (1 + gate * (1 - sig))      # d silu(g) / dg
        d_linear = dy * silu
        return torch.cat([d_gate, d_linear], dim=-1).to(ctx.dtype), None


class FP8SwiGLU(torch.nn.Module):
    """Megatron's MLP activation slot (`MLPSubmodules.activation_func`)."""

    def __init__(self, config=None, **unused):
        super().__init__()
        self.quantizer: Quantizer | None = None  # for the device it first sees

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantizer is None or self.quantizer.device != x.device:
            self.quantizer = Quantizer.for_device(x.device)
        return FP8CachedSwiGLU.apply(x, self.quantizer)


class SwiGLU(torch.nn.Module):
    """The activation slot of an MLP kept in the training dtype (`--fp8-exclude-modules`
    naming its fc1 or fc2): silu(gate) * linear, as Megatron's unfused `glu`, autograd
    keeping what it keeps."""

    def __init__(self, config=None, **unused):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, linear = x.chunk(2, dim=-1)
        return F.silu(gate) * linear
