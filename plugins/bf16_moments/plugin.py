"""The `bf16_moments` plugin: on with Megatron's `--exp-avg-dtype bf16` and/or
`--exp-avg-sq-dtype bf16` (no `--plugins` entry needed)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from plugins import Plugin, PluginError, TransformerEngine
from plugins.config import megatron
from plugins.bf16_moments.adam import AdamWBF16Moments
from upstream.optimizer import (
    bf16_moments_fixes,
    fused_adam_package,
    moment_dtypes,
    torch_adam_in_use,
)
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
        if fused_adam_package() == "transformer_engine":
            return False  # Megatron's own precision-aware optimizer (TE's FusedAdam) does it
        raise PluginError(
            "--use-precision-aware-optimizer needs Transformer Engine's FusedAdam, which is "
            f"not installed. For BF16 moments with FP32 master weights without TE, give {asked} "
            "without --use-precision-aware-optimizer")
    if not torch_adam_in_use():
        raise PluginError(fused_adam_refusal(asked, fused_adam_package()))
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


def fused_adam_refusal(asked: str, package: str | None) -> str:
    """The moment flags where Megatron's Adam is a FusedAdam (not torch's, which the plugin
    replaces): TE's keeps the moments in those dtypes itself; apex's only in FP32."""
    if package == "transformer_engine":
        return (f"{asked}: Megatron uses Transformer Engine's FusedAdam here, which keeps the "
                "moments in those dtypes itself: add --use-precision-aware-optimizer "
                "--use-distributed-optimizer")
    return (f"{asked}: Megatron uses Apex's FusedAdam here (Transformer Engine is not "
            "installed), which keeps the moments in FP32, and the plugin replaces torch's "
            f"Adam only: drop {asked}, or install Transformer Engine, whose optimizer keeps "
            "them in BF16 (--use-precision-aware-optimizer)")


def moments_not_fp32(args: argparse.Namespace) -> bool:
    """The opt-in: a moment flag other than fp32 (validation refuses what cannot be done)."""
    return any(d != torch.float32 for d in moment_dtypes(args).values())


@dataclass(frozen=True)
class BF16MomentsPluginConfig:
    """What the bf16_moments plugin reads: Megatron's moment flags (it adds none)."""

    exp_avg_dtype: str = megatron("exp_avg_dtype", "fp32")
    exp_avg_sq_dtype: str = megatron("exp_avg_sq_dtype", "fp32")
    use_precision_aware_optimizer: bool = megatron("use_precision_aware_optimizer", False)


def check(config: BF16MomentsPluginConfig, args) -> None:
    if not moments_not_fp32(config):
        raise PluginError("--plugins bf16_moments: give Megatron's --exp-avg-dtype bf16 and/or "
                          "--exp-avg-sq-dtype bf16 (they turn it on without --plugins)")
    check_moment_flags(args)


def fixes(config: BF16MomentsPluginConfig):
    return applicable(bf16_moments_fixes(AdamWBF16Moments), config)


BF16_MOMENTS = Plugin(
    name="bf16_moments",
    summary="Adam moments in BF16 with FP32 master weights (--exp-avg-dtype/--exp-avg-sq-dtype "
            "bf16) without Transformer Engine",
    config=BF16MomentsPluginConfig,
    check=check,
    fixes=fixes,
    enabled_by=moments_not_fp32,
    transformer_engine=TransformerEngine(
        composes=True,
        effect="touches no module, only torch's Adam; where TE is installed Megatron's Adam "
               "is TE's FusedAdam, and the plugin refuses the moment flags naming TE's own "
               "way (--use-precision-aware-optimizer)",
        gives_up="nothing"),
)
