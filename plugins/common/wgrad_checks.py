"""What `--delay-wgrad-compute` cannot honour, refused by name instead of computed undeferred.

- `delay_wgrad_refusal(args)`: the start-up error for flags the deferral cannot go with
  (`REFUSALS`, and GTP weight shards: `weights_sharded_past_tp`);
- `check_deferral(model_chunk)`: every linear of every transformer layer of a built chunk
  defers (`take_deferred_weight_gradients` runs it before each take).
"""

from __future__ import annotations

import argparse

import torch

from plugins.common.flags import Refusal, first_refused, weights_sharded_past_tp

DELAY_FLAG = "--delay-wgrad-compute"

REFUSALS: tuple[Refusal, ...] = (
    ("transformer_impl", "--transformer-impl", ("local",),
     f"megaseek's {DELAY_FLAG} defers the weight gradients of the local (non-TE) linears; "
     "Transformer Engine's linears have their own deferral, which megaseek does not drive"),
    ("overlap_grad_reduce", "--overlap-grad-reduce", (False,),
     f"with {DELAY_FLAG}, DDP's gradient hook would see a weight's gradient missing in B "
     "and start its reduction before the W that computes it"),
    ("gradient_accumulation_fusion", "--gradient-accumulation-fusion", (False,),
     f"{DELAY_FLAG} defers the plain wgrad GEMM; pass --no-gradient-accumulation-fusion"),
)
# Why GTP weight shards (more than the tensor-parallel ranks) are refused, whatever their number.
SHARDED_PAST_TP_WHY = ("Megatron's linear gathers a GTP-sharded weight inside its GEMM, "
                       "reduce-scattering the weight's gradient back; the deferred "
                       "weight-gradient GEMM does neither")


def delay_wgrad_refusal(args: argparse.Namespace) -> str | None:
    """None, or the error message for a flag `--delay-wgrad-compute` cannot go with."""
    if not getattr(args, "delay_wgrad_compute", False):
        return None
    message = first_refused(args, REFUSALS)
    if message:
        return f"{message} (given with {DELAY_FLAG})"
    sharded = weights_sharded_past_tp(args)
    if sharded:
        return (f"{sharded.flag} {sharded.shards} cannot be combined with {DELAY_FLAG}: it "
                f"shards each weight over more ranks than {sharded.ranks_flag} "
                f"{sharded.ranks} (GTP); {SHARDED_PAST_TP_WHY}. Drop {sharded.flag} or "
                f"{DELAY_FLAG}")
    return None


def _computes_wgrad_in_backward(module: torch.nn.Module) -> bool:
    """Modules whose small weight GEMMs stay in B by design (routers: Megatron's TE path
    does not defer its router either)."""
    from megatron.core.transformer.moe.router import Router

    return isinstance(module, Router) or getattr(module, "wgrad_in_backward", False)


def check_deferral(model_chunk: torch.nn.Module) -> None:
    """Raises PluginError naming the first module of a transformer layer (built with
    `delay_wgrad_compute`) that owns a weight matrix but cannot defer its gradient; and
    for a DDP chunk with `overlap_grad_reduce`."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from plugins.common.errors import PluginError

    layers = [(name, m) for name, m in model_chunk.named_modules()
              if isinstance(m, TransformerLayer) and m.config.delay_wgrad_compute]
    if not layers:
        return
    ddp_config = getattr(model_chunk, "ddp_config", None)
    if ddp_config is not None and ddp_config.overlap_grad_reduce:
        raise PluginError(f"{DELAY_FLAG} with --overlap-grad-reduce is not supported: "
                          f"{REFUSALS[1][3]}")
    for layer_name, layer in layers:
        for name, module in layer.named_modules(prefix=layer_name):
            if getattr(module, "deferred_wgrads", None) is not None:
                continue
            if _computes_wgrad_in_backward(module):
                continue
            if any(p.dim() >= 2 and p.requires_grad for p in module.parameters(recurse=False)):
                raise PluginError(
                    f"{DELAY_FLAG}: {name} is a {type(module).__name__}, which cannot defer "
                    "its weight gradient (plugins.common.wgrad); its layer spec needs a "
                    "deferring linear there")
