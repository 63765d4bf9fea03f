"""The `mla` plugin: `--plugins mla` with Megatron's own MLA flags."""

from __future__ import annotations

import argparse

from plugins import Plugin, PluginError

# Selective-recompute names the MLA layer handles, and the ones Megatron handles outside
# attention (MLP, MoE); 'core_attn' would need Megatron's attention and is refused.
OWN_RECOMPUTE = ("layernorm", "mla_up_proj")
MEGATRON_RECOMPUTE = ("mlp", "moe", "moe_act", "shared_experts")


def validate(args: argparse.Namespace) -> None:
    if not args.multi_latent_attention:
        raise PluginError("--plugins mla needs --multi-latent-attention (and Megatron's MLA "
                          "flags: --q-lora-rank, --kv-lora-rank, --qk-head-dim, ...)")
    if not args.kv_lora_rank or args.kv_lora_rank <= 0:
        raise PluginError("--plugins mla: --kv-lora-rank must be a positive integer")
    if args.q_lora_rank is not None and args.q_lora_rank <= 0:
        raise PluginError("--plugins mla: --q-lora-rank must be positive (or left out for a "
                          "single query projection)")
    tp = args.tensor_model_parallel_size
    if args.num_attention_heads % tp:
        raise PluginError(f"--plugins mla: --num-attention-heads {args.num_attention_heads} is "
                          f"not divisible by --tensor-model-parallel-size {tp}")
    if args.qk_pos_emb_head_dim <= 0 or args.qk_pos_emb_head_dim % 2:
        raise PluginError(f"--plugins mla: --qk-pos-emb-head-dim {args.qk_pos_emb_head_dim} "
                          "must be even and positive (RoPE rotates pairs)")
    if args.rope_type is None:
        args.rope_type = "yarn"  # Megatron's default for MLA (see --rope-type's help)
    if args.rope_type == "yarn" and args.rotary_scaling_factor > 1:
        if args.yarn_original_max_position_embeddings is None:
            raise PluginError("--plugins mla: --rope-type yarn with --rotary-scaling-factor "
                              f"{args.rotary_scaling_factor} needs "
                              "--yarn-original-max-position-embeddings")
    # Megatron maps config fields from args by name; MLATransformerConfig's YaRN fields
    # have no flag of that name, so the yarn_* flags are passed on under the field names.
    for field, flag in (("original_max_position_embeddings", "yarn_original_max_position_embeddings"),
                        ("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
        if getattr(args, flag, None) is not None:
            setattr(args, field, getattr(args, flag))
    if args.recompute_granularity == "selective":
        chosen = args.recompute_modules or ["core_attn"]  # Megatron's default
        unknown = sorted(set(chosen) - set(OWN_RECOMPUTE) - set(MEGATRON_RECOMPUTE))
        if unknown:
            raise PluginError(f"--plugins mla: --recompute-modules {' '.join(unknown)} not "
                              f"supported with MLA; choose from {' '.join(OWN_RECOMPUTE)} "
                              f"(or {' '.join(MEGATRON_RECOMPUTE)} outside attention)")


def needed_by(args: argparse.Namespace) -> str | None:
    if getattr(args, "multi_latent_attention", False) and args.transformer_impl == "local":
        return ("--multi-latent-attention with --transformer-impl local needs --plugins mla "
                "(Megatron's own MLA does not build with the local spec: its core attention "
                "rejects k_channels/v_channels)")
    return None


def transform_layer_spec(layer_spec, args):
    from plugins.mla.spec import with_mla

    return with_mla(layer_spec, args)


MLA = Plugin(
    name="mla",
    summary="DeepSeek-V3 Multi-head Latent Attention with selective recompute, no TE needed",
    validate=validate,
    needed_by=needed_by,
    transform_layer_spec=transform_layer_spec,
    # The attention, the layer's two norms (RMSNorms that support sequence parallelism)
    # and the layer module itself (for selective recomputation).
    slots=frozenset({"self_attention", "input_layernorm", "pre_mlp_layernorm",
                     "transformer_layer"}),
)
