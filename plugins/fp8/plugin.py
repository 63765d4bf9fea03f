"""The `fp8` plugin: `--plugins fp8 --fp8-format e4m3 --fp8-recipe blockwise`."""

from __future__ import annotations

import argparse

from plugins import Plugin, PluginError

BLOCK = 128


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--fp8-backend", choices=["auto", "emulated", "torch", "triton"],
                       default="auto",
                       help="GEMM implementation of the fp8 plugin: 'torch' (block-scaled "
                            "torch._scaled_mm, sm90 GPUs), 'triton' (megaseek's kernel, FP8 "
                            "tensor cores), 'emulated' (exact FP32 product of the FP8 "
                            "operands, any device), 'auto' (torch on sm90, triton on other "
                            "sm89+ GPUs, else emulated)")
    group.add_argument("--fp8-cache-weights", action="store_true",
                       help="keep each weight's FP8 copy from its first use in a step until "
                            "the optimizer step, instead of quantizing it in every "
                            "micro-batch's forward and backward (costs 1 byte per weight)")


def validate(args: argparse.Namespace) -> None:
    from plugins.fp8 import backends

    if args.fp8 != "e4m3":
        raise PluginError("--plugins fp8 needs --fp8-format e4m3 (DeepSeek-V3 uses E4M3 for "
                          f"every tensor); got --fp8-format {args.fp8}")
    if args.fp8_recipe != "blockwise":
        raise PluginError("--plugins fp8 needs --fp8-recipe blockwise (1x128 activation and "
                          f"128x128 weight scales); got --fp8-recipe {args.fp8_recipe}")
    if args.transformer_impl != "local":
        raise PluginError("--plugins fp8 replaces Megatron's local linears: use "
                          "--transformer-impl local (Transformer Engine has its own FP8)")
    if args.gradient_accumulation_fusion:
        raise PluginError("--plugins fp8 needs --no-gradient-accumulation-fusion")
    for what, per_rank in _reduction_dims(args):
        if per_rank % BLOCK:
            raise PluginError(f"--plugins fp8: {what} gives {per_rank} per rank; it must be a "
                              f"multiple of {BLOCK} (an FP8 GEMM reduces over whole 1x128 / "
                              "128x128 tiles)")
    if args.swiglu:
        if args.bias_swiglu_fusion:
            raise PluginError("--plugins fp8 with --swiglu needs --no-bias-swiglu-fusion (the "
                              "fused kernel keeps its input in the training dtype)")
        # Megatron's seam for an activation module (no flag of its own; config fields are
        # filled from args by name): MLP then calls MLPSubmodules.activation_func, which
        # the spec transform sets to the SwiGLU that caches its input in FP8.
        args.use_te_activation_func = True
    try:
        args.fp8_backend = backends.resolve(args.fp8_backend)
    except ValueError as error:
        raise PluginError(str(error)) from error


def _reduction_dims(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(flags, size on one TP rank) of the dimension each FP8 linear of the model reduces
    over in Fprop. Output dims may be ragged (padded to whole blocks inside the layer);
    token counts too (Wgrad pads to whole 128-token tiles)."""
    tp = args.tensor_model_parallel_size
    per_tp = f" / --tensor-model-parallel-size {tp}" if tp > 1 else ""
    dims = [(f"--hidden-size {args.hidden_size}", args.hidden_size)]  # every input projection
    ffn = args.ffn_hidden_size or 4 * args.hidden_size
    dims.append((f"--ffn-hidden-size {ffn}{per_tp}", ffn // tp))  # fc2 (row-parallel)
    if args.multi_latent_attention:
        heads = args.num_attention_heads
        dims.append((f"--num-attention-heads {heads} x --v-head-dim {args.v_head_dim}{per_tp}",
                     heads * args.v_head_dim // tp))  # linear_proj
        dims.append((f"--kv-lora-rank {args.kv_lora_rank}", args.kv_lora_rank))  # kv up
        if args.q_lora_rank:
            dims.append((f"--q-lora-rank {args.q_lora_rank}", args.q_lora_rank))  # q up
    else:
        channels = args.kv_channels or args.hidden_size // args.num_attention_heads
        dims.append((f"--num-attention-heads {args.num_attention_heads} x --kv-channels "
                     f"{channels}{per_tp}", args.num_attention_heads * channels // tp))
    if args.num_experts:
        routed = args.moe_ffn_hidden_size or ffn
        dims.append((f"--moe-ffn-hidden-size {routed}", routed))  # expert fc2 (no expert TP)
        shared = args.moe_shared_expert_intermediate_size
        if shared:
            dims.append((f"--moe-shared-expert-intermediate-size {shared}{per_tp}", shared // tp))
    return dims


def fixes(args: argparse.Namespace):
    """Two of TransformerConfig's FP8 checks are about Transformer Engine's FP8, which this
    plugin replaces: lifted for the run where they apply (`upstream.transformer`)."""
    from upstream.patching import applicable
    from upstream.transformer import FP8_FIXES

    return applicable(FP8_FIXES, args)


def transform_layer_spec(layer_spec, args):
    from plugins.fp8.spec import with_fp8_linears

    return with_fp8_linears(layer_spec, args.fp8_backend, swiglu=args.swiglu,
                            cache_weights=args.fp8_cache_weights)


def on_optimizer_step(args, model_chunks, optimizer):
    """New weights after each successful step: cached FP8 copies are stale (whatever the
    iteration)."""
    from plugins.fp8.weight_cache import drop_fp8_weights

    def drop(iteration: int) -> None:
        drop_fp8_weights(model_chunks)

    return drop


FP8 = Plugin(
    name="fp8",
    summary="DeepSeek-V3 fine-grained FP8 GEMMs (1x128 / 128x128 scales) without TE",
    add_arguments=add_arguments,
    validate=validate,
    transform_layer_spec=transform_layer_spec,
    fixes=fixes,
    on_optimizer_step=on_optimizer_step,
    # Every linear slot's GEMM (the module classes it maps) and the MLPs' activation.
    slots=frozenset({"linear_gemm", "activation_func"}),
)
