"""DeepSeekMoE with its sequences split over ranks equals one rank holding them whole.

Two gloo ranks hold parts of the same micro-batch: tensor parallelism with sequence
parallelism (TP=2+SP: each rank a 1/2 slice of [s, b, h]) and context parallelism (CP=2:
chunks r and 3-r of 4, Megatron's load-balanced split). Against one rank with the whole
sequences they must give: the same outputs for the same tokens; the sequence-wise balance
loss, summed over the ranks; the router weight gradient after the reduction Megatron
applies to it; and the per-expert loads (and bias) of the auxiliary-loss-free update.
TP=2 without SP (both ranks hold all tokens) guards against summing where nothing is split.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers import backend
from tests.helpers.multirank import run_ranks

EXPERTS, HIDDEN, FFN, SEQ, BATCH = 8, 32, 16, 16, 2
# A large coefficient: the balance loss then moves the router gradient as much as the
# main loss does, so a wrong share of it shows far above the tolerance.
ALPHA = 0.5
# (rtol, atol) of outputs and router gradients, and of the balance loss, against one rank.
WHY_GPU = ("the router and expert GEMMs see each rank's share of the rows and cuBLAS picks "
           "its kernel by shape; combine and the load counts add rows atomically")
CLOSE = backend.tolerance(cpu=(1e-5, 1e-6), gpu=(1e-4, 1e-5), why=WHY_GPU)
LOSS = backend.tolerance(cpu=(1e-5, 0), gpu=(1e-4, 0), why=WHY_GPU)


def this_rank_part(full: torch.Tensor, sp: bool) -> torch.Tensor:
    """This rank's rows of a [s, b, ...] tensor, split as Megatron splits the sequence."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
    from megatron.core.utils import get_batch_on_this_cp_rank

    batch = {"cu_seqlens": None, "rows": full.transpose(0, 1)}  # [b, s, ...]
    part = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False,
                                     cp_group=parallel_state.get_context_parallel_group())
    part = part["rows"].transpose(0, 1)  # [s/cp, b, ...]: chunks r and 2cp-1-r
    if sp:
        part = scatter_to_sequence_parallel_region(part)  # [s/cp/tp, b, ...]
    return part.contiguous()


def moe_step(rank: int, world_size: int, tp: int, cp: int, sp: bool, per_token: bool = False):
    """One forward and backward of the MoE layer on this rank's part of the micro-batch,
    then the router gradient reduced as Megatron reduces it, and the bias update.
    `per_token`: Megatron's --calculate-per-token-loss reduction instead."""
    import torch.nn.functional as F

    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import (
        _allreduce_non_tensor_model_parallel_grads,
    )
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    import plugins.moe.layer as moe_layer
    from plugins.moe.hooks import BiasUpdate
    from tests.helpers.backend import device
    from tests.helpers.mla_build import megatron_ranks

    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(EXPERTS, 2 * FFN, HIDDEN, generator=g) / HIDDEN ** 0.5
    w2 = torch.randn(EXPERTS, HIDDEN, FFN, generator=g) / FFN ** 0.5
    router = torch.randn(EXPERTS, HIDDEN, generator=g) / HIDDEN ** 0.5
    bias = torch.randn(EXPERTS, generator=g) * 0.1
    # Tokens drawn around one direction per half of each sequence: the halves prefer
    # different experts, so a part's load (and the bias update it would give) is not the
    # whole sequence's.
    centres = 2 * torch.randn(2, BATCH, HIDDEN, generator=g)  # [halves, b, h]
    x_full = (torch.randn(SEQ, BATCH, HIDDEN, generator=g)
              + centres.repeat_interleave(SEQ // 2, dim=0))  # [s, b, h]
    grad_full = torch.randn(SEQ, BATCH, HIDDEN, generator=g)  # d(main loss)/d(output) * s*b
    positions = torch.arange(SEQ).view(SEQ, 1).expand(SEQ, BATCH)
    # Drawn on the CPU above (the same numbers on any device), used on this rank's device.
    x_full, grad_full, positions = (t.to(device()) for t in (x_full, grad_full, positions))

    with megatron_ranks(tp=tp, cp=cp):
        config = TransformerConfig(
            num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, num_moe_experts=EXPERTS,
            tensor_model_parallel_size=tp, context_parallel_size=cp, sequence_parallel=sp,
            expert_tensor_parallel_size=1, moe_router_topk=2, moe_router_num_groups=4,
            moe_router_group_topk=2, moe_router_topk_scaling_factor=2.5,
            moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
            moe_ffn_hidden_size=FFN, moe_shared_expert_intermediate_size=None,
            moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=ALPHA,
            add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
            use_cpu_initialization=True, calculate_per_token_loss=per_token)
        layer = moe_layer.DeepSeekMoE(config, moe_layer.DeepSeekMoESubmodules()).to(device())
        with torch.no_grad():
            layer.experts.weight1.copy_(w1)
            layer.experts.weight2.copy_(w2)
            layer.router.weight.copy_(router)
            layer.router.e_score_correction_bias.copy_(bias)

        losses = []  # the balance loss this rank adds, as the layer computes it
        balance_loss = moe_layer.sequence_balance_loss

        def recorded(*args, **kwargs):
            loss = balance_loss(*args, **kwargs)
            losses.append(loss.detach())
            return loss

        moe_layer.sequence_balance_loss = recorded

        x = this_rank_part(x_full, sp).requires_grad_()
        out, _ = layer(x)
        # The main loss is the micro-batch's mean over tokens of <output, grad_full>. Megatron
        # divides each CP rank's loss by its own token count (pipeline_parallel/schedules.py:
        # 334), cp times its share of the whole mean; under SP the loss is on all tokens of
        # every TP rank (the logits are gathered), and its gradient reaches each rank's rows.
        # The balance loss's backward is scaled by cp / micro-batches (schedules.py:361).
        # With --calculate-per-token-loss the loss is the sum over this rank's tokens and
        # the balance loss's scale is 1 (schedules.py:358).
        MoEAuxLossAutoScaler.set_loss_scale(
            torch.tensor(1.0 if per_token else float(cp), device=device()))
        out.backward(this_rank_part(grad_full, sp) * (1.0 if per_token else cp / (SEQ * BATCH)))

        # Megatron's reduction of the router weight: DDP averages over DP x CP (gradient
        # scaled by 1/dp_cp, then summed: distributed_data_parallel.py:212; per-token: only
        # summed), then finalize_model_grads sums the parameters marked sequence_parallel
        # over TP, and per-token divides by the global token count (finalize_model_grads.
        # py:694; one DP replica, one micro-batch here: SEQ * BATCH).
        weight = layer.router.weight
        dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
        if not per_token:
            weight.grad /= dp_cp.size()
        torch.distributed.all_reduce(weight.grad, group=dp_cp)
        layer.ddp_config = DistributedDataParallelConfig()
        _allreduce_non_tensor_model_parallel_grads(
            [layer], config, parallel_state.get_tensor_model_parallel_group())
        if per_token:
            weight.grad /= SEQ * BATCH

        args = SimpleNamespace(moe_router_bias_update_rate=1e-2, log_interval=10 ** 6,
                               moe_dispatch_ranks_per_node=None, expert_model_parallel_size=1,
                               sequence_parallel=sp)
        hook = BiasUpdate(args, [layer])
        (load,) = hook.loads()
        hook(1)  # Megatron's iteration
        return dict(out=out.detach(), positions=this_rank_part(positions, sp),
                    loss=losses[0], router_grad=weight.grad.clone(), load=load,
                    bias=layer.router.e_score_correction_bias.clone())


@pytest.fixture(scope="module")
def whole():
    (ref,) = run_ranks(moe_step, 1, 1, 1, False)
    return ref


@pytest.mark.parametrize("tp, cp", [(2, 1), (1, 2)], ids=["tp2-sp", "cp2"])
def test_split_sequences_equal_whole_sequences(whole, tp, cp):
    ranks = run_ranks(moe_step, tp * cp, tp, cp, tp > 1)
    # Outputs: each token is routed and computed alone, whatever rank holds it; fp32 expert
    # GEMMs over other numbers of rows may block the sums differently (a few ulps).
    for r in ranks:
        want = whole["out"][r["positions"], torch.arange(BATCH)]
        backend.assert_close(r["out"], want, CLOSE)
    # The balance loss: the ranks' shares sum to the whole sequences' loss (fp32, summed
    # in another order: a few ulps).
    backend.assert_close(sum(r["loss"] for r in ranks), whole["loss"], LOSS)
    # The router gradient after Megatron's reduction: the same on every rank, and the
    # whole sequences'. fp32 sums of the same terms in another order: entries reach ~2,
    # so a few ulps of the largest (2.4e-7) bound the error of the small ones.
    for r in ranks:
        backend.assert_close(r["router_grad"], whole["router_grad"], CLOSE)
    # The loads are integer counts: exact, and so the bias update too.
    for r in ranks:
        assert torch.equal(r["load"], whole["load"]), (r["load"], whole["load"])
        assert torch.equal(r["bias"], whole["bias"])


def test_tensor_parallel_without_sp_counts_each_token_once(whole):
    """Without SP both TP ranks hold all tokens: each computes the whole loss and gradient,
    Megatron does not sum the router gradient over TP, and the loads are not summed."""
    for r in run_ranks(moe_step, 2, 2, 1, False):
        backend.assert_close(r["out"], whole["out"], CLOSE)
        backend.assert_close(r["loss"], whole["loss"], LOSS)
        backend.assert_close(r["router_grad"], whole["router_grad"], CLOSE)
        assert torch.equal(r["load"], whole["load"]) and torch.equal(r["bias"], whole["bias"])


@pytest.mark.parametrize("tp, cp", [(1, 1), (2, 1), (1, 2)], ids=["one-rank", "tp2-sp", "cp2"])
def test_per_token_loss_reduction_gives_the_same_router_gradient(whole, tp, cp):
    """--calculate-per-token-loss reduces gradients differently (sums, then divides by the
    global token count); the balance loss is scaled so its gradient is unchanged."""
    for r in run_ranks(moe_step, tp * cp, tp, cp, tp > 1, True):
        backend.assert_close(r["router_grad"], whole["router_grad"], CLOSE)
