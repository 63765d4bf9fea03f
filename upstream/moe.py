"""Megatron's recomputation settings, where the moe plugin's layer stands in for its MoELayer.

- `MOE_ACT_WITHOUT_GROUPED_GEMM`: `TransformerConfig.__post_init__` accepts
  `--recompute-modules moe_act` only with `--moe-grouped-gemm` (the only Megatron experts
  that recompute their activation); the plugin's experts recompute it themselves
  (plugins/common/experts.py) and always run grouped, so the check is lifted for a run with
  `--plugins moe` that asks for it;
- `MOE_LAYER_NOT_A_DENSE_MLP`: `TransformerLayer` recomputes its `mlp` for
  `--recompute-modules mlp` unless it is Megatron's `MoELayer`; the plugin's layer (which
  says `is_moe_layer`) is an MoE layer too, recomputed by `moe`, not by `mlp`.
"""

from __future__ import annotations

import argparse

from upstream.megatron_modules import megatron_module
from upstream.patching import Fix, Patcher, plugin_scope, rewrite_function, source_has

VERSION = "megatron-core 0.19.2"


def _config_cls():
    return megatron_module("megatron.core.transformer.transformer_config").TransformerConfig


def _layer_cls():
    return megatron_module("megatron.core.transformer.transformer_layer").TransformerLayer


def _recomputes(module: str):
    def condition(args: argparse.Namespace) -> bool:
        return (args.recompute_granularity == "selective"
                and module in (args.recompute_modules or ()))

    return condition


def _rewrite(owner, name: str, old: str, new: str):
    def apply(p: Patcher) -> None:
        cls = owner()
        p.setattr(cls, name, rewrite_function(cls, name, {old: new}))

    return apply


MOE_ACT_NEEDS_GROUPED_GEMM = 'if "moe_act" in self.recompute_modules and not self.moe_grouped_gemm:'

MOE_ACT_WITHOUT_GROUPED_GEMM = Fix(
    "moe-act-recompute-without-grouped-gemm",
    f"megatron/core/transformer/transformer_config.py:1784-1787 ({VERSION})",
    "refuses --recompute-modules moe_act without --moe-grouped-gemm (whose kernels need "
    "CUDA, so never on CPU); the moe plugin's experts always run grouped "
    "(torch._grouped_mm) and recompute their activation themselves",
    lambda: source_has(_config_cls().__post_init__, MOE_ACT_NEEDS_GROUPED_GEMM),
    _rewrite(_config_cls, "__post_init__", MOE_ACT_NEEDS_GROUPED_GEMM,
             "if False:  # lifted by megaseek: the moe plugin's experts recompute moe_act"),
    plugin_scope("moe", "--recompute-modules moe_act", _recomputes("moe_act")))

DENSE_MLP_RECOMPUTE = ("if not self.is_moe_layer:\n"
                       "                    self.recompute_mlp = True")

MOE_LAYER_NOT_A_DENSE_MLP = Fix(
    "moe-layer-not-recomputed-as-mlp",
    f"megatron/core/transformer/transformer_layer.py:445,514-516 ({VERSION})",
    "--recompute-modules mlp recomputes every mlp that is not Megatron's MoELayer, so the "
    "moe plugin's MoE layers would be recomputed as dense MLPs; they are recomputed by "
    "--recompute-modules moe, as Megatron's",
    lambda: source_has(_layer_cls().__init__, DENSE_MLP_RECOMPUTE),
    _rewrite(_layer_cls, "__init__", DENSE_MLP_RECOMPUTE,
             'if not (self.is_moe_layer or getattr(self.mlp, "is_moe_layer", False)):\n'
             "                    self.recompute_mlp = True"),
    plugin_scope("moe", "--recompute-modules mlp", _recomputes("mlp")))

FIXES: tuple[Fix, ...] = (MOE_ACT_WITHOUT_GROUPED_GEMM, MOE_LAYER_NOT_A_DENSE_MLP)
