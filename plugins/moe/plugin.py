"""The `moe` plugin: `--plugins moe` with Megatron's MoE flags (DeepSeek-V3's router).

Every MoE flag of Megatron is either honoured by the plugin's layer or refused at start-up
by name, with the reason (`validate`): nothing is ignored quietly.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from plugins import Plugin, PluginError, TransformerEngine
from plugins.config import flag, megatron
from plugins.common.flags import Refusal, first_refused, recompute_granularity


@dataclass(frozen=True)
class MoEPluginConfig:
    """The moe plugin's flags, and the Megatron arguments its hooks and fixes read."""

    moe_fp8_dispatch: bool = flag(
        "--moe-fp8-dispatch", False, action="store_true",
        help="send tokens to the experts in FP8 E4M3 with one power-of-two scale per 1x128 "
             "tile (the combine stays in the training dtype)")
    moe_dispatch_ranks_per_node: int | None = flag(
        "--moe-dispatch-ranks-per-node", None, type=int,
        help="node-aware two-hop dispatch: ranks per node of the expert-parallel group (a "
             "token crosses to each target node once)")
    moe_router_bias_update_rate: float = megatron("moe_router_bias_update_rate", 0.0)
    expert_model_parallel_size: int = megatron("expert_model_parallel_size", 1)
    log_interval: int = megatron("log_interval", 100)
    recompute_granularity: str | None = megatron("recompute_granularity",
                                                  derive=recompute_granularity)
    recompute_modules: tuple | None = megatron("recompute_modules")


_DISPATCHER = ("the plugin dispatches tokens with its own all-to-all (--moe-fp8-dispatch, "
               "--moe-dispatch-ranks-per-node), not Megatron's token dispatchers")
_NO_DROPPING = ("DeepSeek-V3 drops no tokens: the plugin sends every token to all its "
                "experts, with no capacity")
_GATE = "the plugin's router is DeepSeek-V3's sigmoid gate, which has no such option"
_EXPERTS = ("the plugin's routed experts are its own SwiGLU experts (stacked weights, one "
            "grouped GEMM per projection), not Megatron's")
_UPCYCLING = "upcycling writes Megatron's expert layout, not the plugin's stacked experts"
_SHARED = "the shared experts are Megatron's local MLP, not TE's grouped one"
_TRACER = "Megatron's routing tracer hooks only its own router"
_PADDING = "the plugin's experts (FP8 ones too) take any number of tokens: nothing to pad"


def flag(dest: str) -> str:
    """Megatron's flag of an argparse dest."""
    return "--" + dest.replace("_", "-")


def _refused(dest: str, default, why: str) -> Refusal:
    """Megatron's flag `dest`, honoured at its default only."""
    return dest, flag(dest), (default,), why


# Megatron's MoE flags that the plugin's layer does not implement (or only some values of),
# and why: any other value is refused at start-up.
REFUSED: tuple[Refusal, ...] = (
    # Token dispatch
    _refused("moe_token_dispatcher_type", "allgather", _DISPATCHER),
    _refused("moe_enable_deepep", False, _DISPATCHER),
    _refused("moe_flex_dispatcher_backend", "deepep", _DISPATCHER),
    _refused("moe_flex_dispatcher_num_sms", None, _DISPATCHER),
    _refused("moe_deepep_num_sms", None, _DISPATCHER),
    _refused("moe_hybridep_num_sms", None, _DISPATCHER),
    _refused("moe_hybridep_num_blocks_permute", None, _DISPATCHER),
    _refused("moe_hybridep_num_blocks_unpermute", None, _DISPATCHER),
    _refused("moe_hybridep_num_sms_preprocessing", 108, _DISPATCHER),
    _refused("moe_hybridep_pad_uneven_dispatch_inputs", False, _DISPATCHER),
    _refused("moe_permute_fusion_into_hybridep", False, _DISPATCHER),
    _refused("moe_ncclep_static_shape", False, _DISPATCHER),
    _refused("moe_ncclep_zero_copy", False, _DISPATCHER),
    _refused("moe_permute_fusion", False, _DISPATCHER + " (nor TE's fused permutation)"),
    _refused("overlap_moe_expert_parallel_comm", False, _DISPATCHER),
    _refused("overlap_dispatch_backward_with_experts_wgrad", False, _DISPATCHER),
    _refused("moe_shared_expert_overlap", False, "the shared experts run after the combine, "
                                                 "not overlapped with Megatron's dispatcher"),
    # Token dropping
    _refused("moe_expert_capacity_factor", None, _NO_DROPPING),
    _refused("moe_expert_rank_capacity_factor", None, _NO_DROPPING),
    _refused("moe_pad_expert_input_to_capacity", False, _NO_DROPPING),
    _refused("moe_token_drop_policy", "probs", _NO_DROPPING),
    _refused("moe_pad_experts_for_cuda_graph_inference", False, _NO_DROPPING),
    # Router
    _refused("moe_router_pre_softmax", False, _GATE + " (it is a softmax option; the sigmoid "
                                                      "scores are normalized over the chosen "
                                                      "experts)"),
    _refused("moe_input_jitter_eps", None, _GATE),
    _refused("moe_router_force_load_balancing", False, _GATE),
    _refused("moe_router_force_biased", None, _GATE),
    _refused("moe_router_quantile_balancing_ema", 0.0, "it is for --moe-router-load-balancing-"
                                                       "type quantile_balancing, which the "
                                                       "plugin refuses"),
    _refused("moe_enable_routing_replay", False, _GATE + " (routing is not recorded or "
                                                         "replayed)"),
    _refused("moe_router_fusion", False, _GATE + " (nor TE's fused top-k)"),
    ("moe_router_dtype", "--moe-router-dtype", (None, "fp32"), "the router computes in fp32"),
    _refused("moe_router_padding_for_quantization", False, _PADDING),
    _refused("moe_router_padding_for_fp8", False, _PADDING),
    _refused("moe_routing_trace_path", None, _TRACER),
    _refused("moe_routing_trace_max_training_iters", None, _TRACER),
    _refused("moe_routing_trace_capture_logits", False, _TRACER),
    _refused("moe_routing_trace_capture_hidden_states", False, _TRACER),
    _refused("moe_routing_trace_dump_weights", False, _TRACER),
    # Experts
    _refused("moe_grouped_gemm", False, _EXPERTS + ": they always run grouped "
                                                   "(torch._grouped_mm); drop the flag"),
    _refused("moe_single_grouped_weight", False, _EXPERTS),
    _refused("moe_single_grouped_bias", False, _EXPERTS),
    _refused("moe_mlp_glu_interleave_size", None, _EXPERTS + " (gate and up halves, not "
                                                             "interleaved)"),
    _refused("moe_apply_probs_on_input", False, "the gates weigh the experts' outputs, as in "
                                                "DeepSeek-V3"),
    _refused("moe_latent_size", None, _EXPERTS + " (no latent projections)"),
    _refused("moe_paged_stash", False, _EXPERTS),
    _refused("moe_paged_stash_page_size", 64, _EXPERTS),
    _refused("moe_paged_stash_buffer_size_factor_cuda", 1.1, _EXPERTS),
    _refused("moe_paged_stash_buffer_size_factor_cpu", 0.0, _EXPERTS),
    _refused("save_tokens_per_expert_interval", None, _EXPERTS + "; their loads are logged "
                                                      "after each optimizer step instead"),
    ("expert_tensor_parallel_num_weight_shards", "--expert-tensor-parallel-num-weight-shards",
     (None, 1), _EXPERTS + " (not sharded)"),
    _refused("use_grouped_gemm_for_shared_expert", False, _SHARED),
    _refused("moe_shared_expert_glu_interleave_size", None, _SHARED),
    # Checkpoint conversion
    _refused("moe_use_upcycling", False, _UPCYCLING),
    _refused("moe_upcycling_granularity", 1, _UPCYCLING),
)


def _one(value, what: str):
    """A Megatron `nargs='+'` value (a list until validate_args makes one item a scalar)."""
    if not isinstance(value, list):
        return value
    if len(value) != 1:
        raise PluginError(f"--plugins moe: {what} takes one value, got "
                          f"{' '.join(map(str, value))}")
    return value[0]


def _positive(args: argparse.Namespace, dest: str, what: str = "") -> None:
    value = getattr(args, dest)
    if value is not None and not value > 0:
        raise PluginError(f"{flag(dest)} must be > 0, got {value}{what}")


def check(config: MoEPluginConfig, args) -> None:
    from plugins.moe.router import RouterConfig

    if args.num_experts is None:
        raise PluginError("--plugins moe needs --num-experts")
    if args.num_experts < 1:
        raise PluginError(f"--num-experts {args.num_experts} must be 1 or more")
    # The expert TP size follows --tensor-model-parallel-size where it is not given
    # (arguments.py:569), and validate_args derives the expert weight shards from it.
    if args.expert_tensor_parallel_size is None and args.tensor_model_parallel_size != 1:
        raise PluginError("--plugins moe: experts are not tensor-parallel, and "
                          "--expert-tensor-parallel-size follows --tensor-model-parallel-size "
                          f"{args.tensor_model_parallel_size} where it is not given: give "
                          "--expert-tensor-parallel-size 1")
    if (args.expert_tensor_parallel_size or 1) != 1:
        raise PluginError("--plugins moe: experts are not tensor-parallel; give "
                          "--expert-tensor-parallel-size 1")
    refused = first_refused(args, REFUSED)
    if refused:
        raise PluginError(f"--plugins moe: {refused}")
    if args.moe_router_score_function != "sigmoid":
        raise PluginError("--plugins moe routes with sigmoid affinities: add "
                          "--moe-router-score-function sigmoid")
    if not args.moe_router_enable_expert_bias:
        raise PluginError("--plugins moe balances with the expert bias: add "
                          "--moe-router-enable-expert-bias (and --moe-router-bias-update-rate)")
    if args.moe_router_bias_update_rate < 0:
        raise PluginError(f"--moe-router-bias-update-rate must be >= 0 (a negative rate moves "
                          f"the bias away from balance), got {args.moe_router_bias_update_rate}")

    # Balance loss: none, or DeepSeek-V3's complementary sequence-wise loss.
    balancing = _one(args.moe_router_load_balancing_type, "--moe-router-load-balancing-type")
    coeff = _one(args.moe_aux_loss_coeff, "--moe-aux-loss-coeff")
    if balancing not in ("none", "seq_aux_loss"):
        raise PluginError("--plugins moe: --moe-router-load-balancing-type must be none or "
                          "seq_aux_loss (DeepSeek-V3 has no global auxiliary loss)")
    if coeff < 0:
        raise PluginError(f"--moe-aux-loss-coeff must be >= 0, got {coeff}")
    if balancing == "seq_aux_loss" and not coeff:
        raise PluginError("--moe-router-load-balancing-type seq_aux_loss needs "
                          "--moe-aux-loss-coeff (DeepSeek-V3 uses a small one, e.g. 1e-4)")
    if balancing == "none" and coeff:
        raise PluginError(f"--moe-aux-loss-coeff {coeff} has no loss to weigh: add "
                          "--moe-router-load-balancing-type seq_aux_loss, or leave it out")
    _positive(args, "moe_z_loss_coeff", " (leave it out for no z-loss)")

    # Sizes
    _positive(args, "moe_ffn_hidden_size")
    _positive(args, "moe_shared_expert_intermediate_size", " (leave it out for no shared "
                                                           "experts)")
    _positive(args, "moe_router_topk_scaling_factor")
    ep = args.expert_model_parallel_size
    if args.num_experts % ep:
        raise PluginError(f"--plugins moe: --num-experts {args.num_experts} is not divisible "
                          f"by --expert-model-parallel-size {ep}")

    # Routing: group-limited when both group flags are given.
    groups, group_topk = args.moe_router_num_groups, args.moe_router_group_topk
    for dest in ("moe_router_num_groups", "moe_router_group_topk"):
        _positive(args, dest)
    if (groups is None) != (group_topk is None):
        raise PluginError("--moe-router-num-groups and --moe-router-group-topk go together "
                          "(group-limited routing: how many groups, how many a token uses)")
    try:
        RouterConfig(num_experts=args.num_experts, top_k=args.moe_router_topk,
                     num_groups=groups or 1, group_top_k=group_topk or 1,
                     scaling_factor=args.moe_router_topk_scaling_factor or 1.0).validate()
    except ValueError as error:
        raise PluginError(f"--plugins moe: {error}") from error

    if args.moe_layer_recompute and recompute_granularity(args) == "full":
        raise PluginError("--moe-layer-recompute is --recompute-modules moe of --recompute-"
                          "granularity selective; --recompute-granularity full recomputes "
                          "whole layers already: give one of them")

    # The plugin's own dispatch flags
    if config.moe_fp8_dispatch and args.hidden_size % 128:
        raise PluginError(f"--moe-fp8-dispatch needs --hidden-size a multiple of 128 "
                          f"(got {args.hidden_size})")
    per_node = config.moe_dispatch_ranks_per_node
    if per_node is not None and (per_node < 1 or ep % per_node):
        raise PluginError(f"--moe-dispatch-ranks-per-node {per_node} must be a positive "
                          f"divisor of --expert-model-parallel-size {ep}")


def needed_by(args: argparse.Namespace) -> str | None:
    """Megatron's grouped-expert flags with its local modules: its grouped experts are
    Transformer Engine's, so its local spec would ignore them (and its own check points
    to --moe-grouped-gemm, which needs TE)."""
    if getattr(args, "transformer_impl", None) != "local" or not args.num_experts:
        return None
    if args.moe_grouped_gemm:
        return ("--moe-grouped-gemm with --transformer-impl local is ignored by Megatron's "
                "experts (its grouped experts are Transformer Engine's): drop it, or use "
                "--plugins moe, whose experts always run grouped")
    if recompute_granularity(args) == "selective" and "moe_act" in (args.recompute_modules or ()):
        return ("--recompute-modules moe_act with --transformer-impl local needs --plugins moe "
                "(Megatron recomputes the activation of Transformer Engine's grouped experts "
                "only); otherwise leave moe_act out of --recompute-modules")
    return None


def transform_layer_spec(config: MoEPluginConfig, layer_spec):
    from plugins.moe.spec import with_deepseek_moe

    return with_deepseek_moe(layer_spec, config)


def on_optimizer_step(config: MoEPluginConfig, model_chunks, optimizer):
    from plugins.moe.hooks import BiasUpdate

    return BiasUpdate(config, model_chunks)


def fixes(config: MoEPluginConfig):
    from upstream.moe import FIXES
    from upstream.patching import applicable

    return applicable(FIXES, config)


MOE = Plugin(
    name="moe",
    summary="DeepSeek-V3 MoE: sigmoid group-limited router, aux-loss-free balancing, "
            "EP all-to-all dispatch in FP8",
    config=MoEPluginConfig,
    check=check,
    needed_by=needed_by,
    transform_layer_spec=transform_layer_spec,
    on_optimizer_step=on_optimizer_step,
    fixes=fixes,
    slots=frozenset({"mlp"}),
    transformer_engine=TransformerEngine(
        composes=False,
        effect="its routed experts are local modules that TE's FP8 recipe does not reach: "
               "under TE's FP8 they would run in BF16 while the shared experts (TE's "
               "linears) run in FP8",
        gives_up="TE's grouped-GEMM experts (--moe-grouped-gemm), fused permutation and "
                 "router (--moe-permute-fusion, --moe-router-fusion) and TE's FP8 in the "
                 "experts; the plugin's experts always run grouped (torch._grouped_mm), in "
                 "FP8 with --plugins fp8"),
)
