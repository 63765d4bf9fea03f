"""The layer spec with MLA: Megatron's GPT layer spec with `self_attention` replaced."""

from __future__ import annotations

import copy

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from plugins.common.linear import ReplicatedLinear
from plugins.mla.attention import MLASelfAttention, MLASubmodules, RMSNorm
from plugins.mla.layer import MLATransformerLayer


def mla_attention_spec() -> ModuleSpec:
    # MLA's attention is causal; the param says so to Megatron (MTP checks it).
    return ModuleSpec(module=MLASelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                      submodules=MLASubmodules(
        linear_q_proj=ColumnParallelLinear,
        linear_q_down_proj=ReplicatedLinear,
        linear_q_up_proj=ColumnParallelLinear,
        linear_kv_down_proj=ReplicatedLinear,
        linear_kv_up_proj=ColumnParallelLinear,
        q_layernorm=RMSNorm,
        kv_layernorm=RMSNorm,
        linear_proj=RowParallelLinear,
    ))


def with_mla(layer_spec: ModuleSpec) -> ModuleSpec:
    """A copy of a GPT layer spec whose attention is MLA and whose norms are RMSNorms that
    support sequence parallelism; other submodules (the MLP, MoE) stay as they were."""
    spec = copy.deepcopy(layer_spec)
    spec.module = MLATransformerLayer
    spec.submodules.self_attention = mla_attention_spec()
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    return spec
