"""Megatron's transformer config and layer, where megaseek's plugins replace TE's part.

- `FP8_FIXES`: two of `TransformerConfig.__post_init__`'s FP8 checks are about Transformer
  Engine's FP8, which the fp8 plugin replaces; they are lifted for a run with
  `--plugins fp8` (Megatron's other FP8 checks stay);
- `MLA_LAYERNORM_RECOMPUTE`: Megatron's 'layernorm' selective recompute needs TE; the mla
  plugin does that recompute itself. Nothing of Megatron is patched for it: the record is
  there so that `megaseek fixes` shows it and its probe tells when it can go.
"""

from __future__ import annotations

import argparse
import importlib

from upstream.patching import Fix, Patcher, patches_nothing, plugin_scope, rewrite_function, source_has

VERSION = "megatron-core 0.19.2"


def _module(name: str):
    return importlib.import_module(name)


def _config_cls():
    return _module("megatron.core.transformer.transformer_config").TransformerConfig


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
)


# --- the 'layernorm' recompute needs TE (plugin mla) -----------------------------------------

def _layernorm_recompute_needs_te() -> bool:
    random = _module("megatron.core.tensor_parallel.random")
    layer = _module("megatron.core.transformer.transformer_layer").TransformerLayer
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
