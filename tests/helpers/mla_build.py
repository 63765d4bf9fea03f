"""Build megaseek's MLA module (and a full layer) from the oracle's shapes, on the ranks
of an initialized process group, for the tests that compare it with the oracles."""

from __future__ import annotations

import contextlib

import torch

from tests.helpers.mla_oracle import MLAShape


@contextlib.contextmanager
def megatron_ranks(tp: int = 1, seed: int = 1234, ep: int = 1, cp: int = 1):
    """Megatron's model-parallel state over the current process group, with CPU support
    where the group is gloo (`tests.helpers.backend.device()` is then the CPU; on NCCL it is this
    rank's GPU and Megatron runs unpatched). Experts are never tensor-parallel in megaseek
    (expert TP = 1)."""
    import integration  # noqa: F401
    from upstream import cpu

    from megatron.core import parallel_state, tensor_parallel

    from tests.helpers import backend

    # CPU semantics on any machine when the tensors are on the CPU.
    patcher = cpu.install(force=True) if backend.device().type == "cpu" else None
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             context_parallel_size=cp,
                                             expert_model_parallel_size=ep,
                                             expert_tensor_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if patcher is not None:
            patcher.undo()


def mla_config(shape: MLAShape, **overrides):
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    yarn = shape.yarn or {}
    fields = dict(
        num_layers=1, hidden_size=shape.hidden, num_attention_heads=shape.heads,
        ffn_hidden_size=2 * shape.hidden,
        q_lora_rank=shape.q_lora_rank, kv_lora_rank=shape.kv_lora_rank,
        qk_head_dim=shape.qk_head_dim, qk_pos_emb_head_dim=shape.qk_pos_emb_head_dim,
        v_head_dim=shape.v_head_dim, layernorm_epsilon=shape.eps, rotary_base=shape.rope_theta,
        normalization="RMSNorm",
        rope_type="yarn" if shape.yarn else "rope",
        rotary_scaling_factor=yarn.get("factor", 1.0),
        original_max_position_embeddings=yarn.get("original_max_position_embeddings", 4096),
        beta_fast=yarn.get("beta_fast", 32), beta_slow=yarn.get("beta_slow", 1),
        mscale=yarn.get("mscale", 1.0), mscale_all_dim=yarn.get("mscale_all_dim", 0.0),
        attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True,
        add_bias_linear=False, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
    )
    fields.update(overrides)
    return MLATransformerConfig(**fields)


def build_attention(shape: MLAShape, **overrides):
    from megatron.core.transformer.spec_utils import build_module

    from plugins.mla.spec import mla_attention_spec

    return build_module(mla_attention_spec(), config=mla_config(shape, **overrides), layer_number=1)


def build_layer(shape: MLAShape, **overrides):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from plugins.mla.spec import with_mla

    spec = with_mla(get_gpt_layer_local_spec(normalization="RMSNorm"))
    return build_module(spec, config=mla_config(shape, **overrides), layer_number=1)


def shard(name: str, weight: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """This TP rank's part of a full MLA weight (Megatron's split of each layer)."""
    if name.startswith(("linear_q_up_proj", "linear_q_proj", "linear_kv_up_proj")):
        return weight.chunk(tp, dim=0)[rank]   # column-parallel: heads split
    if name.startswith("linear_proj"):
        return weight.chunk(tp, dim=1)[rank]   # row-parallel
    return weight                              # replicated down-projections and norms
