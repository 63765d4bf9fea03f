"""After each optimizer step: expert-bias update and load statistics (auxiliary-loss-free
balancing, DeepSeek-V3 section 2.1.2)."""

from __future__ import annotations

import torch

from plugins.moe.balance import global_load, imbalance, update_expert_bias
from plugins.moe.layer import DeepSeekMoE


class BiasUpdate:
    """Called after every successful optimizer step, with the iteration that step completed
    (Megatron's count, which continues across a resume), for the model chunks' MoE layers.

    The update stays on the device: one all-reduce of every layer's loads, then the biases.
    Statistics come to the host only on logging steps (iteration % --log-interval == 0).
    """

    def __init__(self, config, model_chunks) -> None:
        """`config`: the moe plugin's `MoEPluginConfig`."""
        self.rate = config.moe_router_bias_update_rate
        self.log_interval = config.log_interval
        # Simulated or real nodes of the EP group, for the per-node share of routed tokens.
        ep = config.expert_model_parallel_size
        self.nodes = ep // (config.moe_dispatch_ranks_per_node or ep)
        self.layers = [m for chunk in model_chunks for m in chunk.modules()
                       if isinstance(m, DeepSeekMoE)]
        groups = {layer.load_group for layer in self.layers}
        if len(groups) > 1:
            raise ValueError("the MoE layers sum their expert loads over different process "
                             "groups; one all-reduce cannot serve them all")
        self.group = groups.pop() if groups else None

    def loads(self) -> torch.Tensor:
        """Each layer's tokens per expert since the last step, over the global batch:
        [layers, E]."""
        return global_load(torch.stack([layer.tokens_per_expert for layer in self.layers]),
                           self.group)

    def __call__(self, iteration: int) -> None:
        if not self.layers:
            return
        loads = self.loads()
        for layer, load in zip(self.layers, loads):
            update_expert_bias(layer.router.e_score_correction_bias, load, self.rate)
            layer.tokens_per_expert.zero_()
        if iteration % self.log_interval == 0:
            self._log(loads, iteration)

    def _log(self, loads: torch.Tensor, iteration: int) -> None:
        from megatron.training import get_tensorboard_writer, print_rank_0

        writer = get_tensorboard_writer()
        parts = []
        for i, (layer, load) in enumerate(zip(self.layers, loads)):
            bias = layer.router.e_score_correction_bias
            max_over_mean = imbalance(load).item()
            per_node = load.view(self.nodes, -1).sum(-1)
            shares = "/".join(f"{share:.2f}" for share in (per_node / per_node.sum()).tolist())
            parts.append(f"moe layer {i}: load max/mean {max_over_mean:.3f} "
                         f"bias [{bias.min().item():+.4f}, {bias.max().item():+.4f}] "
                         f"tokens per node {shares}")
            if writer is not None:
                writer.add_scalar(f"moe/layer{i}/load_max_over_mean", max_over_mean, iteration)
                writer.add_scalar(f"moe/layer{i}/bias_abs_max", bias.abs().max().item(),
                                  iteration)
        print_rank_0(" | ".join(parts))
