"""After each optimizer step: expert-bias update and load statistics (auxiliary-loss-free
balancing, DeepSeek-V3 section 2.1.2)."""

from __future__ import annotations


from megatron.core import parallel_state

from plugins.moe.balance import global_load, imbalance, update_expert_bias
from plugins.moe.layer import DeepSeekMoE


class BiasUpdate:
    """Called after every successful optimizer step with the model chunks' MoE layers."""

    def __init__(self, args, model_chunks) -> None:
        self.rate = args.moe_router_bias_update_rate
        self.log_interval = args.log_interval
        # Simulated or real nodes of the EP group, for the per-node share of routed tokens.
        ranks_per_node = args.moe_dispatch_ranks_per_node or args.expert_model_parallel_size
        self.nodes = args.expert_model_parallel_size // ranks_per_node
        self.layers = [m for chunk in model_chunks for m in chunk.modules()
                       if isinstance(m, DeepSeekMoE)]
        # Every rank that sees different tokens: data-parallel (EP is carved from it) and
        # context-parallel ranks, and tensor-parallel ranks under sequence parallelism
        # only: without it they see the same tokens, and summing would count them TP times.
        if args.sequence_parallel:
            self.group = parallel_state.get_tensor_and_data_parallel_group(
                with_context_parallel=True)
        else:
            self.group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.steps = 0

    def loads(self) -> list:
        """Each layer's tokens per expert [E] since the last step, over the global batch."""
        return [global_load(layer.tokens_per_expert, self.group) for layer in self.layers]

    def __call__(self) -> None:
        self.steps += 1
        stats = []
        for layer, load in zip(self.layers, self.loads()):
            update_expert_bias(layer.router.e_score_correction_bias, load, self.rate)
            layer.tokens_per_expert.zero_()
            per_node = load.view(self.nodes, -1).sum(-1)
            stats.append((imbalance(load).item(), layer.router.e_score_correction_bias,
                          (per_node / per_node.sum()).tolist()))
        if self.steps % self.log_interval == 0 and stats:
            self._log(stats)

    def _log(self, stats) -> None:
        from megatron.training import get_tensorboard_writer, print_rank_0

        writer = get_tensorboard_writer()
        parts = []
        for i, (max_over_mean, bias, node_share) in enumerate(stats):
            shares = "/".join(f"{share:.2f}" for share in node_share)
            parts.append(f"moe layer {i}: load max/mean {max_over_mean:.3f} "
                         f"bias [{bias.min().item():+.4f}, {bias.max().item():+.4f}] "
                         f"tokens per node {shares}")
            if writer is not None:
                writer.add_scalar(f"moe/layer{i}/load_max_over_mean", max_over_mean, self.steps)
                writer.add_scalar(f"moe/layer{i}/bias_abs_max", bias.abs().max().item(), self.steps)
        print_rank_0(" | ".join(parts))
