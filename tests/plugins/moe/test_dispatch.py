"""Expert-parallel dispatch/combine (plugins/moe/dispatch.py) on gloo ranks, CPU (or NCCL
ranks, one GPU each, with MEGASEEK_TEST_BACKEND=nccl: then the GPU tolerances below).

Oracle: a single process (EP=1, no communication) computing
    out[t] = sum_k gates[t, k] * W_{indices[t, k]} @ hidden[t]
on all ranks' tokens, with expert e a fixed random linear map W_e (same seed everywhere).
Each rank holds its own shard of T tokens; EP=2 and EP=4 must match it:
  * fp8=False: outputs and gradients equal the oracle up to fp32 rounding (only the
    summation/matmul order differs): assert_close rtol=atol=1e-5 (observed ~1e-6).
  * fp8=True: equal (same tolerance) to the oracle evaluated at the FP8 fake-quantized
    hidden states (power-of-two 1x128 scales dequantize exactly), gradients included,
    since the dispatch backward is straight-through and unquantized. Against the
    unquantized oracle the relative error is that of E4M3 (<= 2^-4 per element);
    asserted: relative Frobenius error of the output < 2^-4 (observed ~2.5e-2).
Received rows are checked bit-exactly against the expected (expert, source rank, token)
order, for flat and two-hop alike.

All scenarios of one EP size run in a single run_ranks call (process start-up dominates),
cached per module; the tests read its results.
"""

import functools

import pytest
import torch

from plugins.common.quantize import dequantize, quantize
from plugins.moe.dispatch import combine, dispatch, fp8_row_bytes
from plugins.moe.router import RouterConfig, route
from tests.helpers import backend
from tests.helpers.backend import device
from tests.helpers.multirank import run_ranks

HIDDEN = 256
TOKENS = 24  # per rank
EXPERTS = 8
NODES = 2  # router groups = simulated nodes at EP=4 (2 ranks each)
TOL = backend.tolerance(cpu=(1e-5, 1e-5), gpu=(1e-4, 1e-4),
                        why="the ranks' expert GEMMs run in cuBLAS, the oracle on the CPU: "
                            "two kernels round fp32 sums differently")
# Same computation, same device, different grouping (two-hop vs flat, routes of one node).
SAME_SUMS = backend.tolerance(gpu=(1e-6, 1e-6),
                              why="combine's index_add uses atomic adds on CUDA: summation "
                                  "order varies from run to run")

# name: (fp8, dtype, top_k, ranks_per_node, two_hop, backward)
SCENARIOS = {
    "fp32": (False, torch.float32, 4, None, False, True),
    "fp8": (True, torch.float32, 4, None, False, True),
    "bf16_bytes": (False, torch.bfloat16, 4, None, False, False),
    "fp8_bf16_bytes": (True, torch.bfloat16, 4, None, False, False),
}
TWO_HOP = {  # EP=4 only: 2 simulated nodes of 2 ranks
    "flat_nodes": (False, torch.float32, 4, 2, False, True),
    "two_hop": (False, torch.float32, 4, 2, True, True),
    "two_hop_fp8": (True, torch.float32, 4, 2, True, True),
    "flat_k1": (False, torch.float32, 1, 2, False, False),
    "two_hop_k1": (False, torch.float32, 1, 2, True, False),
}


# --------------------------------------------------------------------------- problem


def _problem(world: int, top_k: int, dtype=torch.float32):
    """Same tensors on every rank and in the test process (CPU generator, fixed seed)."""
    g = torch.Generator().manual_seed(1234 + top_k)
    n = world * TOKENS
    # Per-tile magnitudes spread over 2^-4 .. 2^4, so FP8 scales differ between tiles.
    spread = torch.exp2(torch.randint(-4, 5, (n, HIDDEN // 128, 1), generator=g).float())
    hidden = (torch.randn(n, HIDDEN // 128, 128, generator=g) * spread).view(n, HIDDEN)
    logits = torch.randn(n, EXPERTS, generator=g)
    weights = torch.randn(EXPERTS, HIDDEN, HIDDEN, generator=g) * HIDDEN ** -0.5  # [E, out, in]
    cotangent = torch.randn(n, HIDDEN, generator=g)
    config = RouterConfig(EXPERTS, top_k, num_groups=NODES, group_top_k=min(NODES, top_k))
    indices, gates = route(logits, None, config)
    return hidden.to(dtype), indices, gates, weights.to(dtype), cotangent.to(dtype)


def _fake_quant(hidden):
    q, scales = quantize(hidden, (1, 128), power_of_two_scales=True)
    return dequantize(q, scales, (1, 128), hidden.dtype)


def _reference(hidden, weights, indices, gates, cotangent):
    """Single-process oracle: (out [n, H], d hidden, d weights [E, H, H], d gates)."""
    hidden = hidden.clone().requires_grad_()
    weights = weights.clone().requires_grad_()
    gates = gates.clone().requires_grad_()
    every = torch.einsum("th,eoh->teo", hidden, weights)  # [n, E, H], all experts
    chosen = every.gather(1, indices[..., None].expand(-1, -1, every.shape[-1]))  # [n, K, H]
    out = (chosen * gates[..., None]).sum(1)
    (out * cotangent).sum().backward()
    return out.detach(), hidden.grad, weights.grad, gates.grad


def _expected_rows(indices, world):
    """Per rank: global token ids of the rows it should receive, in dispatched order."""
    epr = EXPERTS // world
    rows = [[] for _ in range(world)]
    for e in range(EXPERTS):
        for src in range(world):  # by source rank, then token order
            shard = indices[src * TOKENS:(src + 1) * TOKENS]
            hit = (shard == e).any(1).nonzero().view(-1) + src * TOKENS
            rows[e // epr].extend(hit.tolist())
    return [torch.tensor(r, dtype=torch.long) for r in rows]


# --------------------------------------------------------------------------- ranks


def _experts(tokens, counts, weights_local):
    """Local experts: rows of expert j times W_j^T; [N, H] -> [N, H]."""
    chunks = torch.split(tokens, counts)
    return torch.cat([x @ w.T for x, w in zip(chunks, weights_local)])


def _on_device(*tensors):
    return [t.to(device()) for t in tensors]


def _run_scenario(rank, world, fp8, dtype, top_k, rpn, two_hop, backward):
    hidden, indices, gates, weights, cotangent = _on_device(*_problem(world, top_k, dtype))
    shard = slice(rank * TOKENS, (rank + 1) * TOKENS)
    epr = EXPERTS // world
    h = hidden[shard].clone().requires_grad_(backward)
    g = gates[shard].clone().requires_grad_(backward)
    w = weights[rank * epr:(rank + 1) * epr].clone().requires_grad_(backward)

    d = dispatch(h, indices[shard], EXPERTS, None, fp8=fp8, ranks_per_node=rpn,
                 two_hop=two_hop)
    out = combine(_experts(d.tokens, d.tokens_per_expert, w), d, g, None)
    result = dict(out=out.detach(), tokens=d.tokens.detach(), counts=d.tokens_per_expert,
                  bytes_sent=d.bytes_sent, inter_node_bytes=d.inter_node_bytes,
                  scales=d.fp8_scales,  # float8 tensors do not unpickle: send q's bytes
                  q=None if d.fp8_q is None else d.fp8_q.view(torch.uint8))
    if backward:
        (out * cotangent[shard]).sum().backward()
        result.update(d_hidden=h.grad, d_gates=g.grad, d_weights=w.grad)
    return result


def _errors(rank, world):
    """Bad inputs raise before any collective, so every rank raises the same."""
    messages = {}
    for name, kwargs in (("hidden", dict(hidden=torch.zeros(4, 200), experts=8, fp8=True)),
                         ("experts", dict(hidden=torch.zeros(4, 256), experts=3, fp8=False))):
        kwargs["hidden"] = kwargs["hidden"].to(device())
        indices = torch.zeros(4, 1, dtype=torch.long, device=device())
        try:
            dispatch(kwargs["hidden"], indices, kwargs["experts"], None, fp8=kwargs["fp8"])
        except ValueError as e:
            messages[name] = str(e)
    return messages


def _one_hot_expert(rank, world):
    """Every token picks only expert 0: other ranks receive nothing (empty splits)."""
    hidden, _, _, weights, cotangent = _on_device(*_problem(world, 1))
    shard = slice(rank * TOKENS, (rank + 1) * TOKENS)
    h = hidden[shard].clone().requires_grad_()
    gates = torch.full((TOKENS, 1), 0.5, device=device())
    w = weights[rank * (EXPERTS // world):(rank + 1) * (EXPERTS // world)].clone()
    indices = torch.zeros(TOKENS, 1, dtype=torch.long, device=device())
    d = dispatch(h, indices, EXPERTS, None, fp8=True, ranks_per_node=2, two_hop=world > 2)
    out = combine(_experts(d.tokens, d.tokens_per_expert, w), d, gates, None)
    (out * cotangent[shard]).sum().backward()
    expected = 0.5 * _fake_quant(hidden[shard]) @ weights[0].T
    d_expected = 0.5 * cotangent[shard] @ weights[0]
    return dict(counts=d.tokens_per_expert,  # errors relative to the largest entry
                error=float((out - expected).abs().max() / expected.abs().max()),
                d_hidden_error=float((h.grad - d_expected).abs().max() / d_expected.abs().max()))


def _host_syncs(rank, world):
    """Host syncs of dispatch, combine and their backward, flat and (EP=4) two-hop: the
    syncing aten ops and Tensor methods (`tests.helpers.host_syncs.device_waits`)."""
    from tests.helpers.host_syncs import device_waits

    hidden, indices, gates, _, cotangent = _on_device(*_problem(world, 4))
    shard = slice(rank * TOKENS, (rank + 1) * TOKENS)
    counted = {}
    for name, two_hop, pad_to in (("flat", False, 1), ("flat_padded", False, 128),
                                  ("two_hop", True, 1), ("two_hop_padded", True, 128)
                                  )[:2 + 2 * (world == 4)]:
        h = hidden[shard].clone().requires_grad_()
        g = gates[shard].clone().requires_grad_()
        with device_waits() as syncs:
            d = dispatch(h, indices[shard], EXPERTS, None, fp8=True, ranks_per_node=2,
                         two_hop=two_hop, pad_to=pad_to)
            out = combine(d.tokens * 2, d, g, None)
            (out * cotangent[shard]).sum().backward()
        counted[name] = syncs
    return counted


def _non_finite(rank, world):
    """Rank 0's tokens hold a NaN: with FP8 dispatch every rank raises, none hangs."""
    hidden, indices, _, _, _ = _on_device(*_problem(world, 4))
    h = hidden[rank * TOKENS:(rank + 1) * TOKENS].clone()
    if rank == 0:
        h[3, 200] = float("nan")
    try:
        dispatch(h, indices[:TOKENS], EXPERTS, None, fp8=True)
    except ValueError as e:
        return str(e)
    return "no error"


def _padded(rank, world):
    """Dispatch with each local expert's rows padded to multiples of 4 and 128 against
    unpadded, fp32 and FP8, flat and (EP=4) two-hop. The experts scale each row by their
    index (row by row, so exact for any row count); combine and backward follow."""
    hidden, indices, gates, _, cotangent = _on_device(*_problem(world, 4))
    shard = slice(rank * TOKENS, (rank + 1) * TOKENS)
    expert_scale = torch.arange(1, EXPERTS // world + 1, dtype=torch.float32, device=device())

    def run(fp8, two_hop, pad_to):
        h, g = hidden[shard].clone().requires_grad_(), gates[shard].clone().requires_grad_()
        d = dispatch(h, indices[shard], EXPERTS, None, fp8=fp8, pad_to=pad_to,
                     ranks_per_node=2 if two_hop else None, two_hop=two_hop)
        rows = torch.cat([x * s for x, s in zip(d.tokens.split(d.tokens_per_expert),
                                                expert_scale)])
        out = combine(rows, d, g, None)
        (out * cotangent[shard]).sum().backward()
        return d, [out, h.grad, g.grad]

    checks = {}
    for fp8 in (False, True):
        for two_hop in (False, True)[:1 + (world == 4)]:
            plain, plain_results = run(fp8, two_hop, 1)
            for pad_to in (4, 128):
                d, results = run(fp8, two_hop, pad_to)
                counts = plain.tokens_per_expert
                starts = torch.tensor([0] + d.tokens_per_expert[:-1]).cumsum(0).tolist()
                real = torch.cat([torch.arange(c) + s for c, s in zip(counts, starts)]
                                 ).to(device())
                pad = torch.ones(d.tokens.shape[0], dtype=torch.bool, device=device())
                pad[real] = False
                check = dict(
                    counts=d.tokens_per_expert == [c + -c % pad_to for c in counts],
                    padded=bool(pad.any()),
                    tokens=torch.equal(d.tokens[real], plain.tokens)
                    and not d.tokens[pad].any(),
                    combined=all(torch.equal(a, b) for a, b in zip(results, plain_results)))
                if fp8:
                    q, q0 = d.fp8_q.view(torch.uint8), plain.fp8_q.view(torch.uint8)
                    check.update(
                        fp8_q=torch.equal(q[real], q0) and not q[pad].any(),
                        fp8_scales=torch.equal(d.fp8_scales[real], plain.fp8_scales)
                        and bool((d.fp8_scales[pad] == 2.0 ** -126).all()))
                checks[(fp8, two_hop, pad_to)] = check
    return checks


def _worker(rank, world, scenarios):
    results = {name: _run_scenario(rank, world, *spec) for name, spec in scenarios.items()}
    results["errors"] = _errors(rank, world)
    results["one_hot"] = _one_hot_expert(rank, world)
    results["host_syncs"] = _host_syncs(rank, world)
    results["non_finite"] = _non_finite(rank, world)
    results["padded"] = _padded(rank, world)
    return results


@functools.cache
def _results(world):
    scenarios = dict(SCENARIOS, **(TWO_HOP if world == 4 else {}))
    return run_ranks(_worker, world, scenarios, timeout=90.0)


def _gather(results, name, key):
    return torch.cat([r[name][key] for r in results])


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("world", [2, 4])
def test_matches_single_process_oracle(world):
    results = _results(world)
    hidden, indices, gates, weights, cotangent = _problem(world, 4)
    out, d_hidden, d_weights, d_gates = _reference(hidden, weights, indices, gates, cotangent)
    torch.testing.assert_close(_gather(results, "fp32", "out"), out, **TOL)
    torch.testing.assert_close(_gather(results, "fp32", "d_hidden"), d_hidden, **TOL)
    torch.testing.assert_close(_gather(results, "fp32", "d_gates"), d_gates, **TOL)
    torch.testing.assert_close(_gather(results, "fp32", "d_weights"), d_weights, **TOL)


@pytest.mark.parametrize("world", [2, 4])
def test_fp8_matches_oracle_at_quantized_hidden(world):
    results = _results(world)
    hidden, indices, gates, weights, cotangent = _problem(world, 4)
    quantized = _fake_quant(hidden)
    out, d_hidden, d_weights, d_gates = _reference(quantized, weights, indices, gates,
                                                   cotangent)
    torch.testing.assert_close(_gather(results, "fp8", "out"), out, **TOL)
    # Straight-through: d hidden is the oracle's gradient at the quantized point.
    torch.testing.assert_close(_gather(results, "fp8", "d_hidden"), d_hidden, **TOL)
    torch.testing.assert_close(_gather(results, "fp8", "d_gates"), d_gates, **TOL)
    torch.testing.assert_close(_gather(results, "fp8", "d_weights"), d_weights, **TOL)

    exact = _reference(hidden, weights, indices, gates, cotangent)[0]
    rel = (_gather(results, "fp8", "out") - exact).norm() / exact.norm()
    assert 1e-3 < rel < 2 ** -4, f"FP8 dispatch error vs unquantized: {rel:.3e}"


@pytest.mark.parametrize("world", [2, 4])
def test_received_rows_grouped_by_expert(world):
    results = _results(world)
    hidden, indices, _, _, _ = _problem(world, 4)
    q_all, s_all = quantize(hidden, (1, 128), power_of_two_scales=True)
    for rank, rows in enumerate(_expected_rows(indices, world)):
        r = results[rank]
        assert torch.equal(r["fp32"]["tokens"], hidden[rows])
        assert torch.equal(r["fp8"]["tokens"], _fake_quant(hidden)[rows])
        assert torch.equal(r["fp8"]["q"], q_all[rows].view(torch.uint8))
        assert torch.equal(r["fp8"]["scales"], s_all[rows])
        assert r["fp32"]["q"] is None and r["fp32"]["scales"] is None
        epr = EXPERTS // world
        owned = indices[..., None] == torch.arange(rank * epr, (rank + 1) * epr)
        assert r["fp32"]["counts"] == owned.sum((0, 1)).tolist() == r["fp8"]["counts"]


@pytest.mark.parametrize("world", [2, 4])
def test_fp8_halves_dispatch_bytes(world):
    results = _results(world)
    _, indices, _, _, _ = _problem(world, 4)
    fp8 = sum(r["fp8_bf16_bytes"]["bytes_sent"] for r in results)
    bf16 = sum(r["bf16_bytes"]["bytes_sent"] for r in results)
    assert bf16 > 0 and fp8 / bf16 <= 0.52, f"fp8/bf16 = {fp8 / bf16:.4f}"
    # Exactly the off-rank (token, expert) rows times the row sizes.
    owner = indices // (EXPERTS // world)  # [n, K]
    source = torch.arange(world).repeat_interleave(TOKENS)[:, None]
    off_rank = int((owner != source).sum())
    assert bf16 == off_rank * HIDDEN * 2
    assert fp8 == off_rank * fp8_row_bytes(HIDDEN) == off_rank * (HIDDEN + 4 * HIDDEN // 128)


def test_two_hop_equals_flat():
    results = _results(4)
    for rank in range(4):
        flat, hop = results[rank]["flat_nodes"], results[rank]["two_hop"]
        assert torch.equal(hop["tokens"], flat["tokens"])
        assert hop["counts"] == flat["counts"]
        assert torch.equal(results[rank]["two_hop_fp8"]["tokens"],
                           results[rank]["fp8"]["tokens"])
        assert torch.equal(results[rank]["two_hop_fp8"]["q"], results[rank]["fp8"]["q"])
    # Combine sums per node first on two-hop: equal up to fp32 rounding.
    for key in ("out", "d_hidden", "d_gates", "d_weights"):
        torch.testing.assert_close(_gather(results, "two_hop", key),
                                   _gather(results, "flat_nodes", key), **TOL)
        torch.testing.assert_close(_gather(results, "two_hop_fp8", key),
                                   _gather(results, "fp8", key), **TOL)
    torch.testing.assert_close(_gather(results, "flat_nodes", "out"),
                               _gather(results, "fp32", "out"), **SAME_SUMS)


def _expected_inter_node(indices, world, rpn):
    """(flat, two-hop) rows crossing node boundaries, per source rank."""
    node_of = indices // (EXPERTS // world) // rpn  # [n, K]
    flat, two_hop = [], []
    for src in range(world):
        nodes = node_of[src * TOKENS:(src + 1) * TOKENS]
        remote = nodes != src // rpn
        flat.append(int(remote.sum()))
        hit = torch.zeros(TOKENS, world // rpn, dtype=torch.bool)
        hit.scatter_(1, nodes, True)
        hit[:, src // rpn] = False
        two_hop.append(int(hit.sum()))
    return flat, two_hop


def test_two_hop_sends_fewer_inter_node_bytes():
    results = _results(4)
    row = HIDDEN * 4  # fp32 rows
    for top_k, flat_name, hop_name in ((4, "flat_nodes", "two_hop"), (1, "flat_k1", "two_hop_k1")):
        _, indices, _, _, _ = _problem(4, top_k)
        flat_rows, hop_rows = _expected_inter_node(indices, 4, 2)
        flat = [r[flat_name]["inter_node_bytes"] for r in results]
        hop = [r[hop_name]["inter_node_bytes"] for r in results]
        assert flat == [n * row for n in flat_rows] and hop == [n * row for n in hop_rows]
        assert all(h <= f for h, f in zip(hop, flat))
        if top_k == 1:  # one expert per token: nothing to deduplicate
            assert hop == flat
        else:  # 4 experts over 2 nodes: a token often uses 2+ experts of the remote node
            ratio = sum(hop) / sum(flat)
            assert ratio < 0.75, f"two-hop/flat inter-node bytes = {ratio:.3f}"
    # The relay's forwarding stays inside the node: counted in bytes_sent only.
    for r in results:
        assert r["two_hop"]["bytes_sent"] > r["two_hop"]["inter_node_bytes"]


@pytest.mark.parametrize("world", [2, 4])
def test_bad_input_names_the_flags(world):
    for r in _results(world):
        assert "--hidden-size" in r["errors"]["hidden"] and "FP8" in r["errors"]["hidden"]
        assert "--num-experts" in r["errors"]["experts"]
        assert "--expert-model-parallel-size" in r["errors"]["experts"]


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_with_nothing_to_receive(world):
    results = _results(world)
    assert results[0]["one_hot"]["counts"][0] == world * TOKENS
    for rank, r in enumerate(results):
        assert sum(r["one_hot"]["counts"]) == (world * TOKENS if rank == 0 else 0)
        assert r["one_hot"]["error"] < 1e-6 and r["one_hot"]["d_hidden_error"] < 1e-6


@pytest.mark.parametrize("world", [2, 4])
def test_one_host_sync_per_hop(world):
    """FP8 dispatch reads its split sizes once per hop (flat: 1, two-hop: 2: the all-to-all
    needs them on the host, as Megatron's dispatchers do), its inf/NaN count riding along;
    nothing else in dispatch, combine or their backward waits for the device (no syncing
    aten op either), each expert's rows padded or not."""
    for r in _results(world):
        assert r["host_syncs"]["flat"] == r["host_syncs"]["flat_padded"] == ["tolist"]
        if world == 4:
            assert (r["host_syncs"]["two_hop"] == r["host_syncs"]["two_hop_padded"]
                    == ["tolist", "tolist"])


@pytest.mark.parametrize("world", [2, 4])
def test_non_finite_tokens_stop_every_rank(world):
    """The count of non-finite tiles travels with the split sizes: the rank holding the
    NaN names its tile, the others name that rank, before any payload moves."""
    results = _results(world)
    assert "FP8 dispatch: hidden has non-finite values" in results[0]["non_finite"]
    assert "row tile 3, col tile 1" in results[0]["non_finite"]
    for r in results[1:]:
        assert r["non_finite"] == ("FP8 dispatch: rank(s) [0] of the expert-parallel group "
                                   "hold tokens with inf or NaN")



@pytest.mark.parametrize("world", [2, 4])
def test_padding_lays_out_zero_rows_per_expert_and_changes_no_result(world):
    """pad_to=m: every local expert's rows followed by zero rows (FP8: zero codes, a zero
    tile's scale) up to a multiple of m; the received rows, combine's output and the
    gradients of hidden and gates as without padding, bit for bit (flat and two-hop,
    fp32 and FP8)."""
    for rank in _results(world):
        for scenario, checks in rank["padded"].items():
            assert all(checks.values()), (scenario, checks)
