"""Put DeepSeek-V3's MoE layer into the MoE layers of a GPT layer spec."""

from __future__ import annotations

import copy
import functools

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec

from plugins.common.experts import LocalExperts
from plugins.moe.layer import DeepSeekMoE, DeepSeekMoESubmodules


def _is_megatron_moe(mlp) -> bool:
    module = mlp.func if isinstance(mlp, functools.partial) else getattr(mlp, "module", mlp)
    return module is MoELayer


def with_deepseek_moe(layer_spec: ModuleSpec, config) -> ModuleSpec:
    """The layer's `mlp` slot becomes DeepSeekMoE, with Megatron's shared experts and
    `LocalExperts` in its submodule slots, dispatching as `config` (the moe plugin's
    `MoEPluginConfig`: `moe_fp8_dispatch`, `moe_dispatch_ranks_per_node`) says. Dense
    layers (first-k-dense) are returned unchanged."""
    mlp = layer_spec.submodules.mlp
    if not _is_megatron_moe(mlp):
        return layer_spec
    submodules = mlp.keywords["submodules"] if isinstance(mlp, functools.partial) else mlp.submodules
    spec = copy.copy(layer_spec)
    spec.submodules = copy.copy(layer_spec.submodules)
    spec.submodules.mlp = ModuleSpec(
        module=DeepSeekMoE,
        params={"fp8_dispatch": config.moe_fp8_dispatch,
                "ranks_per_node": config.moe_dispatch_ranks_per_node},
        submodules=DeepSeekMoESubmodules(shared_experts=submodules.shared_experts,
                                         experts=LocalExperts))
    return spec
