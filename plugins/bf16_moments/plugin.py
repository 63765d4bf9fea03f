"""The `bf16_moments` plugin: on with Megatron's `--exp-avg-dtype bf16` and/or
`--exp-avg-sq-dtype bf16` (no `--plugins` entry needed)."""

from __future__ import annotations

import argparse

import torch

from plugins import Plugin, PluginError
from plugins.bf16_moments.adam import AdamWBF16Moments
from upstream.optimizer import bf16_moments_fixes, moment_dtypes, torch_adam_in_use
from upstream.patching import applicable

_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.uint8: "fp8"}


def check_moment_flags(args: argparse.Namespace) -> bool:
    """Validates Megatron's moment-dtype flags for a run without TE's precision-aware
    optimizer; returns whether Megatron needs the BF16-moments fixes. Raises `PluginError`
    naming the flags to change where the request cannot be honoured as asked."""
    dtypes = moment_dtypes(args)
    if all(d == torch.float32 for d in dtypes.values()):
        return False
    asked = " ".join(f"{flag} {_NAMES.get(d, d)}" for flag, d in dtypes.items())
    if getattr(args, "use_precision_aware_optimizer", False):
        if not torch_adam_in_use():
            return False  # Megatron's own precision-aware optimizer (TE's FusedAdam) does it
        raise PluginError(
            "--use-precision-aware-optimizer needs Transformer Engine's FusedAdam, which is "
            f"not installed. For BF16 moments with FP32 master weights without TE, give {asked} "
            "without --use-precision-aware-optimizer")
    if not torch_adam_in_use():
        raise PluginError(
            f"{asked}: Megatron uses Transformer Engine's or Apex's FusedAdam here; with TE "
            "add --use-precision-aware-optimizer --use-distributed-optimizer (TE keeps the "
            "moments in those dtypes itself)")
    unsupported = [f"{flag} {_NAMES.get(d, d)}" for flag, d in dtypes.items()
                   if d not in (torch.float32, torch.bfloat16)]
    if unsupported:
        raise PluginError(f"{', '.join(unsupported)}: without Transformer Engine the Adam "
                          "moments can be stored in fp32 or bf16 only")
    if args.optimizer != "adam":
        raise PluginError(f"{asked} applies to Adam's moments: use --optimizer adam "
                          f"(got --optimizer {args.optimizer})")
    for flag, dest in (("--optimizer-cpu-offload", "optimizer_cpu_offload"),
                       ("--use-megatron-fsdp", "use_megatron_fsdp"),
                       ("--use-torch-fsdp2", "use_torch_fsdp2"),
                       ("--use-layer-wise-distributed-optimizer",
                        "use_layer_wise_distributed_optimizer")):
        if getattr(args, dest, False):
            raise PluginError(f"{asked} without Transformer Engine is supported with Megatron's "
                              f"DDP and distributed optimizer, not with {flag}")
    return True


def moments_not_fp32(args: argparse.Namespace) -> bool:
    """The opt-in: a moment flag other than fp32 (validation refuses what cannot be done)."""
    return any(d != torch.float32 for d in moment_dtypes(args).values())


def validate(args: argparse.Namespace) -> None:
    if not moments_not_fp32(args):
        raise PluginError("--plugins bf16_moments: give Megatron's --exp-avg-dtype bf16 and/or "
                          "--exp-avg-sq-dtype bf16 (they turn it on without --plugins)")
    check_moment_flags(args)


def fixes(args: argparse.Namespace):
    return applicable(bf16_moments_fixes(AdamWBF16Moments), args)


BF16_MOMENTS = Plugin(
    name="bf16_moments",
    summary="Adam moments in BF16 with FP32 master weights (--exp-avg-dtype/--exp-avg-sq-dtype "
            "bf16) without Transformer Engine",
    validate=validate,
    fixes=fixes,
    enabled_by=moments_not_fp32,
)
