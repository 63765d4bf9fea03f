"""MoE benchmarks.

moe_dispatch_bytes  Payload bytes per token that plugins.moe.dispatch puts on the wire, on
                    4 gloo ranks at DeepSeek-V3's hidden size: FP8 vs BF16 (flat), and
                    two-hop vs flat across 2 simulated nodes of 2 ranks.
moe_layer_cpu_time  Forward + backward of one DeepSeekMoE layer vs Megatron-Core's MoELayer
                    (local spec) with the same routing and the same weights, EP = 1.
"""

from __future__ import annotations

import os
import tempfile
import time

import integration  # noqa: F401  (first: makes megatron.training importable on 3.11)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from bench.single_rank import megatron_single_rank
from bench.result import Config, Result, Table
from bench.timing import interleaved

# --------------------------------------------------------------------------- dispatch bytes

HIDDEN = 7168  # DeepSeek-V3
RANKS, TOKENS = 4, 256  # tokens per rank; the byte counts are linear in them
RANKS_PER_NODE = 2  # two-hop table: 2 simulated nodes of 2 ranks
EXPERTS, TOP_K = 32, 8
# name: (groups, groups chosen, description). DeepSeek-V3 routes 256 experts in 8 groups,
# top-8 from at most 4 groups; "v3" keeps its 8/4/8 with 4 experts per group. The others
# make the groups the 2 nodes, so group-limited routing is node-limited routing.
ROUTINGS = {
    "v3": (8, 4, "8 groups of 4, top-8 from 4 groups (DeepSeek-V3's 8/4/8)"),
    "nodes2": (2, 2, "2 groups = nodes, top-8 from 2 groups (no node limit)"),
    "nodes1": (2, 1, "2 groups = nodes, top-8 from 1 group (one node per token)"),
}
FP8_THEORY = (HIDDEN + 4 * HIDDEN / 128) / (2 * HIDDEN)  # E4M3 bytes + fp32 scale per 1x128


def routed(name: str):
    """All ranks' tokens [RANKS*TOKENS, H] (bf16) and expert choices, the same everywhere."""
    from plugins.moe.router import RouterConfig, route

    groups, chosen, _ = ROUTINGS[name]
    g = torch.Generator().manual_seed(0)
    n = RANKS * TOKENS
    hidden = torch.randn(n, HIDDEN, generator=g).to(torch.bfloat16)
    # Random logits: balanced load in expectation, as the bias-balanced router aims for.
    indices, _ = route(torch.randn(n, EXPERTS, generator=g), None,
                       RouterConfig(EXPERTS, TOP_K, num_groups=groups, group_top_k=chosen))
    return hidden, indices


# (fp8, ranks_per_node, two_hop): None is one node (flat); 2 is 2 nodes of 2 ranks.
WIRES = {"flat": (False, None, False), "flat_fp8": (True, None, False),
         "nodes": (False, RANKS_PER_NODE, False), "two_hop": (False, RANKS_PER_NODE, True),
         "two_hop_fp8": (True, RANKS_PER_NODE, True)}


def _dispatch_rank(rank: int, store_path: str, out_dir: str) -> None:
    """One rank (a spawned process): every routing x wire; saves its byte counts."""
    from plugins.moe.dispatch import dispatch

    torch.set_num_threads(1)  # 4 ranks share 2 cores
    dist.init_process_group("gloo", store=dist.FileStore(store_path, RANKS), rank=rank,
                            world_size=RANKS)
    try:
        counts = {}
        for name in ROUTINGS:
            hidden, indices = routed(name)
            mine = slice(rank * TOKENS, (rank + 1) * TOKENS)
            for wire, (fp8, rpn, two_hop) in WIRES.items():
                d = dispatch(hidden[mine], indices[mine], EXPERTS, None, fp8=fp8,
                             ranks_per_node=rpn, two_hop=two_hop)
                counts[name, wire] = (d.bytes_sent, d.inter_node_bytes)
        torch.save(counts, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def on_ranks() -> dict:
    """Byte counts summed over the ranks. mp.spawn re-raises a rank's error and stops
    the others, so a failure cannot hang the benchmark."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_dispatch_rank, args=(os.path.join(tmp, "store"), tmp), nprocs=RANKS)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(RANKS)]
    return {key: tuple(sum(r[key][i] for r in ranks) for i in range(2)) for key in ranks[0]}


def expected_rows(indices) -> dict[str, int]:
    """(token, expert) rows the byte counts must equal, counted from the routing alone."""
    owner = indices // (EXPERTS // RANKS)  # [n, K] rank owning each chosen expert
    source = torch.arange(RANKS).repeat_interleave(TOKENS)[:, None]  # [n, 1]
    node, source_node = owner // RANKS_PER_NODE, source // RANKS_PER_NODE
    other_nodes = sum(((node == m) & (source_node != m)).any(1)
                      for m in range(RANKS // RANKS_PER_NODE))  # [n]
    return {"off_rank": int((owner != source).sum()), "off_node": int((node != source_node).sum()),
            "other_nodes": int(other_nodes.sum())}


def run_dispatch_bytes(smoke: bool = False) -> Result:
    """Byte counts, not timings: a smoke run is the same run (seconds)."""
    start = time.perf_counter()
    counts = on_ranks()
    n = RANKS * TOKENS
    bf16_row, fp8_row = 2 * HIDDEN, HIDDEN + 4 * HIDDEN // 128

    def per_token(name, wire, inter=False):
        return counts[name, wire][1 if inter else 0] / n

    flat_rows, hop_rows, mismatches = [], [], []
    for name, (_, _, label) in ROUTINGS.items():
        rows = expected_rows(routed(name)[1])
        # Each measured count is a number of rows times the row size: check which rows.
        for got, want in ((counts[name, "flat"][0], rows["off_rank"] * bf16_row),
                          (counts[name, "flat_fp8"][0], rows["off_rank"] * fp8_row),
                          (counts[name, "nodes"][1], rows["off_node"] * bf16_row),
                          (counts[name, "two_hop"][1], rows["other_nodes"] * bf16_row),
                          (counts[name, "two_hop_fp8"][1], rows["other_nodes"] * fp8_row)):
            if got != want:
                mismatches.append(f"{name}: measured {got}, counted {want}")
        bf16, fp8 = per_token(name, "flat"), per_token(name, "flat_fp8")
        flat_rows.append([label, f"{rows['off_rank'] / n:.2f}", f"{bf16:.0f}", f"{fp8:.0f}",
                          f"{fp8 / bf16:.4f}", f"{FP8_THEORY:.4f}"])
        flat_x, hop_x = per_token(name, "nodes", True), per_token(name, "two_hop", True)
        hop_fp8_x = per_token(name, "two_hop_fp8", True)
        hop_rows.append([label, f"{rows['off_node'] / n:.2f}", f"{rows['other_nodes'] / n:.2f}",
                         f"{flat_x:.0f}", f"{hop_x:.0f}", f"{hop_x / flat_x:.3f}",
                         f"{hop_fp8_x:.0f}", f"{hop_fp8_x / flat_x:.3f}",
                         f"{per_token(name, 'nodes'):.0f}", f"{per_token(name, 'two_hop'):.0f}"])

    flat = Table(f"(a) Flat dispatch on {RANKS} ranks, bytes per token sent to other ranks",
                 ["routing", "rows off rank / token", "BF16", "FP8", "FP8 / BF16",
                  "(H + 4H/128) / 2H"], flat_rows, right=frozenset(range(1, 6)))
    hop = Table(f"(b) {RANKS // RANKS_PER_NODE} nodes x {RANKS_PER_NODE} ranks, bytes per "
                "token sent to other nodes (inter-node) and to other ranks (all hops)",
                ["routing", "rows off node / token (flat)", "other nodes / token (two-hop)",
                 "flat BF16 inter-node", "two-hop BF16 inter-node", "two-hop / flat",
                 "two-hop FP8 inter-node", "two-hop FP8 / flat BF16",
                 "flat BF16 all hops", "two-hop BF16 all hops"],
                hop_rows, right=frozenset(range(1, 10)))
    return Result("moe_dispatch_bytes", [], [
        f"plugins.moe.dispatch forward on {RANKS} gloo ranks (spawned processes), "
        f"{TOKENS} tokens per rank, hidden {HIDDEN} (DeepSeek-V3), bf16 hidden states, "
        f"{EXPERTS} experts ({EXPERTS // RANKS} per rank), top-{TOP_K}, router = "
        "plugins.moe.router.route on random N(0, 1) logits, no bias (load balanced in "
        "expectation). Bytes per token: the dispatch's bytes_sent / inter_node_bytes summed "
        f"over ranks, divided by all {RANKS * TOKENS} tokens.",
        "Counted: hidden-row payload only (rows a rank keeps for itself excluded); not the "
        "int64 split counts, nor two-hop's routing metadata (expert ids and source ranks, "
        f"{8 * TOP_K + 8} bytes per hop-1 row at top-{TOP_K}), nor combine, which sends "
        "the expert outputs back in the training dtype (BF16) in either case.",
        f"FP8 row: H E4M3 bytes + H/128 float32 scales = {fp8_row} bytes vs BF16's "
        f"{bf16_row}; so FP8 / BF16 is {FP8_THEORY:.4f} whatever the routing.",
        "Two-hop sends a token at most once to each other node (to the rank with the "
        "sender's local index), which forwards it within its node; its 'all hops' bytes "
        "include that intra-node forwarding.",
        "Every measured count equals the rows counted from the routing alone times the row "
        "size." if not mismatches else "MISMATCH with the rows counted from the routing: "
        + "; ".join(mismatches),
        f"Wall time {time.perf_counter() - start:.0f} s.",
    ], [flat, hop])


# --------------------------------------------------------------------------- layer time

T_HIDDEN, T_EXPERTS, T_FFN, T_TOP_K, T_GROUPS, T_GROUP_TOP_K = 512, 16, 128, 4, 4, 2
T_TOKENS, SCALING = 1024, 2.5
WARMUP, REPS = 3, 30
SMOKE_WARMUP, SMOKE_REPS = 1, 3


def moe_config(dispatcher: str):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=T_HIDDEN, num_attention_heads=4, num_moe_experts=T_EXPERTS,
        moe_ffn_hidden_size=T_FFN, moe_router_topk=T_TOP_K, moe_router_num_groups=T_GROUPS,
        moe_router_group_topk=T_GROUP_TOP_K, moe_router_topk_scaling_factor=SCALING,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_load_balancing_type="none", moe_token_dispatcher_type=dispatcher,
        moe_shared_expert_intermediate_size=None, add_bias_linear=False,
        gated_linear_unit=True, activation_func=F.silu, use_cpu_initialization=True)


def build_megatron(dispatcher: str):
    """Megatron's MoELayer from its local spec (SequentialMLP experts)."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend

    return get_moe_module_spec_for_backend(LocalSpecProvider(), T_EXPERTS)(
        config=moe_config(dispatcher))


def same_weights(ours, megatron, seed: int) -> None:
    """Random expert, router weights and expert bias, the same in both layers."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(T_EXPERTS, 2 * T_FFN, T_HIDDEN, generator=g) / T_HIDDEN ** 0.5
    w2 = torch.randn(T_EXPERTS, T_HIDDEN, T_FFN, generator=g) / T_FFN ** 0.5
    router = torch.randn(T_EXPERTS, T_HIDDEN, generator=g) / T_HIDDEN ** 0.5
    bias = torch.randn(T_EXPERTS, generator=g) * 0.1
    with torch.no_grad():
        ours.experts.weight1.copy_(w1)
        ours.experts.weight2.copy_(w2)
        ours.router.weight.copy_(router)
        ours.router.e_score_correction_bias.copy_(bias)
        # Megatron's fc1 is [gate | up] along its output too (glu chunks it in two).
        for e, expert in enumerate(megatron.experts.local_experts):
            expert.linear_fc1.weight.copy_(w1[e])
            expert.linear_fc2.weight.copy_(w2[e])
        megatron.router.weight.copy_(router)
        megatron.router.expert_bias.copy_(bias)


def grads(layer) -> dict[str, torch.Tensor]:
    """Weight gradients under common names: router, w1 [E, 2F, H], w2 [E, H, F]."""
    if hasattr(layer.experts, "weight1"):
        return {"router": layer.router.weight.grad, "w1": layer.experts.weight1.grad,
                "w2": layer.experts.weight2.grad}
    experts = layer.experts.local_experts
    return {"router": layer.router.weight.grad,
            "w1": torch.stack([e.linear_fc1.weight.grad for e in experts]),
            "w2": torch.stack([e.linear_fc2.weight.grad for e in experts])}


def fwd_bwd(layer, x, grad):
    inp = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out, _ = layer(inp)
    out.backward(grad)
    return out.detach(), inp.grad


def compare(name: str, got, ref) -> str:
    pairs = {"output": (got[0], ref[0]), "input grad": (got[1], ref[1])}
    pairs.update({f"{k} grad": (g, ref[2][k]) for k, g in got[2].items()})
    rel = {k: ((a - b).abs().max() / b.abs().max()).item() for k, (a, b) in pairs.items()}
    worst = max(rel, key=rel.get)
    return (f"{name} vs A, max |difference| / max |A's value|: "
            + ", ".join(f"{k} {v:.1e}" for k, v in rel.items())
            + (": equal up to fp32 rounding." if rel[worst] < 1e-5 else ": NOT EQUAL."))


def top_ops(layer, x, grad, steps: int = 3, top: int = 4) -> str:
    """The ops with the most self CPU time per step (torch.profiler): where time goes."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(steps):
            fwd_bwd(layer, x, grad)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return ", ".join(f"{e.key} {e.self_cpu_time_total / steps / 1e3:.1f} ms ({e.count // steps}x)"
                     for e in ops[:top])


def run_layer_cpu_time(smoke: bool = False) -> Result:
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend

    from plugins.moe.layer import DeepSeekMoE, DeepSeekMoESubmodules

    g = torch.Generator().manual_seed(3)
    x = torch.randn(T_TOKENS, 1, T_HIDDEN, generator=g)  # [s, b, h]
    grad = torch.randn(T_TOKENS, 1, T_HIDDEN, generator=g)
    dispatchers = {"B": "alltoall", "C": "allgather"}
    layers, dropped, checks = {}, {}, []
    with megatron_single_rank():
        spec = get_moe_module_spec_for_backend(LocalSpecProvider(), T_EXPERTS)
        layers["A"] = DeepSeekMoE(moe_config("alltoall"), DeepSeekMoESubmodules(
            spec.keywords["submodules"].shared_experts))
        for key, dispatcher in dispatchers.items():
            try:
                layers[key] = build_megatron(dispatcher)
            except Exception as error:  # noqa: BLE001  (reported, the row is dropped)
                dropped[key] = f"{type(error).__name__}: {error}"
        layers = dict(sorted(layers.items()))
        for layer in layers.values():
            if layer is not layers["A"]:
                same_weights(layers["A"], layer, seed=7)
        ref = (*fwd_bwd(layers["A"], x, grad), grads(layers["A"]))
        checks = [compare(key, (*fwd_bwd(layer, x, grad), grads(layer)), ref)
                  for key, layer in layers.items() if key != "A"]
        warmup, reps = (SMOKE_WARMUP, SMOKE_REPS) if smoke else (WARMUP, REPS)
        times = interleaved({k: (lambda i, m=m: fwd_bwd(m, x, grad)) for k, m in layers.items()},
                            reps=reps, warmup=warmup)
        profiles = [f"{k}: {top_ops(layer, x, grad)}" for k, layer in layers.items()]

    fixes_note = "Megatron's MoELayer runs on CPU with upstream.cpu's fixes."
    return Result("moe_layer_cpu_time", [
        Config("A", "megaseek DeepSeekMoE (plugins.moe.layer)", times["A"]),
        *(Config(k, f"Megatron-Core MoELayer, local spec (SequentialMLP), '{d}' dispatcher",
                 times.get(k)) for k, d in dispatchers.items()),
    ], [
        f"One MoE layer, hidden {T_HIDDEN}, {T_EXPERTS} routed experts of ffn {T_FFN} "
        f"(SwiGLU), top-{T_TOP_K} from {T_GROUP_TOP_K} of {T_GROUPS} groups, sigmoid scores "
        f"with expert bias, gates normalized and scaled by {SCALING}, no aux loss, no shared "
        f"expert (both would run the same Megatron SharedExpertMLP), {T_TOKENS} tokens, fp32, single rank, EP = 1; step = zero_grad + forward "
        f"+ backward; {warmup} warm-up rounds, then {reps} interleaved rounds.",
        "Same routing options in both: --moe-router-score-function sigmoid, "
        "--moe-router-enable-expert-bias, --moe-router-num-groups, --moe-router-group-topk, "
        "--moe-router-topk-scaling-factor. Megatron scores a group by its top "
        "(topk / group_topk) experts, megaseek by its top 2: the same here (4 / 2 = 2).",
        "Same weights: expert fc1 [gate | up] and fc2, router weight and expert bias copied "
        "into both; Megatron's per-expert weight grads stacked before comparing.",
        *checks,
        fixes_note,
        *(f"{dispatchers[k]} dropped: {why}" for k, why in dropped.items()),
        "At EP = 1 no layer communicates: Megatron's all-to-all and all-gather return their "
        "input on a 1-rank group, and DeepSeekMoE skips its collectives on a 1-rank EP "
        "group.",
        "Most self CPU time per step (torch.profiler, 3 steps, after the timing): "
        + " | ".join(profiles) + ".",
    ])
