"""DeepSeek-V3's MoE layer as Megatron's `mlp` submodule of MoE layers.

    tokens -> router (sigmoid, bias for choosing, group/node-limited top-k)
           -> dispatch to the experts' EP ranks (all-to-all; FP8 with 1x128 power-of-two
              scales when asked; optionally node-aware two-hop)
           -> this rank's routed experts (the spec's `experts` slot: SwiGLU, stacked
              weights; given the dispatched FP8 bytes too, which they may use)
           -> combine (reverse all-to-all in the training dtype, weighted by the gates)
           + shared experts (Megatron's SharedExpertMLP)

No token is dropped. Each forward in training counts the tokens each expert received;
after every optimizer step the plugin all-reduces those counts over the ranks that see
different tokens (data-parallel, which include the expert-parallel ones, context-parallel,
and tensor-parallel under sequence parallelism) and moves the expert bias toward balance
(`plugins.moe.balance`), then logs the load statistics.

Split sequences: under context parallelism, and under sequence parallelism (tensor-
parallel ranks hold different rows of [s, b, h]), this rank holds only s of each
sequence's tokens. Routing is per token and needs nothing more; the sequence-wise loss
sums its expert counts over those ranks (`sequence_group`) so that it is the whole
sequence's, and the router weight is summed over the tensor-parallel ranks by Megatron.

Process groups are those of the `pg_collection` Megatron passes to the layer (parallel_state's
when it is built without one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.spec_utils import build_module

from plugins.common.experts import LocalExperts
from plugins.common.groups import process_groups
from plugins.moe import dispatch as ep
from plugins.moe.balance import expert_load, sequence_balance_loss
from plugins.moe.router import DeepSeekRouter, RouterConfig


@dataclass
class DeepSeekMoESubmodules:
    shared_experts: Any = None  # Megatron's shared-expert builder (from its MoE spec)
    # This rank's routed experts: (config, num_local_experts, hidden, ffn, pg_collection=)
    # -> a module called as experts(tokens, counts, tokens_fp8=None), `tokens_fp8` the
    # dispatched FP8 bytes (or None), which an expert module may use or ignore.
    experts: Any = LocalExperts


# The process groups the layer uses (ProcessGroupCollection's names).
GROUPS = ("ep", "tp", "cp", "tp_cp", "dp_cp_gtp_remat", "tp_dp_cp", "expt_tp", "expt_dp")


def router_config(config) -> RouterConfig:
    return RouterConfig(
        num_experts=config.num_moe_experts, top_k=config.moe_router_topk,
        num_groups=config.moe_router_num_groups or 1,
        group_top_k=config.moe_router_group_topk or 1,
        scaling_factor=config.moe_router_topk_scaling_factor or 1.0, normalize=True)


def sequence_group(config, groups):
    """The ranks holding parts of the same sequences as this one in the MoE layer: the
    context-parallel group, and the tensor-parallel ranks too under sequence parallelism
    (without it they hold the same tokens)."""
    return groups.tp_cp if config.sequence_parallel else groups.cp


def load_group(config, groups):
    """Every rank that sees other tokens than this one, over which the expert loads are
    summed for the bias update: data-parallel (EP is carved from it) and context-parallel
    ranks, and tensor-parallel ones under sequence parallelism only (without it they see
    the same tokens, and summing would count them TP times)."""
    return groups.tp_dp_cp if config.sequence_parallel else groups.dp_cp_gtp_remat


class DeepSeekMoE(MegatronModule):
    def __init__(self, config, submodules: DeepSeekMoESubmodules, pg_collection=None,
                 fp8_dispatch: bool = False, ranks_per_node: int | None = None, **unused):
        super().__init__(config)
        groups = process_groups(pg_collection, GROUPS)
        self.ep_group = groups.ep
        ep_size = self.ep_group.size()
        self.router = DeepSeekRouter(config.hidden_size, router_config(config),
                                     dtype=config.params_dtype)
        # Replicated over TP, but under sequence parallelism each TP rank's gradient is from
        # its own tokens only: the attribute makes Megatron sum it over TP, as it does for
        # its own router and layernorms (megatron-core 0.19.2, core/distributed/
        # finalize_model_grads.py:452 in _allreduce_non_tensor_model_parallel_grads).
        self.router.weight.sequence_parallel = config.sequence_parallel
        self.experts = build_module(submodules.experts, config, config.num_moe_experts // ep_size,
                                    config.hidden_size, config.moe_ffn_hidden_size,
                                    pg_collection=groups)
        self.shared_experts = None
        if config.moe_shared_expert_intermediate_size:
            self.shared_experts = submodules.shared_experts(
                config=config, pg_collection=groups, gate=False)
        self.fp8_dispatch, self.ranks_per_node = fp8_dispatch, ranks_per_node
        self.sequence_group = sequence_group(config, groups)
        self.load_group = load_group(config, groups)
        # Complementary sequence-wise balance loss (off unless Megatron's
        # --moe-router-load-balancing-type seq_aux_loss with --moe-aux-loss-coeff).
        balancing = config.moe_router_load_balancing_type
        coeff = config.moe_aux_loss_coeff
        self.seq_aux_loss_coeff = 0.0
        if "seq_aux_loss" in (balancing if isinstance(balancing, list) else [balancing]):
            self.seq_aux_loss_coeff = float(coeff[0] if isinstance(coeff, list) else coeff)
        # Tokens per expert since the last optimizer step (this rank's tokens).
        self.register_buffer("tokens_per_expert",
                             torch.zeros(config.num_moe_experts, dtype=torch.float32),
                             persistent=False)

    def forward(self, hidden_states: torch.Tensor, **unused: Any):
        shape = hidden_states.shape                                    # [s, b, h]
        tokens = hidden_states.reshape(-1, shape[-1])                 # [T, h]
        indices, gates, scores = self.router(tokens)                  # [T, K], [T, K], [T, E]
        if self.training:
            self.tokens_per_expert += expert_load(indices, self.router.config.num_experts)
        sent = ep.dispatch(tokens, indices, self.router.config.num_experts, self.ep_group,
                           fp8=self.fp8_dispatch, ranks_per_node=self.ranks_per_node)
        sent_fp8 = (sent.fp8_q, sent.fp8_scales) if self.fp8_dispatch else None
        expert_out = self.experts(sent.tokens, sent.tokens_per_expert, sent_fp8)
        routed = ep.combine(expert_out, sent, gates.to(tokens.dtype), self.ep_group)
        output = routed.view(shape)
        if self.training and self.seq_aux_loss_coeff > 0:
            s, b = shape[:2]  # rows are [s, b] sequence-major; the loss wants batch-major
            by_sequence = lambda t: t.view(s, b, -1).transpose(0, 1).reshape(s * b, -1)  # noqa: E731
            # s is this rank's part of each sequence (CP: chunks r and 2cp-1-r; SP: a
            # 1/tp slice); the loss is this rank's share of the whole sequences' loss.
            loss = sequence_balance_loss(by_sequence(scores), by_sequence(indices),
                                         self.router.config.num_experts,
                                         self.router.config.top_k, s, self.seq_aux_loss_coeff,
                                         group=self.sequence_group)
            # Megatron's way of adding an auxiliary loss: its gradient joins in backward.
            # The shares' gradients add up to the whole sequence's as Megatron reduces the
            # router weight (megatron-core 0.19.2): summed over TP under SP (see above);
            # averaged over DP x CP by DDP (distributed_data_parallel.py:212), which the
            # scale Megatron gives this backward cancels for CP (cp / micro-batches,
            # pipeline_parallel/schedules.py:361). So the router weight gets the mean over
            # DP replicas of the whole-sequence loss's gradient, as with one rank per replica.
            # With --calculate-per-token-loss the scale is 1, DDP sums, and every gradient
            # is then divided by the global token count (finalize_model_grads.py:694),
            # num_microbatches x DP x (tokens of this micro-batch's whole sequences): so
            # the loss is multiplied by the latter, leaving the same 1 / (micro-batches x
            # DP) as above (Megatron's router does likewise, moe/router.py:633).
            if self.config.calculate_per_token_loss:
                loss = loss * (tokens.shape[0] * self.sequence_group.size())
            output = MoEAuxLossAutoScaler.apply(output, loss)
        if self.shared_experts is not None:
            output = output + self.shared_experts(hidden_states)
        return output, None
