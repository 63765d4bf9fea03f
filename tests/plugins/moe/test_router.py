"""DeepSeek-V3 router (plugins/moe/router.py) and load balancing (plugins/moe/balance.py), CPU."""

import pytest
import torch

from plugins.moe.balance import (
    expert_load,
    global_load,
    imbalance,
    sequence_balance_loss,
    update_expert_bias,
)
from plugins.moe.router import DeepSeekRouter, RouterConfig, route
from tests.helpers.host_syncs import host_syncs
from tests.helpers.multirank import run_ranks


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _sorted_by_expert(indices, gates):
    order = indices.argsort(dim=-1)
    return indices.gather(1, order), gates.gather(1, order)


# --------------------------------------------------------------------------- HF parity


def _hf_router(hidden, num_experts, n_group, topk_group, top_k, scale, norm):
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = DeepseekV3Config(
        vocab_size=32, hidden_size=hidden, intermediate_size=8, moe_intermediate_size=8,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        n_shared_experts=1, n_routed_experts=num_experts, n_group=n_group,
        topk_group=topk_group, num_experts_per_tok=top_k, routed_scaling_factor=scale,
        norm_topk_prob=norm,
    )
    return DeepseekV3TopkRouter(config)


@pytest.mark.parametrize(
    "experts,groups,group_top_k,top_k,scale,norm",
    [
        (16, 4, 2, 4, 2.5, True),
        (16, 1, 1, 4, 2.5, True),
        (32, 8, 3, 6, 1.0, False),
    ],
)
def test_matches_hugging_face_router(experts, groups, group_top_k, top_k, scale, norm):
    hidden, tokens = 32, 512
    cfg = RouterConfig(experts, top_k, groups, group_top_k, scale, norm)
    ours = DeepSeekRouter(hidden, cfg)
    hf = _hf_router(hidden, experts, groups, group_top_k, top_k, scale, norm)
    g = _gen(0)
    weight = torch.randn(experts, hidden, generator=g) * 0.1
    bias = torch.randn(experts, generator=g) * 0.05  # moves choices, keeps biased scores > 0
    with torch.no_grad():
        ours.weight.copy_(weight)
        ours.e_score_correction_bias.copy_(bias)
        hf.weight.copy_(weight)
        hf.e_score_correction_bias.copy_(bias)
    x = torch.randn(tokens, hidden, generator=g)

    idx, gates, scores = ours(x)
    hf_idx, hf_gates = hf(x)
    assert idx.dtype == torch.int64 and gates.dtype == torch.float32 and scores.dtype == torch.float32
    idx, gates = _sorted_by_expert(idx, gates)
    hf_idx, hf_gates = _sorted_by_expert(hf_idx, hf_gates)
    assert torch.equal(idx, hf_idx)
    torch.testing.assert_close(gates, hf_gates.float(), rtol=1e-6, atol=1e-7)
    if norm:
        torch.testing.assert_close(gates.sum(-1), torch.full((tokens,), scale))

    # The bias must have mattered, or the bias-only-for-choosing rule went untested.
    unbiased_idx, _ = route(x @ weight.T, None, cfg)
    assert not torch.equal(unbiased_idx.sort(-1).values, idx)


def test_bias_chooses_but_does_not_weigh():
    cfg = RouterConfig(num_experts=8, top_k=2, scaling_factor=1.0, normalize=False)
    logits = torch.randn(64, 8, generator=_gen(1))
    bias = torch.zeros(8)
    bias[3] = 10.0  # expert 3 always chosen
    idx, gates = route(logits, bias, cfg)
    assert (idx == 3).any(-1).all()
    torch.testing.assert_close(gates, logits.sigmoid().gather(1, idx))  # no bias in the gate


def test_gates_are_fp32_and_differentiable():
    cfg = RouterConfig(num_experts=16, top_k=4, num_groups=4, group_top_k=2, scaling_factor=2.5)
    router = DeepSeekRouter(24, cfg, dtype=torch.bfloat16)
    x = torch.randn(10, 24, dtype=torch.bfloat16, generator=_gen(2))
    idx, gates, scores = router(x)
    assert gates.dtype == torch.float32 and scores.shape == (10, 16)
    (gates.square().sum() + scores.sum()).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    # The bias is a persistent buffer, not a parameter.
    assert "e_score_correction_bias" in router.state_dict()
    assert all(name != "e_score_correction_bias" for name, _ in router.named_parameters())
    assert router.e_score_correction_bias.dtype == torch.float32
    assert not hasattr(router, "expert_bias")  # Megatron would update that name itself


def test_negative_bias_still_respects_groups():
    """HF masks dropped groups with 0.0, which wins over negative biased scores; we use -inf."""
    cfg = RouterConfig(num_experts=16, top_k=4, num_groups=4, group_top_k=2)
    logits = torch.randn(256, 16, generator=_gen(3))
    idx, _ = route(logits, torch.full((16,), -3.0), cfg)
    groups_used = torch.tensor([len(set(row.tolist())) for row in idx // 4])
    assert groups_used.max() <= 2
    # A uniform shift of the bias does not change any choice.
    torch.testing.assert_close(route(logits, torch.zeros(16), cfg)[0], idx, rtol=0, atol=0)


# --------------------------------------------------------------------------- node limit


def _nodes_touched(indices, experts_per_node):
    nodes = indices // experts_per_node  # [T, K]
    one_hot = torch.zeros(indices.shape[0], int(nodes.max()) + 1, dtype=torch.bool)
    return one_hot.scatter_(1, nodes, True).sum(-1)  # [T]


def test_group_limit_bounds_nodes_per_token():
    # 64 experts on EP=8 ranks (8 per rank), 4 nodes of 2 ranks: 16 experts per node.
    # Groups = nodes (num_groups=4), each token may use M=2 nodes, top_k=8.
    experts, ranks, ranks_per_node, M, K = 64, 8, 2, 2, 8
    experts_per_node = experts // ranks * ranks_per_node
    nodes = experts // experts_per_node
    cfg = RouterConfig(experts, K, num_groups=nodes, group_top_k=M, scaling_factor=2.5)
    g = _gen(4)
    tokens = 4096
    logits = torch.randn(tokens, experts, generator=g)
    # Adversarial half: in every node two experts stand out, so plain top-8 takes 2 from each node.
    adv = logits[: tokens // 2].mul_(0.3).view(-1, nodes, experts_per_node)
    pick = torch.rand(adv.shape, generator=g).topk(2, dim=-1).indices
    adv.scatter_add_(2, pick, torch.full(pick.shape, 5.0))
    bias = torch.randn(experts, generator=g) * 0.1

    idx, _ = route(logits, bias, cfg)
    assert _nodes_touched(idx, experts_per_node).max() <= M

    # Sensitivity: the same logits routed without the group mask do spread over > M nodes.
    plain = RouterConfig(experts, K, num_groups=1, group_top_k=1, scaling_factor=2.5)
    plain_idx, _ = route(logits, bias, plain)
    spread = _nodes_touched(plain_idx, experts_per_node)
    assert (spread > M).float().mean() > 0.5
    assert (spread[: tokens // 2] == nodes).all()


def test_group_choice_matches_brute_force():
    """Kept groups = top-M by the sum of the two best biased scores; experts = top-K inside."""
    cfg = RouterConfig(num_experts=24, top_k=5, num_groups=6, group_top_k=3)
    g = _gen(5)
    logits = torch.randn(200, 24, generator=g)
    bias = torch.randn(24, generator=g) * 0.2
    idx, gates = route(logits, bias, cfg)
    s = logits.sigmoid()
    c = s + bias
    for t in range(logits.shape[0]):
        group_score = [sorted(c[t, 4 * gi: 4 * gi + 4].tolist())[-2:] for gi in range(6)]
        group_score = [sum(v) for v in group_score]
        kept = sorted(range(6), key=lambda gi: -group_score[gi])[:3]
        allowed = [e for e in range(24) if e // 4 in kept]
        best = sorted(allowed, key=lambda e: -c[t, e].item())[:5]
        assert sorted(idx[t].tolist()) == sorted(best)
        w = s[t, idx[t]]
        torch.testing.assert_close(gates[t], w / w.sum())


# --------------------------------------------------------------------------- balancing


def test_expert_load_and_one_update_step():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0], [1, 2]])
    load = expert_load(idx, 5)
    assert load.tolist() == [4, 3, 2, 1, 0]  # mean 2
    bias = torch.tensor([0.5, 0.0, -0.1, 0.0, 0.0])
    out = update_expert_bias(bias, load, 1e-3)
    assert out is bias  # in place
    expected = torch.tensor([0.5 - 1e-3, -1e-3, -0.1, 1e-3, 1e-3])
    torch.testing.assert_close(bias, expected, rtol=0, atol=0)
    assert imbalance(load).item() == pytest.approx(2.0)
    assert imbalance(torch.tensor([3, 3, 3])).item() == 1.0


def test_bias_updates_balance_a_skewed_router():
    cfg = RouterConfig(num_experts=16, top_k=4, num_groups=4, group_top_k=2, scaling_factor=2.5)
    g = _gen(6)
    skew = torch.linspace(1.0, -1.0, 16)  # early experts are favoured by every token
    logits = torch.randn(2048, 16, generator=g) + skew
    bias = torch.zeros(16)
    start = imbalance(expert_load(route(logits, bias, cfg)[0], 16)).item()
    for _ in range(300):
        load = expert_load(route(logits, bias, cfg)[0], 16)
        update_expert_bias(bias, load, 1e-3)
    end = imbalance(expert_load(route(logits, bias, cfg)[0], 16)).item()
    assert start > 1.5
    assert end < 1.1 and end - 1 < (start - 1) / 5
    assert bias[0] < 0 < bias[-1]  # favoured experts pushed down, neglected ones up


def _global_load_rank(rank, world_size, num_experts):
    from tests.helpers.backend import device

    idx = torch.randint(0, num_experts, (50, 4), generator=_gen(100 + rank)).to(device())
    local = expert_load(idx, num_experts)
    group = torch.distributed.new_group(list(range(world_size)))
    total = global_load(local, group)
    assert torch.equal(local, expert_load(idx, num_experts))  # input left alone
    return local, total


def test_global_load_sums_over_ranks():
    results = run_ranks(_global_load_rank, 2, 12)
    (local0, total0), (local1, total1) = results
    assert torch.equal(total0, local0 + local1) and torch.equal(total1, total0)
    assert int(total0.sum()) == 2 * 50 * 4


# --------------------------------------------------------------------------- sequence loss


def test_sequence_loss_hand_computed():
    # E=4, K=2, T=2, two sequences.
    scores = torch.tensor([
        [0.5, 0.5, 0.5, 0.5],  # s' = .25 each
        [0.8, 0.4, 0.4, 0.4],  # s' = .4 .2 .2 .2      -> P = .325 .225 .225 .225
        [0.2, 0.2, 0.2, 0.2],
        [0.6, 0.6, 0.6, 0.6],  #                       -> P = .25 each
    ])
    idx = torch.tensor([[0, 1], [0, 2], [2, 3], [3, 2]])
    # seq 0: counts 2 1 1 0, f = 4/(2*2) * counts -> sum f*P = .65 + .225 + .225 = 1.1
    # seq 1: counts 0 0 2 2, f = counts           -> sum f*P = .5 + .5 = 1.0
    loss = sequence_balance_loss(scores, idx, num_experts=4, top_k=2, seq_len=2, alpha=0.01)
    assert loss.item() == pytest.approx(0.01 * (1.1 + 1.0) / 2, rel=1e-6)


def _random_case(seed, batch=3, seq=16, experts=8, top_k=2):
    g = _gen(seed)
    scores = torch.rand(batch * seq, experts, generator=g) * 0.9 + 0.05
    idx = torch.rand(batch * seq, experts, generator=g).topk(top_k, dim=-1).indices
    return scores, idx, dict(num_experts=experts, top_k=top_k, seq_len=seq)


def test_sequence_loss_invariances():
    scores, idx, kw = _random_case(7)
    loss = sequence_balance_loss(scores, idx, alpha=1e-4, **kw)
    assert sequence_balance_loss(scores, idx, alpha=0.0, **kw).item() == 0.0
    # Linear in alpha.
    assert sequence_balance_loss(scores, idx, alpha=2e-4, **kw).item() == pytest.approx(2 * loss.item())
    # Token order within a sequence does not matter.
    perm = torch.cat([b * 16 + torch.randperm(16, generator=_gen(8)) for b in range(3)])
    torch.testing.assert_close(sequence_balance_loss(scores[perm], idx[perm], alpha=1e-4, **kw), loss)
    # Relabelling experts (columns of scores and the indices alike) does not matter.
    relabel = torch.randperm(8, generator=_gen(9))
    inverse = relabel.argsort()
    torch.testing.assert_close(
        sequence_balance_loss(scores[:, relabel], inverse[idx], alpha=1e-4, **kw), loss
    )
    # Scaling one token's affinities does not matter (s' is normalized per token).
    scaled = scores.clone()
    scaled[5] *= 0.3
    torch.testing.assert_close(sequence_balance_loss(scaled, idx, alpha=1e-4, **kw), loss)
    # The batch loss is the mean of the per-sequence losses.
    per_seq = [sequence_balance_loss(scores[b * 16:(b + 1) * 16], idx[b * 16:(b + 1) * 16],
                                     alpha=1e-4, **kw) for b in range(3)]
    torch.testing.assert_close(loss, torch.stack(per_seq).mean())
    # Uniform affinities give exactly alpha whatever the routing.
    uniform = torch.full_like(scores, 0.3)
    assert sequence_balance_loss(uniform, idx, alpha=1e-4, **kw).item() == pytest.approx(1e-4)


def test_sequence_loss_is_per_sequence_and_differentiable():
    # Two sequences, each all on its own pair of experts: the batch is balanced, sequences not.
    E, K, T = 4, 2, 3
    idx = torch.tensor([[0, 1]] * T + [[2, 3]] * T)
    scores = torch.tensor([[0.9, 0.9, 0.1, 0.1]] * T + [[0.1, 0.1, 0.9, 0.9]] * T,
                          requires_grad=True)
    loss = sequence_balance_loss(scores, idx, E, K, T, alpha=1.0)
    whole_batch = sequence_balance_loss(scores, idx, E, K, 2 * T, alpha=1.0)
    # per sequence: f = 2 on the two used experts, P = .45 there -> 1.8; whole batch: 1.0
    assert loss.item() == pytest.approx(1.8) and whole_batch.item() == pytest.approx(1.0)
    loss.backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="sequences of 4"):
        sequence_balance_loss(scores, idx, E, K, 4, alpha=1.0)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,flags",
    [
        (dict(num_experts=10, top_k=2, num_groups=4, group_top_k=1), ["--num-experts", "--moe-router-num-groups"]),
        (dict(num_experts=16, top_k=2, num_groups=4, group_top_k=5), ["--moe-router-group-topk"]),
        (dict(num_experts=16, top_k=2, num_groups=4, group_top_k=0), ["--moe-router-group-topk"]),
        (dict(num_experts=16, top_k=9, num_groups=4, group_top_k=2), ["--moe-router-topk", "--moe-router-group-topk"]),
        (dict(num_experts=16, top_k=17), ["--moe-router-topk"]),
        (dict(num_experts=16, top_k=0), ["--moe-router-topk"]),
        (dict(num_experts=0, top_k=1), ["--num-experts"]),
        (dict(num_experts=16, top_k=2, num_groups=0), ["--moe-router-num-groups"]),
        (dict(num_experts=8, top_k=2, num_groups=8, group_top_k=2), ["--moe-router-num-groups"]),
        (dict(num_experts=16, top_k=2, scaling_factor=0.0), ["--moe-router-topk-scaling-factor"]),
    ],
)
def test_validate_names_flags(kwargs, flags):
    cfg = RouterConfig(**kwargs)
    with pytest.raises(ValueError) as err:
        cfg.validate()
    for flag in flags:
        assert flag in str(err.value)
    with pytest.raises(ValueError):
        route(torch.zeros(2, max(kwargs["num_experts"], 1)), None, cfg)


def test_valid_config_passes():
    RouterConfig(256, 8, num_groups=8, group_top_k=4, scaling_factor=2.5).validate()  # DeepSeek-V3
    RouterConfig(16, 8, num_groups=4, group_top_k=2).validate()  # top_k == all experts of M groups


def test_nan_logits_raise_with_count():
    cfg = RouterConfig(num_experts=16, top_k=4, num_groups=4, group_top_k=2)
    logits = torch.randn(10, 16, generator=_gen(10))
    logits[[1, 4, 7], [0, 5, 15]] = float("nan")
    with pytest.raises(ValueError, match="3 of 10 tokens"):
        route(logits, torch.zeros(16), cfg)
    with pytest.raises(ValueError, match="experts"):
        route(torch.randn(4, 8), None, cfg)


def test_router_forward_neither_checks_its_config_nor_waits_for_the_device(monkeypatch):
    """The config is validated once, when the router is built; forward and backward run
    without a host sync (NaN logits reach the loss through their NaN gates instead)."""
    router = DeepSeekRouter(64, RouterConfig(16, 4, num_groups=4, group_top_k=2))
    checks = []
    monkeypatch.setattr(RouterConfig, "validate", lambda self: checks.append(self))
    hidden = torch.randn(32, 64, generator=_gen(3))
    with host_syncs() as syncs:
        indices, gates, scores = router(hidden)
        (gates.sum() + scores.sum()).backward()
    assert not checks and not syncs
    hidden[5, 0] = float("nan")
    _, gates, _ = router(hidden)
    assert torch.isnan(gates[5]).all() and torch.isfinite(gates[:5]).all()

