"""Megatron's column- and row-parallel linears with their weight gradient deferrable.

`DeferringColumnParallelLinear` and `DeferringRowParallelLinear` are drop-ins for
Megatron's classes (same parameters, names, checkpoints and communication); with
`config.delay_wgrad_compute` their GEMM runs through `_LinearDeferringWgrad`, whose
backward is Megatron's `LinearWithGradAccumulationAndAsyncCommunication.backward`
(megatron/core/tensor_parallel/layers.py:582-752, megatron-core 0.19.2) with the weight's
GEMM handed to the W (`plugins.common.wgrad`) instead of run. Without the flag they are
Megatron's classes unchanged. `with_deferring_linears(spec)` puts them into a layer spec.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import torch

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import (  # what Megatron's linear itself calls
    dist_all_gather_func,
    dist_reduce_scatter_func,
    get_global_memory_buffer,
    get_tensor_model_parallel_group_if_none,
    prepare_input_tensors_for_wgrad_compute,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from plugins.common.wgrad import DELAY_FLAG, WgradSink, sink_for, wgrad_store
from upstream.private_names import DEFERRING_LINEARS_FORWARD_IMPL, require

# The classes below override Megatron's private `_forward_impl`: checked here, so that a
# Megatron that renamed or changed it fails at import, not with the weight gradients
# silently undeferred.
require(DEFERRING_LINEARS_FORWARD_IMPL)


def _gathered(input: torch.Tensor, tp_group, buffer: bool) -> torch.Tensor:
    """The sequence-parallel input gathered over the TP group ([s/tp, ...] -> [s, ...])."""
    size = list(input.size())
    size[0] *= tp_group.size()
    out = (get_global_memory_buffer().get_tensor(size, input.dtype, "mpu") if buffer
           else torch.empty(size, dtype=input.dtype, device=input.device))
    dist_all_gather_func(out, input, group=tp_group)
    return out


class _LinearDeferringWgrad(torch.autograd.Function):
    """Megatron's linear (no gradient-accumulation fusion, no embedding wgrad buffer, no
    GTP) with the weight's GEMM deferred into `sink`; dgrad, bias gradient and their
    communication as Megatron's."""

    @staticmethod
    def forward(ctx, input, weight, bias, allreduce_dgrad, sequence_parallel, tp_group,
                sink: WgradSink):
        ctx.save_for_backward(input, weight)
        ctx.use_bias, ctx.allreduce_dgrad = bias is not None, allreduce_dgrad
        ctx.sequence_parallel, ctx.tp_group, ctx.sink = sequence_parallel, tp_group, sink
        total_input = _gathered(input, tp_group, buffer=True) if sequence_parallel else input
        output = torch.matmul(total_input, weight.t())
        if bias is not None:
            output = output + bias
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        tp_group = ctx.tp_group
        grad_input = grad_output.matmul(weight)
        if ctx.allreduce_dgrad:
            torch.distributed.all_reduce(grad_input, group=tp_group)
        if ctx.sequence_parallel:
            sub_grad_input = torch.empty(input.size(), dtype=input.dtype, device=input.device)
            dist_reduce_scatter_func(sub_grad_input, grad_input, group=tp_group)
            grad_input = sub_grad_input
        sequence_parallel = ctx.sequence_parallel

        def weight_gradient() -> torch.Tensor:
            # Under sequence parallelism the input is gathered again here, as Megatron's
            # backward does, rather than the gathered copy kept until the W.
            total_input = _gathered(input, tp_group, buffer=False) if sequence_parallel else input
            dy, x = prepare_input_tensors_for_wgrad_compute(grad_output, total_input)
            return dy.t().matmul(x)

        ctx.sink.defer(weight_gradient)
        grad_bias = None
        if ctx.use_bias:  # Megatron sums the 2-D gradient (its wgrad's reshape)
            dy = grad_output.contiguous()
            grad_bias = (dy.view(-1, dy.shape[-1]) if dy.dim() == 3 else dy).sum(dim=0)
        return grad_input, None, grad_bias, None, None, None, None


def _undeferrable(gradient_accumulation_fusion, grad_output_buffer, gtp_remat_size) -> str:
    """What, of Megatron's `_forward_impl` keywords, the deferring GEMM cannot honour,
    named by the flag that asks for it."""
    causes = []
    if gradient_accumulation_fusion:
        causes.append("gradient-accumulation fusion (pass --no-gradient-accumulation-fusion)")
    if grad_output_buffer is not None:
        causes.append("--defer-embedding-wgrad-compute (drop it)")
    if gtp_remat_size > 1:
        causes.append(f"GTP weight shards, {gtp_remat_size} per tensor-parallel rank (drop "
                      "--tensor-parallel-num-weight-shards or "
                      "--expert-tensor-parallel-num-weight-shards)")
    return "; ".join(causes)


def _deferring_forward_impl(module, megatron_forward_impl, input, weight, bias,
                            gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                            grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None,
                            gtp_remat_size=1):
    """Megatron's `_forward_impl` contract; the deferring GEMM where there is a sink."""
    sink = sink_for(module, weight)
    if sink is None:
        return megatron_forward_impl(
            input=input, weight=weight, bias=bias,
            gradient_accumulation_fusion=gradient_accumulation_fusion,
            allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel,
            grad_output_buffer=grad_output_buffer, wgrad_deferral_limit=wgrad_deferral_limit,
            tp_group=tp_group, gtp_remat_size=gtp_remat_size)
    if gradient_accumulation_fusion or grad_output_buffer is not None or gtp_remat_size > 1:
        # A backstop: the start-up check (`wgrad_checks.delay_wgrad_refusal` and
        # `integration.argument_checks`) refuses each of these by its flag.
        from plugins.common.errors import PluginError

        raise PluginError(f"{DELAY_FLAG} cannot defer the weight gradient of "
                          f"{type(module).__name__}: " + _undeferrable(
                              gradient_accumulation_fusion, grad_output_buffer, gtp_remat_size))
    tp_group = get_tensor_model_parallel_group_if_none(tp_group)
    return _LinearDeferringWgrad.apply(input, weight, bias, allreduce_dgrad, sequence_parallel,
                                       tp_group, sink)


class DeferringColumnParallelLinear(ColumnParallelLinear):
    """Megatron's ColumnParallelLinear; deferring its weight gradient with the flag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.deferred_wgrads = wgrad_store(self.config)

    def _forward_impl(self, input, weight, *args, **kwargs):
        return _deferring_forward_impl(self, super()._forward_impl, input, weight, *args,
                                       **kwargs)


class DeferringRowParallelLinear(RowParallelLinear):
    """Megatron's RowParallelLinear; deferring its weight gradient with the flag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.deferred_wgrads = wgrad_store(self.config)

    def _forward_impl(self, input, weight, *args, **kwargs):
        return _deferring_forward_impl(self, super()._forward_impl, input, weight, *args,
                                       **kwargs)


DEFERRING_VERSION = {ColumnParallelLinear: DeferringColumnParallelLinear,
                     RowParallelLinear: DeferringRowParallelLinear}


def _mapped(node):
    if isinstance(node, type):
        return DEFERRING_VERSION.get(node, node)
    if isinstance(node, ModuleSpec):
        node.module = _mapped(node.module)
        node.submodules = _mapped(node.submodules)
        return node
    if isinstance(node, functools.partial):  # e.g. Megatron's MLP.as_mlp_submodule
        return functools.partial(node.func, *(_mapped(a) for a in node.args),
                                 **{k: _mapped(v) for k, v in node.keywords.items()})
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        for field in dataclasses.fields(node):
            setattr(node, field.name, _mapped(getattr(node, field.name)))
    return node


def with_deferring_linears(layer_spec: ModuleSpec) -> ModuleSpec:
    """A copy of a layer spec with Megatron's column- and row-parallel linears (exactly
    those classes, wherever they sit) replaced by their deferring drop-ins. Other linear
    classes (megaseek's, the fp8 plugin's) defer by themselves."""
    return _mapped(copy.deepcopy(layer_spec))
