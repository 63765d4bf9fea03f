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
                            "operands, any device), 'auto' (torch where available)")


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
    tp = args.tensor_model_parallel_size
    ffn = args.ffn_hidden_size or 4 * args.hidden_size
    for flag, size in (("--hidden-size", args.hidden_size), ("--ffn-hidden-size", ffn)):
        if size % (BLOCK * tp):
            raise PluginError(f"--plugins fp8: {flag} {size} must be a multiple of "
                              f"{BLOCK} x --tensor-model-parallel-size ({BLOCK * tp}) for "
                              "128x128 weight blocks on every TP rank")
    tokens = args.seq_length * args.micro_batch_size
    if tokens % BLOCK:
        raise PluginError(f"--plugins fp8: --seq-length x --micro-batch-size = {tokens} tokens "
                          f"per micro-batch must be a multiple of {BLOCK} (Wgrad tiles 128 "
                          "tokens)")
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


MOE_FP8_NEEDS_TE = "if self.num_moe_experts and self.fp8:"


def install(args: argparse.Namespace, patcher) -> None:
    """megatron/core/transformer/transformer_config.py:2294-2300 (megatron-core 0.19.2)
    refuses FP8 with MoE unless Transformer Engine >= 1.7 is installed; with this plugin
    the experts' FP8 GEMMs are megaseek's (plugins.moe), so that gate is lifted for the
    run. Megatron's other FP8 checks stay."""
    if not args.num_experts:
        return
    from megatron.core.transformer.transformer_config import TransformerConfig

    from integration.patching import rewrite_function, source_has

    if source_has(TransformerConfig.__post_init__, MOE_FP8_NEEDS_TE):
        patcher.setattr(TransformerConfig, "__post_init__", rewrite_function(
            TransformerConfig, "__post_init__",
            {MOE_FP8_NEEDS_TE: "if False:  # lifted by plugins.fp8: the experts' FP8 is not TE's"}))


def transform_layer_spec(layer_spec, args):
    from plugins.fp8.spec import with_fp8_linears

    return with_fp8_linears(layer_spec, args.fp8_backend, swiglu=args.swiglu)


FP8 = Plugin(
    name="fp8",
    summary="DeepSeek-V3 fine-grained FP8 GEMMs (1x128 / 128x128 scales) without TE",
    add_arguments=add_arguments,
    validate=validate,
    transform_layer_spec=transform_layer_spec,
    install=install,
    slots=frozenset({"linear_gemm"}),
)
