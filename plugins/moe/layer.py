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

Auxiliary losses (the sequence-wise balance loss, Megatron's router z-loss) join backward
through Megatron's `MoEAuxLossAutoScaler` and are recorded in Megatron's MoE metrics
tracker, so that its log line shows them (divided by their coefficients, as for its own
router). Like Megatron's router, the layer counts tokens and takes its losses only in a
forward that backward will use: in training, with grad mode on. A recomputed forward
(Megatron's checkpoint, for `--recompute-modules moe` or `--recompute-granularity full`)
runs first without grad, then again with grad in backward: counted once, in backward.

Recomputation (`--recompute-granularity selective`): `moe` reruns the whole layer in
backward (its all-to-alls too: every EP rank recomputes its layers in the same order, as
the schedule runs backward in the same order everywhere), `shared_experts` the shared
experts' MLP, and `moe_act` the routed experts' activation (`plugins.common.experts`).

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

from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    save_to_aux_losses_tracker,
    z_loss_func,
)
from megatron.core.transformer.spec_utils import build_module

from plugins.common.experts import LocalExperts
from plugins.common.groups import process_groups
from plugins.common.statistics import declare_step_statistic
from plugins.moe import dispatch as ep
from plugins.moe.balance import expert_load, sequence_balance_loss
from plugins.moe.router import DeepSeekRouter, RouterConfig


@dataclass
class DeepSeekMoESubmodules:
    shared_experts: Any = None  # Megatron's shared-expert builder (from its MoE spec)
    # This rank's routed experts: (config, num_local_experts, hidden, ffn, pg_collection=)
    # -> a module called as experts(tokens, counts, tokens_fp8=None), `tokens_fp8` the
    # dispatched FP8 bytes (or None), which an expert module may use or ignore. An expert
    # module with a `token_multiple` gets each expert's rows zero-padded to a multiple of
    # it by the dispatch (its GEMMs' alignment; the padding rows' outputs are dropped).
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


def recomputed_modules(config) -> set[str]:
    """The `--recompute-modules` in force (none unless the granularity is selective)."""
    if config.recompute_granularity != "selective":
        return set()
    return set(config.recompute_modules or ())


class DeepSeekMoE(MegatronModule):
    # Megatron's MoE layer in the layer's `mlp` slot: recomputed by `--recompute-modules
    # moe`, not by `mlp` (upstream.moe tells Megatron's TransformerLayer).
    is_moe_layer = True

    def __init__(self, config, submodules: DeepSeekMoESubmodules, pg_collection=None,
                 fp8_dispatch: bool = False, ranks_per_node: int | None = None,
                 is_mtp_layer: bool = False, **unused):
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
        # --moe-router-dtype fp32: the gates weigh the experts' outputs in fp32 (routing is
        # always fp32); otherwise they are rounded to the training dtype first, as Megatron.
        self.gates_dtype = torch.float32 if config.moe_router_dtype == "fp32" else None
        self.experts = build_module(submodules.experts, config, config.num_moe_experts // ep_size,
                                    config.hidden_size, config.moe_ffn_hidden_size,
                                    pg_collection=groups)
        self.shared_experts = None
        if config.moe_shared_expert_intermediate_size:
            self.shared_experts = submodules.shared_experts(
                config=config, pg_collection=groups, gate=config.moe_shared_expert_gate)
        self.fp8_dispatch, self.ranks_per_node = fp8_dispatch, ranks_per_node
        self.sequence_group = sequence_group(config, groups)
        self.load_group = load_group(config, groups)
        recompute = recomputed_modules(config)
        self.recompute_layer = "moe" in recompute
        self.recompute_shared_experts = "shared_experts" in recompute
        # Complementary sequence-wise balance loss (off unless Megatron's
        # --moe-router-load-balancing-type seq_aux_loss with --moe-aux-loss-coeff), and
        # Megatron's router z-loss (--moe-z-loss-coeff).
        balancing = config.moe_router_load_balancing_type
        coeff = config.moe_aux_loss_coeff
        self.seq_aux_loss_coeff = 0.0
        if "seq_aux_loss" in (balancing if isinstance(balancing, list) else [balancing]):
            self.seq_aux_loss_coeff = float(coeff[0] if isinstance(coeff, list) else coeff)
        self.z_loss_coeff = float(config.moe_z_loss_coeff or 0.0)
        # Where the losses are logged: Megatron's TransformerLayer gives the layer number
        # (`set_layer_number`); MTP layers come after the decoder's, as in Megatron's router.
        self.layer_number: int | None = None
        self.is_mtp_layer = is_mtp_layer
        # A repeated MTP layer runs --mtp-num-layers times per step: each run takes its share.
        self.loss_share = 1.0
        if is_mtp_layer and config.mtp_use_repeated_layer and config.mtp_num_layers:
            self.loss_share = 1.0 / config.mtp_num_layers
        # Tokens per expert since the last optimizer step (this rank's tokens).
        self.register_buffer("tokens_per_expert",
                             torch.zeros(config.num_moe_experts, dtype=torch.float32),
                             persistent=False)
        declare_step_statistic(self, "tokens_per_expert")

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def forward(self, hidden_states: torch.Tensor, **unused: Any):
        if self.recompute_layer and self.training:
            output = tensor_parallel.checkpoint(self._forward, False, hidden_states)
        else:
            output = self._forward(hidden_states)
        return output, None

    def _forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape                                    # [s, b, h]
        tokens = hidden_states.reshape(-1, shape[-1])                 # [T, h]
        logits = self.router.logits(tokens)                           # [T, E], fp32
        indices, gates, scores = self.router.choose(logits)          # [T, K], [T, K], [T, E]
        # A forward backward will use (not evaluation, not the first, gradient-free run of
        # a recomputed forward): count and take the losses, once per micro-batch.
        used_by_backward = self.training and torch.is_grad_enabled()
        if used_by_backward:
            self.tokens_per_expert += expert_load(indices, self.router.config.num_experts)
        sent = ep.dispatch(tokens, indices, self.router.config.num_experts, self.ep_group,
                           fp8=self.fp8_dispatch, ranks_per_node=self.ranks_per_node,
                           pad_to=getattr(self.experts, "token_multiple", 1))
        sent_fp8 = (sent.fp8_q, sent.fp8_scales) if self.fp8_dispatch else None
        expert_out = self.experts(sent.tokens, sent.tokens_per_expert, sent_fp8)
        routed = ep.combine(expert_out, sent, gates.to(self.gates_dtype or tokens.dtype),
                            self.ep_group)
        output = routed.view(shape)
        if used_by_backward:
            output = self._with_auxiliary_losses(output, logits, scores, indices, shape)
        if self.shared_experts is not None:
            if self.recompute_shared_experts and self.training:
                shared = tensor_parallel.checkpoint(self.shared_experts, False, hidden_states)
            else:
                shared = self.shared_experts(hidden_states)
            output = output + shared
        return output

    def _with_auxiliary_losses(self, output, logits, scores, indices, shape):
        """`output` carrying this rank's share of the auxiliary losses into backward
        (Megatron's way of adding one); each is recorded for Megatron's MoE log line."""
        losses = []
        if self.seq_aux_loss_coeff > 0:
            s, b = shape[:2]  # rows are [s, b] sequence-major; the loss wants batch-major
            by_sequence = lambda t: t.view(s, b, -1).transpose(0, 1).reshape(s * b, -1)  # noqa: E731
            # s is this rank's part of each sequence (CP: chunks r and 2cp-1-r; SP: a
            # 1/tp slice); the loss is this rank's share of the whole sequences' loss.
            loss = sequence_balance_loss(by_sequence(scores), by_sequence(indices),
                                         self.router.config.num_experts,
                                         self.router.config.top_k, s, self.seq_aux_loss_coeff,
                                         group=self.sequence_group) * self.loss_share
            # The shares sum to the whole sequences' loss over the sequence group.
            self._record("seq_load_balancing_loss", loss / self.seq_aux_loss_coeff,
                         reduce_group=self.sequence_group)
            losses.append(loss)
        if self.z_loss_coeff > 0:
            # Megatron's router z-loss, coeff * mean over tokens of logsumexp(logits)^2
            # (moe_utils.py z_loss_func), over the sequence group's tokens: this rank holds
            # 1/G of them, so its share is its own mean / G.
            share = self.z_loss_coeff / self.sequence_group.size()
            loss = z_loss_func(logits, share) * self.loss_share
            # Logged as Megatron does: this rank's mean, averaged over every rank.
            self._record("z_loss", loss / share, avg_group=self.load_group)
            losses.append(loss)
        if not losses:
            return output
        loss = sum(losses)
        # The shares' gradients add up to the whole loss's as Megatron reduces the router
        # weight (megatron-core 0.19.2): summed over TP under SP (see above); averaged over
        # DP x CP by DDP (distributed_data_parallel.py:212), which the scale Megatron gives
        # this backward cancels for CP (cp / micro-batches, pipeline_parallel/
        # schedules.py:361). So the router weight gets the mean over DP replicas of the
        # whole-sequence loss's gradient, as with one rank per replica.
        # With --calculate-per-token-loss the scale is 1, DDP sums, and every gradient is
        # then divided by the global token count (finalize_model_grads.py:694),
        # num_microbatches x DP x (tokens of this micro-batch's whole sequences): so the
        # loss is multiplied by the latter, leaving the same 1 / (micro-batches x DP) as
        # above (Megatron's router does likewise, moe/router.py:633).
        if self.config.calculate_per_token_loss:
            loss = loss * (logits.shape[0] * self.sequence_group.size())
        return MoEAuxLossAutoScaler.apply(output, loss)

    def _record(self, name: str, value: torch.Tensor, reduce_group=None, avg_group=None):
        """Into Megatron's MoE metrics tracker, which training_log reports (mean over
        micro-batches, MoE layers and data-parallel replicas; per layer with
        --moe-per-layer-logging)."""
        if self.layer_number is None:  # built outside a TransformerLayer: nowhere to log
            return
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        layer = self.layer_number + (self.config.num_layers if self.is_mtp_layer else 0)
        save_to_aux_losses_tracker(name, value, layer, num_layers,
                                   reduce_group=reduce_group, avg_group=avg_group)
