"""The `fp8` plugin: `--plugins fp8 --fp8-format e4m3 --fp8-recipe blockwise`.

With `--transformer-impl local` no Megatron module reads its FP8 flags: only this plugin
gives them a meaning, so `--fp8-format` without it is refused (`needed_by`), and so are the
FP8 flags of Transformer Engine's recipes that have no meaning for DeepSeek-V3's block
scales, with or without the plugin (`NOT_HONOURED`).
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass

from plugins import Plugin, PluginError, TransformerEngine
from plugins.config import flag, megatron
from plugins.common.flags import (Refusal, first_refused, recompute_granularity,
                                  weights_sharded_past_tp)
from plugins.fp8.slots import EXCLUDABLE

BLOCK = 128

_NO_TE = "Transformer Engine's; Megatron's local modules ignore it, and the fp8 plugin "
# Megatron's FP8 flags that only Transformer Engine's modules read: refused when set to
# anything but Megatron's default (`plugins.common.flags`).
NOT_HONOURED: tuple[Refusal, ...] = (
    ("fp8_margin", "--fp8-margin", (0,),
     "a margin of Transformer Engine's delayed scaling; the fp8 plugin scales every 1x128 "
     "tile and 128x128 block by its own current amax, as DeepSeek-V3 does, with no margin"),
    ("fp8_interval", "--fp8-interval", (1,),
     "how often Transformer Engine's delayed scaling updated its scales (ignored since TE "
     "1.8); the fp8 plugin's block scales are computed for every tensor"),
    ("fp8_amax_history_len", "--fp8-amax-history-len", (1,),
     "the amax history of Transformer Engine's delayed scaling; the fp8 plugin's block "
     "scales come from the tile's current amax, with no history"),
    ("fp8_amax_compute_algo", "--fp8-amax-compute-algo", ("most_recent",),
     "how Transformer Engine's delayed scaling reads its amax history; the fp8 plugin's block "
     "scales come from the tile's current amax, with no history"),
    ("fp8_quantizer_factory", "--fp8-quantizer-factory", (None,),
     "Transformer Engine's custom recipe; Megatron's local modules ignore it, and the fp8 "
     "plugin has its own (1x128 / 128x128 block scales)"),
    ("fp8_wgrad", "--no-fp8-wgrad", (True,),
     "the fp8 plugin runs Wgrad in FP8, as DeepSeek-V3 does, and keeps the layer input for "
     "backward in FP8 only"),
    ("fp8_output_proj", "--fp8-output-proj", (False,),
     _NO_TE + "keeps the output head in the training dtype, as DeepSeek-V3 does"),
    ("fp8_param_gather", "--fp8-param-gather", (False,),
     _NO_TE + "keeps weights in the training dtype and quantizes them where they are used "
     "(--fp8-cache-weights holds the FP8 copies through a step)"),
    ("keep_fp8_transpose_cache", "--keep-fp8-transpose-cache", (False,),
     _NO_TE + "keeps no FP8 parameters"),
    ("reuse_grad_buf_for_mxfp8_param_ag", "--reuse-grad-buf-for-mxfp8-param-ag", (False,),
     _NO_TE + "has no MXFP8 parameters"),
    ("first_last_layers_bf16", "--first-last-layers-bf16", (False,),
     "not implemented by the fp8 plugin: every transformer layer's linears run in FP8, as in "
     "DeepSeek-V3"),
    ("num_layers_at_start_in_bf16", "--num-layers-at-start-in-bf16", (1,),
     "it sizes --first-last-layers-bf16, which the fp8 plugin does not implement"),
    ("num_layers_at_end_in_bf16", "--num-layers-at-end-in-bf16", (1,),
     "it sizes --first-last-layers-bf16, which the fp8 plugin does not implement"),
    ("te_precision_config_file", "--te-precision-config-file", (None,),
     _NO_TE + "sets the precision of every linear of the layer itself"),
)


def _weights_sharded_past_tp(args: argparse.Namespace) -> str | None:
    """The refusal of GTP weight sharding where a flag asks for it: Megatron's linears
    gather a GTP-sharded weight inside their GEMM, the fp8 plugin's GEMM does not. (Its
    other keywords the FP8 GEMM leaves unused, grad_output_buffer and
    wgrad_deferral_limit, are --defer-embedding-wgrad-compute's, which megaseek refuses for
    Megatron's local linears whatever the plugins: `integration.argument_checks`.)"""
    sharded = weights_sharded_past_tp(args)
    if sharded is None:
        return None
    return (f"{sharded.flag} {sharded.shards} is not supported with --plugins fp8: it shards "
            f"each weight over more ranks than {sharded.ranks_flag} {sharded.ranks} (GTP), to "
            "be gathered inside Megatron's linear GEMM (gtp_remat_size, "
            "tensor_parallel/layers.py:517), and the fp8 plugin's GEMM takes the weight as it "
            f"is held; drop {sharded.flag}")


def _refused_flag(args: argparse.Namespace) -> str | None:
    if args.transformer_impl != "local":
        return None  # Transformer Engine's modules read them
    return first_refused(args, NOT_HONOURED)


@dataclass(frozen=True)
class FP8PluginConfig:
    """The fp8 plugin's flags, and the Megatron arguments its hooks and fixes read."""

    fp8_backend: str = flag(
        "--fp8-backend", "auto", choices=["auto", "emulated", "torch", "triton"],
        help="GEMM implementation of the fp8 plugin: 'torch' (block-scaled "
             "torch._scaled_mm, sm90 GPUs), 'triton' (megaseek's kernel, FP8 tensor cores), "
             "'emulated' (exact FP32 product of the FP8 operands, any device), 'auto' "
             "(torch on sm90, triton on other sm89+ GPUs, else emulated)")
    fp8_exclude_modules: list = flag(
        "--fp8-exclude-modules", [], nargs="+", metavar="SLOT",
        help="linear slots kept in the training dtype, by Megatron's submodule name, "
             "everything under them included (e.g. linear_kv_up_proj: MLA's kv "
             "up-projection, [32768, 512] at DeepSeek-V3's shape, expected slower in FP8 "
             "than BF16 at K=512); one of " + ", ".join(EXCLUDABLE) + ". Default: none, "
             "every linear in FP8, until a GPU measures where FP8 does not pay")
    fp8_cache_weights: bool = flag(
        "--fp8-cache-weights", False, action="store_true",
        help="keep each weight's FP8 copy from its first use in a step until the optimizer "
             "step, instead of quantizing it in every micro-batch's forward and backward "
             "(costs 2 bytes per weight: W for forward, W^T for backward)")
    swiglu: bool = megatron("swiglu", False)
    fp16: bool = megatron("fp16", False)
    loss_scale: float | None = megatron("loss_scale")
    num_experts: int | None = megatron("num_experts")
    recompute_granularity: str | None = megatron("recompute_granularity",
                                                  derive=recompute_granularity)
    recompute_modules: list | None = megatron("recompute_modules")

    @functools.cached_property
    def backend(self) -> str:
        """The GEMM backend --fp8-backend resolves to on this machine (`check` has
        refused one that cannot run here)."""
        from plugins.fp8 import backends

        return backends.resolve(self.fp8_backend)


def check(config: FP8PluginConfig, args) -> None:
    refused = _refused_flag(args) or _weights_sharded_past_tp(args)
    if refused:
        raise PluginError(refused)
    unknown = [name for name in config.fp8_exclude_modules if name not in EXCLUDABLE]
    if unknown:
        raise PluginError(f"--fp8-exclude-modules {' '.join(unknown)}: unknown; choose from "
                          f"{', '.join(EXCLUDABLE)}")
    if args.fp8 != "e4m3":
        raise PluginError("--plugins fp8 needs --fp8-format e4m3 (DeepSeek-V3 uses E4M3 for "
                          f"every tensor); got --fp8-format {args.fp8}")
    if args.fp8_recipe != "blockwise":
        raise PluginError("--plugins fp8 needs --fp8-recipe blockwise (1x128 activation and "
                          f"128x128 weight scales); got --fp8-recipe {args.fp8_recipe}")
    # --gradient-accumulation-fusion (Megatron's default) is honoured: FP8 Wgrad adds into
    # main_grad (`plugins.fp8.linear.MainGrad`); Megatron's own linears still need apex.
    graphs = _cuda_graph_flag(args)
    if graphs:
        raise PluginError(
            f"--plugins fp8 cannot run under CUDA graphs ({graphs}): a captured step would "
            "replay the FP8 weight cache's host-side decision whether a weight is already "
            "quantized this step, and replays are not checked against eager FP8 on a GPU "
            "yet; use --cuda-graph-impl none")
    for what, per_rank in _reduction_dims(args):
        if per_rank % BLOCK:
            raise PluginError(f"--plugins fp8: {what} gives {per_rank} per rank; it must be a "
                              f"multiple of {BLOCK} (an FP8 GEMM reduces over whole 1x128 / "
                              "128x128 tiles)")
    if config.swiglu and args.bias_swiglu_fusion:
        raise PluginError("--plugins fp8 with --swiglu needs --no-bias-swiglu-fusion (the "
                          "fused kernel keeps its input in the training dtype)")
    try:
        config.backend
    except ValueError as error:
        raise PluginError(str(error)) from error


def overrides(config: FP8PluginConfig) -> dict:
    """Megatron's seam for an activation module (no flag of its own; config fields are
    filled from args by name): MLP then calls MLPSubmodules.activation_func, which the spec
    transform sets to the SwiGLU that caches its input in FP8."""
    return {"use_te_activation_func": True} if config.swiglu else {}


def _cuda_graph_flag(args: argparse.Namespace) -> str | None:
    """The flag that turns Megatron's training CUDA graphs on, if given (`--enable-cuda-graph`
    and `--external-cuda-graph` are its deprecated spellings of `--cuda-graph-impl`)."""
    for deprecated in ("enable_cuda_graph", "external_cuda_graph"):
        if getattr(args, deprecated, False):
            return "--" + deprecated.replace("_", "-")
    impl = getattr(args, "cuda_graph_impl", "none")
    return None if impl == "none" else f"--cuda-graph-impl {impl}"


def needed_by(args: argparse.Namespace) -> str | None:
    """Without the plugin, Megatron's local modules ignore every FP8 flag: the run would
    train in full precision."""
    if getattr(args, "transformer_impl", None) != "local":
        return None
    refused = _refused_flag(args)
    if refused:
        return refused
    if args.fp8 is not None:
        return (f"--fp8-format {args.fp8} with --transformer-impl local needs --plugins fp8 "
                "(Megatron's local modules ignore FP8: the run would train in full precision); "
                "the plugin takes --fp8-format e4m3 --fp8-recipe blockwise")
    if args.fp8_recipe != "delayed":  # Megatron's default
        return (f"--fp8-recipe {args.fp8_recipe} does nothing without --fp8-format e4m3 "
                "and --plugins fp8")
    return None


def _reduction_dims(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(flags, size on one TP rank) of the dimension each FP8 linear of the model reduces
    over in Fprop. Output dims may be ragged (padded to whole blocks inside the layer);
    token counts too (Wgrad pads to whole 128-token tiles)."""
    tp = args.tensor_model_parallel_size
    per_tp = f" / --tensor-model-parallel-size {tp}" if tp > 1 else ""
    dims = [(f"--hidden-size {args.hidden_size}", args.hidden_size)]  # every input projection
    ffn = args.ffn_hidden_size or _megatron_ffn_hidden_size(args)
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


def _megatron_ffn_hidden_size(args) -> int:
    """--ffn-hidden-size's default, as Megatron's validation derives it (arguments.py:1280):
    the checks run before it."""
    if args.swiglu:
        return int((4 * args.hidden_size * 2 / 3) / 64) * 64
    return 4 * args.hidden_size


def fixes(config: FP8PluginConfig):
    """Where Megatron hands FP8 to Transformer Engine, which this plugin replaces: two of
    TransformerConfig's FP8 checks, lifted, and the recomputation of full layers and MLPs,
    which checkpoint as in BF16 (`upstream.transformer`), each for the run where it
    applies."""
    from upstream.patching import applicable
    from upstream.transformer import FP8_FIXES

    return applicable(FP8_FIXES, config)


def transform_layer_spec(config: FP8PluginConfig, layer_spec):
    from plugins.fp8.spec import with_fp8_linears

    return with_fp8_linears(layer_spec, config.backend, swiglu=config.swiglu,
                            cache_weights=config.fp8_cache_weights,
                            exclude=tuple(config.fp8_exclude_modules))


def before_gradient_checks(config: FP8PluginConfig, model_chunks):
    """Reads every FP8 module's inf/NaN flags once the step's backward passes are done
    (`plugins.fp8.non_finite`; one transfer for the whole model) and fails the step naming
    each module, pass and operand, and the iteration. Under fp16 with Megatron's dynamic
    loss scaler an overflow in backward is the scaler's to handle: those flags are cleared
    and the step goes on to Megatron's skip (the gradients they entered are inf or NaN)."""
    from plugins.fp8.non_finite import FPROP, found_in, named_flags

    named = named_flags(model_chunks)
    loss_scaled = bool(config.fp16) and not config.loss_scale  # Megatron's DynamicGradScaler

    def check(iteration: int) -> None:
        found = found_in(named)
        failing = [f for f in found if f[1] == FPROP or not loss_scaled]
        if failing:
            raise NonFiniteFP8Operand(failing, iteration)
        flags = dict(named)
        for name, _, _ in found:  # backward overflows, left to the loss scaler
            flags[name].clear()

    return check


class NonFiniteFP8Operand(ValueError):
    """An FP8 operand held inf or NaN: the step fails (`before_gradient_checks`)."""

    def __init__(self, found: list[tuple[str, str, str]], iteration: int) -> None:
        where = "; ".join(f"{name}: the {operand} of {pass_}" for name, pass_, operand in found)
        super().__init__(f"fp8: non-finite values (inf or NaN) in FP8 operands at iteration "
                         f"{iteration}: {where}")


def on_optimizer_step(config: FP8PluginConfig, model_chunks, optimizer):
    """New weights after each successful step: cached FP8 copies are stale (whatever the
    iteration). Called once the model is built: says which linears run in FP8."""
    from megatron.training.utils import print_rank_0

    from plugins.fp8.modules import fp8_census
    from plugins.fp8.slots import absent_slots_problem
    from plugins.fp8.weight_cache import drop_fp8_weights

    absent = absent_slots_problem(config.fp8_exclude_modules, model_chunks)
    if absent:  # which slots a model has is known once it is built (its specs, its stage)
        raise PluginError(absent)
    print_rank_0(fp8_census(model_chunks, config.fp8_exclude_modules))

    def drop(iteration: int) -> None:
        drop_fp8_weights(model_chunks)

    return drop


FP8 = Plugin(
    name="fp8",
    summary="DeepSeek-V3 fine-grained FP8 GEMMs (1x128 / 128x128 scales) without TE",
    config=FP8PluginConfig,
    check=check,
    overrides=overrides,
    needed_by=needed_by,
    transform_layer_spec=transform_layer_spec,
    fixes=fixes,
    before_gradient_checks=before_gradient_checks,
    on_optimizer_step=on_optimizer_step,
    # Every linear slot's GEMM (the module classes it maps) and the MLPs' activation.
    slots=frozenset({"linear_gemm", "activation_func"}),
    transformer_engine=TransformerEngine(
        composes=False,
        effect="it replaces the GEMMs of Megatron's local linears; TE's linears run TE's own "
               "FP8 (--fp8-format and --fp8-recipe without the plugin, TE's blockwise recipe "
               "included)",
        gives_up="TE's FP8 recipes (delayed, tensorwise, mxfp8, TE's blockwise), FP8 "
                 "parameters (--fp8-param-gather) and TE's fused kernels"),
)
