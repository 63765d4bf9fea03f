"""Megatron's transformer config and layer, where megaseek's plugins replace TE's part.

- `FP8_FIXES`: two of `TransformerConfig.__post_init__`'s FP8 checks are about Transformer
  Engine's FP8, which the fp8 plugin replaces; they are lifted for a run with
  `--plugins fp8` (Megatron's other FP8 checks stay);
- `FP8_RECOMPUTE`: under FP8, Megatron's full recomputation and its 'mlp' recomputation
  checkpoint through TE's `te_checkpoint`; with the fp8 plugin they checkpoint as in BF16;
- `MLA_LAYERNORM_RECOMPUTE`: Megatron's 'layernorm' selective recompute needs TE; the mla
  plugin does that recompute itself. Nothing of Megatron is patched for it: the record is
  there so that `megaseek fixes` shows it and its probe tells when it can go.
"""

from __future__ import annotations

import argparse
import functools

from upstream.megatron_modules import megatron_module
from upstream.patching import Fix, Patcher, patches_nothing, plugin_scope, rewrite_function, source_has

VERSION = "megatron-core 0.19.2"



def _config_cls():
    return megatron_module("megatron.core.transformer.transformer_config").TransformerConfig


def _recomputes(args: argparse.Namespace, *modules: str) -> bool:
    return (args.recompute_granularity == "selective"
            and bool(set(modules) & set(args.recompute_modules or ())))


# --- TransformerConfig's FP8 checks that are about TE (plugin fp8) --------------------------

MOE_FP8_NEEDS_TE = "if self.num_moe_experts and self.fp8:"
RECOMPUTE_FP8_NEEDS_TE = ('if "moe_act" in self.recompute_modules or "layernorm" in '
                          'self.recompute_modules:')


def _lift(check: str, why: str):
    def apply(p: Patcher) -> None:
        cls = _config_cls()
        p.setattr(cls, "__post_init__", rewrite_function(
            cls, "__post_init__", {check: f"if False:  # lifted by megaseek: {why}"}))

    return apply


# --- recomputation under FP8 goes through TE (plugin fp8) --------------------------------------

# Where Megatron reads te_checkpoint: bound at import (None without TE) in the first two; the
# layer (its MLP), MTP and the MoE layer's callers import it from the extension at each call.
TE_CHECKPOINT_HOLDERS = ("megatron.core.recompute", "megatron.core.transformer.moe.moe_layer",
                         "megatron.core.extensions.transformer_engine")


def _recompute_goes_through_te() -> bool:
    layer = megatron_module("megatron.core.transformer.transformer_layer").TransformerLayer
    sites = (megatron_module("megatron.core.recompute").checkpointed_forward,  # full
             layer._forward_mlp)
    return (all(source_has(site, "if self.config.fp8 or self.config.fp4:", "te_checkpoint(")
                for site in sites)
            and any(megatron_module(m).te_checkpoint is not _checkpoint_as_bf16
                    for m in TE_CHECKPOINT_HOLDERS))


def _checkpoint_as_bf16(forward_func, distribute_saved_activations, get_rng_state_tracker,
                        tp_group, *args, **kwargs):
    """`te_checkpoint`'s signature, Megatron's own checkpoint (what BF16 runs use: the
    forward is rerun in backward with the RNG states of the first run)."""
    from megatron.core import tensor_parallel

    function = functools.partial(forward_func, **kwargs) if kwargs else forward_func
    return tensor_parallel.checkpoint(function, distribute_saved_activations, *args)


def _recompute_as_bf16(p: Patcher) -> None:
    for holder in TE_CHECKPOINT_HOLDERS:
        p.setattr(megatron_module(holder), "te_checkpoint", _checkpoint_as_bf16)


def _recomputes_fp8_blocks(args: argparse.Namespace) -> bool:
    return (args.recompute_granularity == "full"
            or _recomputes(args, "mlp", "moe", "shared_experts"))


FP8_RECOMPUTE = Fix(
    "fp8-recompute-without-te",
    f"megatron/core/recompute.py:15-18,132-139; megatron/core/transformer/"
    f"transformer_layer.py:882-894; megatron/core/transformer/moe/moe_layer.py:62-64,512,696; "
    f"megatron/core/transformer/multi_token_prediction.py:1376-1378 ({VERSION})",
    "with FP8 on, --recompute-granularity full and --recompute-modules mlp (moe, "
    "shared_experts of Megatron's MoE layer) checkpoint through TE's te_checkpoint (None "
    "without TE: TypeError; through the extension: ImportError) at the first forward; the "
    "fp8 plugin's FP8 is not TE's and needs no FP8 state restored, so they checkpoint with "
    "Megatron's tensor_parallel.checkpoint, as in BF16",
    _recompute_goes_through_te, _recompute_as_bf16,
    plugin_scope("fp8", "--recompute-granularity full or --recompute-modules mlp, moe or "
                 "shared_experts", _recomputes_fp8_blocks))


FP8_FIXES: tuple[Fix, ...] = (
    Fix("fp8-moe-without-te",
        f"megatron/core/transformer/transformer_config.py:2294-2300 ({VERSION})",
        "refuses FP8 with MoE unless TE >= 1.7 is installed; with the fp8 plugin the "
        "experts' FP8 GEMMs are megaseek's (plugins.moe), not TE's",
        lambda: source_has(_config_cls().__post_init__, MOE_FP8_NEEDS_TE),
        _lift(MOE_FP8_NEEDS_TE, "the experts' FP8 is not TE's (plugins.fp8)"),
        plugin_scope("fp8", "--num-experts", lambda args: bool(args.num_experts))),
    Fix("fp8-norm-recompute-without-te",
        f"megatron/core/transformer/transformer_config.py:1821-1832 ({VERSION})",
        "refuses --recompute-modules layernorm (and moe_act) with FP8 unless TE >= 2.6 "
        "(TE's FP8 norm outputs); with the fp8 plugin the norms stay in the training dtype "
        "and the mla plugin recomputes them itself",
        lambda: source_has(_config_cls().__post_init__, RECOMPUTE_FP8_NEEDS_TE),
        _lift(RECOMPUTE_FP8_NEEDS_TE, "norms are not FP8 (plugins.fp8)"),
        plugin_scope("fp8", "--recompute-modules layernorm or moe_act",
                     lambda args: _recomputes(args, "layernorm", "moe_act"))),
    FP8_RECOMPUTE,
)


# --- the 'layernorm' recompute needs TE (plugin mla) -----------------------------------------

def _layernorm_recompute_needs_te() -> bool:
    random = megatron_module("megatron.core.tensor_parallel.random")
    layer = megatron_module("megatron.core.transformer.transformer_layer").TransformerLayer
    # CheckpointWithoutOutput(fp8=False) still takes TE's FP8 path (`False is not None`);
    # with FP8, the layer's set-up calls TE for the pre-MLP norm.
    return (source_has(random.CheckpointWithoutOutput.__init__, "self.fp8 = fp8 is not None")
            and source_has(random.CheckpointWithoutOutputFunction.forward,
                           "FP8GlobalStateManager.is_fp8_enabled()")
            and not random.HAVE_TE) or source_has(layer.__init__, "set_save_original_input")


MLA_LAYERNORM_RECOMPUTE = Fix(
    "mla-own-layernorm-recompute",
    f"megatron/core/tensor_parallel/random.py:693,740; megatron/core/transformer/"
    f"transformer_layer.py:452-513,633,766 ({VERSION})",
    "Megatron's 'layernorm' recompute (CheckpointWithoutOutput) sets fp8 = (fp8 is not "
    "None), True for its default False, then calls TE's FP8GlobalStateManager (NameError "
    "without TE); with FP8 its set-up also calls TE (set_save_original_input). Not a "
    "patch: plugins/mla/layer.py builds Megatron's layer from a copy of the config without "
    "'layernorm' and recomputes the norms through saved-tensor hooks",
    _layernorm_recompute_needs_te, patches_nothing,
    plugin_scope("mla", "--recompute-modules layernorm",
                 lambda args: _recomputes(args, "layernorm")))

FIXES: tuple[Fix, ...] = (*FP8_FIXES, MLA_LAYERNORM_RECOMPUTE)
