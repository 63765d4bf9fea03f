"""DeepSeekMoE as Megatron builds it: EP=2 and EP=4 equal EP=1 (routed output, gradients,
bias update and load statistics), with and without FP8 dispatch."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import backend
from tests.helpers.multirank import run_ranks

EXPERTS, HIDDEN, FFN, TOKENS = 8, 128, 32, 16  # tokens per rank


def moe_step(rank: int, world_size: int, fp8: bool, fp8_experts: bool = False):
    """Every rank holds its own tokens; returns its outputs, input and weight gradients,
    and the bias after one update from the global load. `fp8_experts`: the experts' slot
    holds the fp8 plugin's experts, which take the dispatched FP8 bytes."""
    import torch.nn.functional as F

    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import ModuleSpec

    from plugins.common.experts import LocalExperts
    from plugins.fp8.modules import FP8LocalExperts
    from plugins.moe.balance import global_load, imbalance, update_expert_bias
    from plugins.moe.layer import DeepSeekMoE, DeepSeekMoESubmodules
    from tests.helpers.backend import device
    from tests.helpers.mla_build import megatron_ranks

    ffn = 128 if fp8_experts else FFN  # fc2 in FP8 reduces over whole 128-wide tiles
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(EXPERTS, 2 * ffn, HIDDEN, generator=g) / HIDDEN ** 0.5
    w2 = torch.randn(EXPERTS, HIDDEN, ffn, generator=g) / ffn ** 0.5
    router = torch.randn(EXPERTS, HIDDEN, generator=g) / HIDDEN ** 0.5
    bias = torch.randn(EXPERTS, generator=g) * 0.1
    all_tokens = torch.randn(4 * TOKENS, 1, HIDDEN, generator=g).to(device())  # EP <= 4 ranks'
    with megatron_ranks(ep=world_size):
        config = TransformerConfig(
            num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, num_moe_experts=EXPERTS,
            moe_router_topk=2, moe_router_num_groups=4, moe_router_group_topk=2,
            moe_router_topk_scaling_factor=2.5, moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True, moe_ffn_hidden_size=ffn,
            moe_shared_expert_intermediate_size=None, expert_model_parallel_size=world_size,
            add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
            use_cpu_initialization=True, moe_router_load_balancing_type="none")
        spec = get_moe_module_spec_for_backend(LocalSpecProvider(), EXPERTS)
        experts = (ModuleSpec(module=FP8LocalExperts, params={"fp8_backend": "emulated"})
                   if fp8_experts else LocalExperts)
        layer = DeepSeekMoE(config, DeepSeekMoESubmodules(
            spec.keywords["submodules"].shared_experts, experts=experts), fp8_dispatch=fp8)
        layer = layer.to(device())
        local = slice(rank * EXPERTS // world_size, (rank + 1) * EXPERTS // world_size)
        with torch.no_grad():
            layer.experts.weight1.copy_(w1[local])
            layer.experts.weight2.copy_(w2[local])
            layer.router.weight.copy_(router)
            layer.router.e_score_correction_bias.copy_(bias)
        mine = slice(rank * 4 * TOKENS // world_size, (rank + 1) * 4 * TOKENS // world_size)
        x = all_tokens[mine].clone().requires_grad_()
        out, _ = layer(x)
        out.backward(torch.ones_like(out))
        load = global_load(layer.tokens_per_expert, torch.distributed.group.WORLD)
        new_bias = update_expert_bias(layer.router.e_score_correction_bias.clone(), load, 1e-2)
        return (out.detach(), x.grad, layer.experts.weight1.grad, layer.experts.weight2.grad,
                layer.router.weight.grad, new_bias, imbalance(load))


@pytest.mark.parametrize("fp8, fp8_experts", [(False, False), (True, False), (True, True)],
                         ids=["bf16-dispatch", "fp8-dispatch", "fp8-dispatch-fp8-experts"])
@pytest.mark.parametrize("ep", [2, 4])
def test_expert_parallel_equals_one_rank(ep, fp8, fp8_experts):
    (ref,) = run_ranks(moe_step, 1, fp8, fp8_experts)
    ranks = run_ranks(moe_step, ep, fp8, fp8_experts)
    out = torch.cat([r[0] for r in ranks])
    dx = torch.cat([r[1] for r in ranks])
    # Expert weights: each rank has its slice; the router weight gradient is this rank's
    # tokens' part, summed over ranks (what data-parallel all-reduce does).
    w1 = torch.cat([r[2] for r in ranks])
    w2 = torch.cat([r[3] for r in ranks])
    router = sum(r[4] for r in ranks)
    # fp32: only the summation order differs (per-rank sums, all-to-all ordering); FP8
    # dispatch quantizes each token identically on any rank (per-token 1x128 tiles), and
    # an expert receives its tokens in the same order at any EP (by source rank, then
    # token), so its Wgrad's 128-token tiles hold the same tokens.
    tol = backend.tolerance(cpu=(1e-5, 1e-5), gpu=(1e-4, 1e-4),
                            why="the router's GEMM sees each rank's share of the tokens and "
                                "cuBLAS picks its kernel by shape; combine adds rows atomically")
    for got, want in ((out, ref[0]), (dx, ref[1]), (w1, ref[2]), (w2, ref[3]),
                      (router, ref[4])):
        backend.assert_close(got, want, tol)
    for r in ranks:  # global load: the same bias update and statistics everywhere
        assert torch.equal(r[5], ref[5]) and torch.equal(r[6], ref[6])


def bias_updates(rank: int, world_size: int):
    """A layer given its process groups (each a new group object, so that parallel_state's
    would be told apart), and ten bias updates of a run resumed at iteration 100."""
    from types import SimpleNamespace

    import megatron.training
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import TransformerConfig

    from plugins.moe.hooks import BiasUpdate
    from plugins.moe.layer import GROUPS, DeepSeekMoE, DeepSeekMoESubmodules
    from tests.helpers.host_syncs import host_syncs
    from tests.helpers.mla_build import megatron_ranks

    with megatron_ranks():
        config = TransformerConfig(
            num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, num_moe_experts=EXPERTS,
            moe_router_topk=2, moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True, moe_ffn_hidden_size=FFN,
            add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
            use_cpu_initialization=True, moe_router_load_balancing_type="none")
        groups = ProcessGroupCollection()
        for name in GROUPS:
            setattr(groups, name, dist.new_group([0]))
        layer = DeepSeekMoE(config, DeepSeekMoESubmodules(), pg_collection=groups)
        uses_given_groups = (layer.ep_group is groups.ep and layer.sequence_group is groups.cp
                             and layer.load_group is groups.dp_cp_gtp_remat
                             and layer.experts.pg_collection is groups)
        logged = []
        megatron.training.print_rank_0 = logged.append
        hook = BiasUpdate(SimpleNamespace(moe_router_bias_update_rate=1e-2, log_interval=5,
                                          moe_dispatch_ranks_per_node=None,
                                          expert_model_parallel_size=1), [layer])
        syncs, biases = {}, []
        for iteration in range(101, 111):
            layer(torch.randn(16, 1, HIDDEN, generator=torch.Generator().manual_seed(iteration)))
            with host_syncs() as calls:
                hook(iteration)
            syncs[iteration] = len(calls)
            biases.append(layer.router.e_score_correction_bias.clone())
        return uses_given_groups, syncs, logged, biases


def test_bias_update_follows_megatrons_iteration():
    """After a resume the log cadence follows Megatron's iteration (log interval 5: at 105
    and 110, not 5 steps after the restart's first); statistics come to the host only
    then, while the bias moves on the device every step. The layer's process groups are
    those of the pg_collection it is given."""
    uses_given_groups, syncs, logged, biases = run_ranks(bias_updates, 1)[0]
    assert uses_given_groups
    assert len(logged) == 2 and all(line.startswith("moe layer 0: load") for line in logged)
    assert [i for i, n in syncs.items() if n] == [105, 110]
    assert all(not torch.equal(a, b) for a, b in zip([torch.zeros(EXPERTS)] + biases, biases))

