"""DeepSeek-V3's MoE layer as Megatron's `mlp` submodule of MoE layers.

    tokens -> router (sigmoid, bias for choosing, group/node-limited top-k)
           -> dispatch to the experts' EP ranks (all-to-all; FP8 with 1x128 power-of-two
              scales when asked; optionally node-aware two-hop)
           -> local routed experts (SwiGLU)
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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule

from plugins.moe import dispatch as ep
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from plugins.moe.balance import expert_load, sequence_balance_loss
from plugins.moe.experts import LocalExperts
from plugins.moe.router import DeepSeekRouter, RouterConfig


@dataclass
class DeepSeekMoESubmodules:
    shared_experts: Any = None  # Megatron's shared-expert builder (from its MoE spec)


def router_config(config) -> RouterConfig:
    return RouterConfig(
        num_experts=config.num_moe_experts, top_k=config.moe_router_topk,
        num_groups=config.moe_router_num_groups or 1,
        group_top_k=config.moe_router_group_topk or 1,
        scaling_factor=config.moe_router_topk_scaling_factor or 1.0, normalize=True)


def sequence_group(config, pg_collection=None):
    """The ranks holding parts of the same sequences as this one in the MoE layer: the
    context-parallel group, and the tensor-parallel ranks too under sequence parallelism
    (without it they hold the same tokens)."""
    if config.sequence_parallel:
        if pg_collection is not None:
            return pg_collection.tp_cp
        return parallel_state.get_tensor_and_context_parallel_group()
    if pg_collection is not None:
        return pg_collection.cp
    return parallel_state.get_context_parallel_group()


class DeepSeekMoE(MegatronModule):
    def __init__(self, config, submodules: DeepSeekMoESubmodules, pg_collection=None,
                 fp8_dispatch: bool = False, ranks_per_node: int | None = None,
                 fp8_backend: str | None = None, fp8_cache_weights: bool = False, **unused):
        super().__init__(config)
        self.ep_group = parallel_state.get_expert_model_parallel_group()
        ep_size = self.ep_group.size()
        self.router = DeepSeekRouter(config.hidden_size, router_config(config),
                                     dtype=config.params_dtype)
        # Replicated over TP, but under sequence parallelism each TP rank's gradient is from
        # its own tokens only: the attribute makes Megatron sum it over TP, as it does for
        # its own router and layernorms (megatron-core 0.19.2, core/distributed/
        # finalize_model_grads.py:452 in _allreduce_non_tensor_model_parallel_grads).
        self.router.weight.sequence_parallel = config.sequence_parallel
        self.experts = LocalExperts(config, config.num_moe_experts // ep_size,
                                    config.hidden_size, config.moe_ffn_hidden_size,
                                    fp8_backend=fp8_backend,
                                    fp8_cache_weights=fp8_cache_weights)
        self.shared_experts = None
        if config.moe_shared_expert_intermediate_size:
            self.shared_experts = submodules.shared_experts(
                config=config, pg_collection=pg_collection, gate=False)
        self.fp8_dispatch, self.ranks_per_node = fp8_dispatch, ranks_per_node
        self.sequence_group = sequence_group(config, pg_collection)
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
        dispatched_fp8 = (sent.fp8_q, sent.fp8_scales) if sent.fp8_q is not None else None
        expert_out = self.experts(sent.tokens, sent.tokens_per_expert, dispatched_fp8)
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
