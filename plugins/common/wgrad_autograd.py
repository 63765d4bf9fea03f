"""Deferring the weight gradient of a product that autograd differentiates by itself
(`F.linear`, `torch._grouped_mm`, a loop of them): the replicated linears and the experts.

`split_backward(sink, product, x, weight)` returns `product(x, weight)` whose backward
computes only x's gradient and leaves weight's to the W. Autograd's own derivative
formulas do both halves: the product runs on detached leaves inside a graph of its own,
B asks that graph for x's gradient only (autograd then skips the weight's GEMM) and keeps
the graph, and the W asks it for the weight's. Same formulas on the same tensors, so
the same bits as the undeferred backward, with nothing recomputed.
"""

from __future__ import annotations

from typing import Callable

import torch

from plugins.common.wgrad import WgradSink


class _SplitBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sink: WgradSink, product: Callable, x: torch.Tensor, weight: torch.Tensor):
        x_leaf = x.detach().requires_grad_(x.requires_grad)
        w_leaf = weight.detach().requires_grad_()
        with torch.enable_grad():
            out = product(x_leaf, w_leaf)
        # Not save_for_backward: the inner graph holds what its backward needs (through
        # any saved-tensor hooks active here, e.g. a recompute recipe).
        ctx.graph, ctx.sink = (out, x_leaf, w_leaf), sink
        return out.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, x_leaf, w_leaf = ctx.graph
        del ctx.graph
        dx = None
        if x_leaf.requires_grad:
            (dx,) = torch.autograd.grad(out, x_leaf, grad, retain_graph=True)

        def weight_gradient() -> torch.Tensor:
            (dw,) = torch.autograd.grad(out, w_leaf, grad)
            return dw

        ctx.sink.defer(weight_gradient)
        return None, None, dx, None


def split_backward(sink: WgradSink, product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`product(x, weight)`, its weight gradient deferred into `sink`."""
    return _SplitBackward.apply(sink, product, x, weight)
