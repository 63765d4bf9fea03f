"""The `mla` plugin: `--plugins mla` with Megatron's own MLA flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from plugins import Plugin, PluginError, TransformerEngine
from plugins.config import megatron
from plugins.common.flags import Refusal, first_refused, recompute_granularity

# Selective-recompute names the MLA layer handles, and the ones Megatron handles outside
# attention (MLP, MoE); 'core_attn' would need Megatron's attention and is refused.
OWN_RECOMPUTE = ("layernorm", "mla_up_proj")
MEGATRON_RECOMPUTE = ("mlp", "moe", "moe_act", "shared_experts")


@dataclass(frozen=True)
class MLAPluginConfig:
    """What the mla plugin reads: Megatron's own MLA flags (it adds none)."""

    rope_type: str | None = megatron("rope_type")
    yarn_original_max_position_embeddings: int | None = megatron(
        "yarn_original_max_position_embeddings")
    yarn_beta_fast: float | None = megatron("yarn_beta_fast")
    yarn_beta_slow: float | None = megatron("yarn_beta_slow")
    recompute_granularity: str | None = megatron("recompute_granularity",
                                                  derive=recompute_granularity)
    recompute_modules: tuple | None = megatron("recompute_modules")


def check(config: MLAPluginConfig, args) -> None:
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
    for flag, size in (("--qk-head-dim", args.qk_head_dim), ("--v-head-dim", args.v_head_dim)):
        if size <= 0:
            raise PluginError(f"--plugins mla: {flag} {size} must be positive")
    _validate_rope(config, args)
    _validate_context_parallel(args)
    refused = first_refused(args, _attention_flags())
    if refused:
        raise PluginError(f"--plugins mla: {refused}")
    if recompute_granularity(args) == "selective":
        chosen = args.recompute_modules or ["core_attn"]  # Megatron's default
        unknown = sorted(set(chosen) - set(OWN_RECOMPUTE) - set(MEGATRON_RECOMPUTE))
        if unknown:
            raise PluginError(f"--plugins mla: --recompute-modules {' '.join(unknown)} not "
                              f"supported with MLA; choose from {' '.join(OWN_RECOMPUTE)} "
                              f"(or {' '.join(MEGATRON_RECOMPUTE)} outside attention)")


# Megatron's RoPE flags that the plugin's RoPE does not read (`plugins.common.flags`).
IGNORED_ROPE_FLAGS: tuple[Refusal, ...] = (
    ("rotary_interleaved", "--rotary-interleaved", (False,),
     "the mla plugin rotates Megatron's half-split pairs; DeepSeek's interleaved checkpoints "
     "convert exactly with plugins.mla.convert.from_interleaved_rope"),
    ("rotary_percent", "--rotary-percent", (1.0,),
     "MLA rotates exactly --qk-pos-emb-head-dim dimensions of each head"),
    ("rotary_seq_len_interpolation_factor", "--rotary-seq-len-interpolation-factor", (None,),
     "MLA extends its context with YaRN (--rope-type yarn --rotary-scaling-factor)"),
    ("use_rope_scaling", "--use-rope-scaling", (False,),
     "Llama 3.1's RoPE scaling; MLA extends its context with YaRN (--rope-type yarn)"),
    ("rope_scaling_factor", "--rope-scaling-factor", (8.0,),
     "the factor of Llama 3.1's RoPE scaling; MLA extends its context with YaRN "
     "(--rotary-scaling-factor)"),
    ("no_rope_freq", "--no-rope-freq", (None,), "every MLA layer applies RoPE"),
    ("reset_position_ids", "--reset-position-ids", (False,),
     "MLA's RoPE rotates by the position in the sequence; documents packed into one "
     "sequence keep counting (no per-document restart)"),
    ("yarn_correction_range_round_to_int", "--no-yarn-correction-range-round-to-int",
     (None, True),  # None: Megatron's default, which rounds
     "the mla plugin rounds YaRN's correction range to whole dimensions, as DeepSeek-V3 "
     "does"),
)


def _attention_flags() -> tuple[Refusal, ...]:
    """Megatron's attention flags that the plugin's own attention does not read."""
    from megatron.core.transformer.enums import AttnBackend

    return (("attention_backend", "--attention-backend", (AttnBackend.auto,),
             "it picks Transformer Engine's attention kernel, and the mla plugin computes "
             "MLA's attention itself"),)


# The YaRN flags, with Megatron's defaults: with --rope-type rope nothing reads them.
YARN_FLAGS = (("rotary_scaling_factor", "--rotary-scaling-factor", 1.0),
              ("yarn_original_max_position_embeddings",
               "--yarn-original-max-position-embeddings", None),
              ("yarn_beta_fast", "--yarn-beta-fast", None),
              ("yarn_beta_slow", "--yarn-beta-slow", None),
              ("mscale", "--mscale", 1.0), ("mscale_all_dim", "--mscale-all-dim", 0.0))


def overrides(config: MLAPluginConfig) -> dict:
    """--rope-type's default for MLA (Megatron's, see its help), and the YaRN flags under
    the names of MLATransformerConfig's fields: Megatron fills config fields from args by
    name, and those have no flag of that name."""
    found = {"rope_type": "yarn"} if config.rope_type is None else {}
    for field, given in (("original_max_position_embeddings",
                          config.yarn_original_max_position_embeddings),
                         ("beta_fast", config.yarn_beta_fast),
                         ("beta_slow", config.yarn_beta_slow)):
        if given is not None:
            found[field] = given
    return found


def _rope_type(config: MLAPluginConfig) -> str:
    return "yarn" if config.rope_type is None else config.rope_type


def _validate_rope(config: MLAPluginConfig, args) -> None:
    from plugins.mla.rope import Yarn

    refused = first_refused(args, IGNORED_ROPE_FLAGS)
    if refused:
        raise PluginError(f"--plugins mla: {refused}")
    if _rope_type(config) == "rope":
        given = [f"{flag} {getattr(args, dest)}" for dest, flag, default in YARN_FLAGS
                 if getattr(args, dest) != default]
        if given:
            raise PluginError(f"--plugins mla: --rope-type rope reads no YaRN flag; drop "
                              f"{', '.join(given)} or use --rope-type yarn")
        if args.apply_rope_fusion:
            raise PluginError("--plugins mla: --rope-type rope needs --no-rope-fusion "
                              "(Megatron's MLA config refuses RoPE fusion without YaRN)")
        return
    factor = args.rotary_scaling_factor
    if not factor >= 1:  # NaN too; the HF converter refuses rope_scaling.factor < 1 alike
        raise PluginError(f"--plugins mla: --rotary-scaling-factor {factor} must be 1 or more "
                          "(YaRN divides the low RoPE frequencies by it to stretch the context "
                          "by that factor; below 1 it would shrink it)")
    if factor != 1 and args.yarn_original_max_position_embeddings is None:
        raise PluginError(f"--plugins mla: --rope-type yarn with --rotary-scaling-factor "
                          f"{factor} needs --yarn-original-max-position-embeddings")
    original = args.yarn_original_max_position_embeddings
    if original is not None and original <= 0:
        raise PluginError(f"--plugins mla: --yarn-original-max-position-embeddings {original} "
                          "must be positive")
    fast, slow = args.yarn_beta_fast, args.yarn_beta_slow
    fast = Yarn.beta_fast if fast is None else fast
    slow = Yarn.beta_slow if slow is None else slow
    if slow <= 0 or fast < slow:
        raise PluginError(f"--plugins mla: --yarn-beta-fast {fast} and --yarn-beta-slow {slow} "
                          "must satisfy 0 < beta-slow <= beta-fast (YaRN keeps the dimensions "
                          "turning more than beta-fast times over the original context and "
                          "interpolates those turning fewer than beta-slow times)")


def _validate_context_parallel(args: argparse.Namespace) -> None:
    """MLA under context parallelism all-gathers the K/V latents over the CP group."""
    if args.context_parallel_size == 1:
        return
    other = sorted(set(args.cp_comm_type) - {"p2p", "allgather"})
    if other:
        raise PluginError(f"--plugins mla: --cp-comm-type {' '.join(other)} is not supported; "
                          "MLA all-gathers the key/value latents over the context-parallel "
                          "ranks (use allgather)")
    if args.hybrid_context_parallel:
        raise PluginError("--plugins mla: --hybrid-context-parallel is not supported (it "
                          "needs packed sequences, which MLA does not take)")


def needed_by(args: argparse.Namespace) -> str | None:
    if getattr(args, "transformer_impl", None) != "local":
        return None
    if getattr(args, "multi_latent_attention", False):
        return ("--multi-latent-attention with --transformer-impl local needs --plugins mla "
                "(Megatron's own MLA does not build with the local spec: its core attention "
                "rejects k_channels/v_channels)")
    if recompute_granularity(args) == "selective" and "layernorm" in (args.recompute_modules or ()):
        return ("--recompute-modules layernorm with --transformer-impl local needs --plugins "
                "mla (Megatron 0.19.2's own layernorm recomputation calls Transformer Engine "
                "and fails at the first forward without it; the mla plugin's layers recompute "
                "their norms themselves); otherwise leave layernorm out of --recompute-modules")
    return None


def transform_layer_spec(config: MLAPluginConfig, layer_spec):
    from plugins.mla.spec import with_mla

    return with_mla(layer_spec)


def fixes(config: MLAPluginConfig):
    """The record of Megatron's layernorm recomputation, which the plugin's layers do
    themselves (`upstream.transformer`: it changes nothing), where the run asks for it."""
    from upstream.patching import applicable
    from upstream.transformer import MLA_LAYERNORM_RECOMPUTE

    return applicable((MLA_LAYERNORM_RECOMPUTE,), config)


MLA = Plugin(
    name="mla",
    summary="DeepSeek-V3 Multi-head Latent Attention with selective recompute, no TE needed",
    config=MLAPluginConfig,
    check=check,
    overrides=overrides,
    needed_by=needed_by,
    transform_layer_spec=transform_layer_spec,
    fixes=fixes,
    # The attention, the layer's two norms (RMSNorms that support sequence parallelism)
    # and the layer module itself (for selective recomputation).
    slots=frozenset({"self_attention", "input_layernorm", "pre_mlp_layernorm",
                     "transformer_layer"}),
    transformer_engine=TransformerEngine(
        composes=False,
        effect="its layers are local modules with the plugin's own RMSNorms, while the MLP "
               "of TE's dense layers normalises inside TE's fused layernorm-linear: each "
               "dense layer would be normalised twice, with an extra weight",
        gives_up="TE's fused attention (cuDNN, flash) and fused layernorm-linears in every "
                 "layer, and TE's FP8 in attention (FP8 comes from --plugins fp8 instead)"),
)
