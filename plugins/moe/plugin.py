"""The `moe` plugin: `--plugins moe` with Megatron's MoE flags (DeepSeek-V3's router)."""

from __future__ import annotations

import argparse

from plugins import Plugin, PluginError


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--moe-fp8-dispatch", action="store_true", default=False,
                       help="send tokens to the experts in FP8 E4M3 with one power-of-two "
                            "scale per 1x128 tile (the combine stays in the training dtype)")
    group.add_argument("--moe-dispatch-ranks-per-node", type=int, default=None,
                       help="node-aware two-hop dispatch: ranks per node of the expert-"
                            "parallel group (a token crosses to each target node once)")


def validate(args: argparse.Namespace) -> None:
    from plugins.moe.router import RouterConfig

    if not args.num_experts:
        raise PluginError("--plugins moe needs --num-experts")
    if args.moe_router_score_function != "sigmoid":
        raise PluginError("--plugins moe routes with sigmoid affinities: add "
                          "--moe-router-score-function sigmoid")
    if not args.moe_router_enable_expert_bias:
        raise PluginError("--plugins moe balances with the expert bias: add "
                          "--moe-router-enable-expert-bias (and --moe-router-bias-update-rate)")
    balancing = args.moe_router_load_balancing_type
    balancing = set(balancing if isinstance(balancing, list) else [balancing])
    if balancing - {"none", "seq_aux_loss"}:
        raise PluginError("--plugins moe: --moe-router-load-balancing-type must be none or "
                          "seq_aux_loss (DeepSeek-V3 has no global auxiliary loss)")
    coeff = args.moe_aux_loss_coeff
    coeff = coeff[0] if isinstance(coeff, list) else coeff
    if "seq_aux_loss" in balancing and not coeff:
        raise PluginError("--moe-router-load-balancing-type seq_aux_loss needs "
                          "--moe-aux-loss-coeff (DeepSeek-V3 uses a small one, e.g. 1e-4)")
    ep = args.expert_model_parallel_size
    if args.num_experts % ep:
        raise PluginError(f"--plugins moe: --num-experts {args.num_experts} is not divisible "
                          f"by --expert-model-parallel-size {ep}")
    if (args.expert_tensor_parallel_size or 1) != 1:
        raise PluginError("--plugins moe: experts are not tensor-parallel; use "
                          "--expert-tensor-parallel-size 1")
    try:
        RouterConfig(num_experts=args.num_experts, top_k=args.moe_router_topk,
                     num_groups=args.moe_router_num_groups or 1,
                     group_top_k=args.moe_router_group_topk or 1,
                     scaling_factor=args.moe_router_topk_scaling_factor or 1.0).validate()
    except ValueError as error:
        raise PluginError(f"--plugins moe: {error}") from error
    if args.moe_fp8_dispatch and args.hidden_size % 128:
        raise PluginError(f"--moe-fp8-dispatch needs --hidden-size a multiple of 128 "
                          f"(got {args.hidden_size})")
    if args.moe_dispatch_ranks_per_node and ep % args.moe_dispatch_ranks_per_node:
        raise PluginError(f"--moe-dispatch-ranks-per-node {args.moe_dispatch_ranks_per_node} "
                          f"must divide --expert-model-parallel-size {ep}")


def transform_layer_spec(layer_spec, args):
    from plugins.moe.spec import with_deepseek_moe

    return with_deepseek_moe(layer_spec, args)


def on_optimizer_step(args, model_chunks, optimizer):
    from plugins.moe.hooks import BiasUpdate

    return BiasUpdate(args, model_chunks)


MOE = Plugin(
    name="moe",
    summary="DeepSeek-V3 MoE: sigmoid group-limited router, aux-loss-free balancing, "
            "EP all-to-all dispatch in FP8",
    add_arguments=add_arguments,
    validate=validate,
    transform_layer_spec=transform_layer_spec,
    on_optimizer_step=on_optimizer_step,
    slots=frozenset({"mlp"}),
)
