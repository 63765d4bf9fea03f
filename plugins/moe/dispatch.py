"""Expert-parallel token dispatch and combine for DeepSeek-V3 MoE, as plain torch.distributed.

Layout: E routed experts split evenly over the EP group's `ep` ranks; rank r owns experts
[r*E/ep, (r+1)*E/ep) and calls them local experts 0 .. E/ep-1.

    d   = dispatch(hidden [T, H], indices [T, K], E, group, fp8=...)
    out = experts(d.tokens [N, H] grouped by local expert, d.tokens_per_expert)   [N, H]
    y   = combine(out, d, gates [T, K], group)                                     [T, H]

Every exchange is `all_to_all_single` with split sizes passed as Python lists of ints:
gloo rejects tensor split sizes (that is why Megatron's alltoall dispatcher fails on CPU).
Each dispatch first exchanges small int64 count tensors (one host sync, needed to know
the split sizes), then the payload.

FP8 (`fp8=True`, DeepSeek-V3's dispatch): the sender quantizes each token once with
power-of-two scales in 1x128 tiles (`plugins.fp8.quantize`) and sends, per (token,
expert) row, one packed uint8 buffer: H E4M3 bytes followed by the H/128 float32 scales
as 4*H/128 bytes ([rows, H + H/32] uint8), so the payload is a single all_to_all.
The receiver returns both the dequantized tokens (in the hidden dtype; exact, since the
scales are powers of two) and the raw q/scales for FP8 expert GEMMs. Only the forward
dispatch is quantized: its backward is straight-through (the gradient of dequantize o
quantize is taken as identity) and sends gradients back in their own dtype (fp32/BF16),
as DeepSeek-V3 does; combine always runs in the expert output's dtype.

Two-hop (`ranks_per_node=R`, nodes = consecutive groups of R ranks): DeepSeek-V3 sends a
token at most once to each target node, to the rank there with the sender's local index
("IB"), which forwards it to the ranks owning the chosen experts ("NVLink"). Combine
reverses it: the relay sums the gate-weighted expert outputs of each token it forwarded,
so a token crosses each node boundary once per direction. The received pairs, their
order and the grouping by expert are identical to flat dispatch; combine agrees with
flat up to fp32 rounding (the K-term sum is split per node).

Byte accounting (`bytes_sent`, `inter_node_bytes`): payload bytes of the hidden rows only
(FP8 bytes + scales, or the hidden dtype), rows a rank sends to itself excluded (they
never leave the device). The count exchanges and the two-hop routing metadata (int64
expert ids and source ranks, a few bytes per row) are not counted.

All ranks of the group must call dispatch/combine, and their backward, in the same order:
each is a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from plugins.fp8.quantize import dequantize, quantize

__all__ = ["Dispatched", "dispatch", "combine", "fp8_row_bytes"]

TILE = 128  # 1x128 quantization tiles along H, as DeepSeek-V3's FP8 dispatch
_BLOCK = (1, TILE)


@dataclass(frozen=True)
class _Hop:
    """One all_to_all: `rows` picks the sent rows from the source tensor, in send order."""

    rows: torch.Tensor  # [S] int64
    send_splits: list[int]  # rows to each rank of the group
    recv_splits: list[int]  # rows from each rank of the group


@dataclass(frozen=True)
class _Relay:
    """Two-hop bookkeeping on the relay rank, for combine."""

    unit: torch.Tensor  # [P2] int64, hop-1 received row (token) of each forwarded pair
    slot: torch.Tensor  # [P2] int64, which of the token's K choices that pair is
    units: int  # hop-1 received rows


@dataclass(frozen=True)
class Dispatched:
    """Tokens received by this rank and what combine needs to send results back.

    tokens            [N, H]  received (token, expert) rows, grouped by local expert
                              (within an expert: by source rank, then token order);
                              dequantized, in the hidden dtype; differentiable
    tokens_per_expert E/ep    Python ints, rows per local expert (sum N)
    fp8_q             [N, H]  float8_e4m3fn, the received E4M3 values (fp8 only, else None)
    fp8_scales        [N, H/128] float32 power-of-two scales (fp8 only, else None)
    bytes_sent        payload bytes this rank sent to other ranks (all hops)
    inter_node_bytes  payload bytes this rank sent to other nodes (0 with one node)
    """

    tokens: torch.Tensor
    tokens_per_expert: list[int]
    fp8_q: torch.Tensor | None
    fp8_scales: torch.Tensor | None
    bytes_sent: int
    inter_node_bytes: int
    num_tokens: int  # T
    top_k: int  # K
    # For combine: hops in dispatch order, the grouping permutation of the last hop's
    # received rows, how sent rows map back to tokens, and the relay's bookkeeping.
    hops: tuple[_Hop, ...]
    group_order: torch.Tensor  # [N] int64, tokens = last hop's received rows[group_order]
    sent_token: torch.Tensor  # [S1] int64, token of each row sent in hop 1
    sent_slot: torch.Tensor  # [S1] int64, flat: its choice k; two-hop: unused (-1)
    relay: _Relay | None


# --------------------------------------------------------------------------- all-to-all


def _all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group):
    """x [sum(send_splits), ...] -> [sum(recv_splits), ...]; splits are lists (gloo)."""
    if dist.get_world_size(group) == 1:  # EP = 1: everything stays here, no collective
        return x
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


def _exchange_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """counts [ep, c] int64 (row r: to rank r) -> [ep, c] (row r: from rank r)."""
    return _all_to_all(counts, [1] * counts.shape[0], [1] * counts.shape[0], group)


class _Exchange(torch.autograd.Function):
    """Send x[rows] (or its packed FP8 `wire` rows) to the group; backward sends back.

    Returns (received values [R, H] in x.dtype, received wire [R, B] uint8 or empty).
    Backward is the reverse all_to_all of the gradient in its own dtype, scattered (with
    accumulation: a row may be sent to several ranks) into x's rows: straight-through
    for the FP8 wire.
    """

    @staticmethod
    def forward(ctx, x, rows, send_splits, recv_splits, group, wire):
        ctx.save_for_backward(rows)
        ctx.splits = (send_splits, recv_splits)
        ctx.group = group
        ctx.num_rows = x.shape[0]
        if wire is None:
            out = _all_to_all(x.index_select(0, rows), send_splits, recv_splits, group)
            empty = torch.empty(0, dtype=torch.uint8, device=x.device)
            ctx.mark_non_differentiable(empty)
            return out, empty
        received = _all_to_all(wire.index_select(0, rows), send_splits, recv_splits, group)
        q, scales = _unpack(received, x.shape[1])
        ctx.mark_non_differentiable(received)
        return dequantize(q, scales, _BLOCK, x.dtype), received

    @staticmethod
    def backward(ctx, grad, _grad_wire):
        (rows,) = ctx.saved_tensors
        send_splits, recv_splits = ctx.splits
        back = _all_to_all(grad, recv_splits, send_splits, ctx.group)  # [S, H]
        grad_x = grad.new_zeros((ctx.num_rows,) + tuple(grad.shape[1:]))
        return grad_x.index_add_(0, rows, back), None, None, None, None, None


def _send(x, hop: _Hop, group, wire=None):
    return _Exchange.apply(x, hop.rows, hop.send_splits, hop.recv_splits, group, wire)


# --------------------------------------------------------------------------- FP8 wire


def fp8_row_bytes(hidden_size: int) -> int:
    """Wire bytes of one FP8 row: H E4M3 bytes + H/128 float32 scales."""
    return hidden_size + 4 * (hidden_size // TILE)


def _pack(hidden: torch.Tensor) -> torch.Tensor:
    """hidden [T, H] -> [T, H + H/32] uint8: E4M3 bytes, then the float32 scales' bytes."""
    q, scales = quantize(hidden, _BLOCK, power_of_two_scales=True)
    return torch.cat([q.view(torch.uint8), scales.view(torch.uint8)], dim=1)


def _unpack(packed: torch.Tensor, hidden_size: int):
    """[R, H + H/32] uint8 -> (q [R, H] float8_e4m3fn, scales [R, H/128] float32)."""
    q = packed[:, :hidden_size].contiguous().view(torch.float8_e4m3fn)
    scales = packed[:, hidden_size:].contiguous().view(torch.float32)
    return q, scales


def _row_bytes(hidden: torch.Tensor, fp8: bool) -> int:
    return fp8_row_bytes(hidden.shape[1]) if fp8 else hidden.shape[1] * hidden.element_size()


# --------------------------------------------------------------------------- checks


def _check(hidden, indices, num_experts, ep, fp8, ranks_per_node, two_hop):
    if hidden.dim() != 2 or indices.dim() != 2 or indices.shape[0] != hidden.shape[0]:
        raise ValueError(f"dispatch: expected hidden [T, H] and indices [T, K]; got "
                         f"{tuple(hidden.shape)} and {tuple(indices.shape)}")
    if fp8 and hidden.shape[1] % TILE:
        raise ValueError(
            f"FP8 dispatch quantizes 1x{TILE} tiles: --hidden-size ({hidden.shape[1]}) must "
            f"be a multiple of {TILE}; use a multiple of {TILE} or dispatch with fp8=False")
    if num_experts % ep:
        raise ValueError(
            f"--num-experts ({num_experts}) must be divisible by "
            f"--expert-model-parallel-size ({ep}) to split experts evenly over EP ranks")
    if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < num_experts:
        raise ValueError(f"dispatch: expert indices must be in [0, {num_experts}); got "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    if ranks_per_node is not None and (ranks_per_node < 1 or ep % ranks_per_node):
        raise ValueError(f"dispatch: ranks_per_node ({ranks_per_node}) must divide the "
                         f"expert-parallel size ({ep})")
    if two_hop and ranks_per_node is None:
        raise ValueError("dispatch: two_hop=True needs ranks_per_node")


# --------------------------------------------------------------------------- dispatch


def dispatch(hidden: torch.Tensor, indices: torch.Tensor, num_experts: int, group=None, *,
             fp8: bool, ranks_per_node: int | None = None,
             two_hop: bool | None = None) -> Dispatched:
    """Send each (token, chosen expert) row of hidden [T, H] to the rank owning the expert.

    indices [T, K] int64 (distinct experts per token, as `route` gives). `ranks_per_node`
    sets the (simulated) node size for `inter_node_bytes` and, unless two_hop=False,
    selects the node-aware two-hop dispatch; None: the whole group is one node, flat.
    """
    ep, me = dist.get_world_size(group), dist.get_rank(group)
    _check(hidden, indices, num_experts, ep, fp8, ranks_per_node, two_hop)
    if two_hop is None:
        two_hop = ranks_per_node is not None and ranks_per_node < ep
    rpn = ep if ranks_per_node is None else ranks_per_node
    wire = _pack(hidden) if fp8 else None  # [T, H + H/32] uint8; quantized once per token
    plan = _flat if not two_hop else _two_hop
    return plan(hidden, wire, indices.long(), num_experts // ep, ep, me, rpn, group)


def _grouping(recv_counts: torch.Tensor, src: torch.Tensor, ep: int) -> torch.Tensor:
    """Permutation [R] grouping received rows by local expert, then source rank.

    recv_counts [ep, epr]: rows per (sender, local expert), the senders' blocks each
    sorted by local expert; src [R]: each row's source rank. Stable: token order stays.
    """
    epr = recv_counts.shape[1]
    ids = torch.arange(epr, device=src.device).repeat(ep)
    local = ids.repeat_interleave(recv_counts.reshape(-1))  # [R]
    return torch.sort(local * ep + src, stable=True).indices


def _bytes(send_splits, me, rpn, row_bytes):
    """(bytes to other ranks, bytes to other nodes) for one hop's send splits."""
    off_rank = sum(n for r, n in enumerate(send_splits) if r != me)
    off_node = sum(n for r, n in enumerate(send_splits) if r // rpn != me // rpn)
    return off_rank * row_bytes, off_node * row_bytes


def _flat(hidden, wire, indices, epr, ep, me, rpn, group) -> Dispatched:
    T, K = indices.shape
    expert = indices.reshape(-1)  # [T*K], pair p = t*K + k
    pair_order = torch.sort(expert, stable=True).indices  # [P] by expert, then token
    sent_expert = expert[pair_order]  # [P] ascending, so grouped by owner rank too
    counts = torch.bincount(sent_expert, minlength=epr * ep).view(ep, epr)  # [ep, epr]
    recv_counts = _exchange_counts(counts, group)  # [ep (source), epr]
    hop = _Hop(rows=pair_order // K, send_splits=counts.sum(1).tolist(),
               recv_splits=recv_counts.sum(1).tolist())

    received, packed = _send(hidden, hop, group, wire)  # [R, H] by source, then expert
    src = torch.arange(ep, device=indices.device).repeat_interleave(recv_counts.sum(1))
    order = _grouping(recv_counts, src, ep)  # [R]
    sent, crossed = _bytes(hop.send_splits, me, rpn, _row_bytes(hidden, wire is not None))
    return _result(received, packed, order, recv_counts.sum(0).tolist(), wire is not None,
                   sent, crossed, T, K, (hop,), pair_order // K, pair_order % K, None)


def _two_hop(hidden, wire, indices, epr, ep, me, rpn, group) -> Dispatched:
    T, K = indices.shape
    nodes, local_idx = ep // rpn, me % rpn
    node_of = indices // (epr * rpn)  # [T, K] node owning each chosen expert

    # Hop 1 ("IB"): token t once to each node it uses, to the rank with our local index.
    dev = indices.device
    hits = torch.zeros(nodes, T, dtype=torch.bool, device=dev)
    hits[node_of.reshape(-1), torch.arange(T, device=dev).repeat_interleave(K)] = True
    unit_node, unit_token = hits.nonzero(as_tuple=True)  # [U] by node, then token
    per_node = torch.bincount(unit_node, minlength=nodes)  # [nodes]
    counts1 = torch.zeros(nodes, rpn, dtype=torch.long, device=dev)
    counts1[:, local_idx] = per_node
    counts1 = counts1.view(ep, 1)
    recv1 = _exchange_counts(counts1, group).view(-1)  # [ep]
    hop1 = _Hop(rows=unit_token, send_splits=counts1.view(-1).tolist(),
                recv_splits=recv1.tolist())
    x1, packed1 = _send(hidden, hop1, group, wire)  # [U1, H]

    # The relay needs each unit's experts on its node (-1: elsewhere) and its source rank.
    on_node = node_of[unit_token] == unit_node[:, None]  # [U, K]
    meta = torch.where(on_node, indices[unit_token], -1)  # [U, K]
    meta1 = _all_to_all(meta, hop1.send_splits, hop1.recv_splits, group)  # [U1, K]
    src1 = torch.arange(ep, device=dev).repeat_interleave(recv1)  # [U1]

    # Hop 2 ("NVLink"): forward each (unit, expert) pair to its owner in our node.
    unit, slot = (meta1 >= 0).nonzero(as_tuple=True)  # [P2] pairs, row-major (unit, k)
    expert = meta1[unit, slot]  # [P2]
    key = expert * ep + src1[unit]  # owner rank, then local expert, then source rank
    pair_order = torch.sort(key, stable=True).indices  # [P2]
    unit, slot, expert = unit[pair_order], slot[pair_order], expert[pair_order]
    counts2 = torch.bincount(expert, minlength=epr * ep).view(ep, epr)
    recv_counts2 = _exchange_counts(counts2, group)  # [ep (relay), epr]
    hop2 = _Hop(rows=unit, send_splits=counts2.sum(1).tolist(),
                recv_splits=recv_counts2.sum(1).tolist())
    received, packed = _send(x1, hop2, group, packed1 if wire is not None else None)
    src = _all_to_all(src1[unit], hop2.send_splits, hop2.recv_splits, group)  # [R]

    order = _grouping(recv_counts2, src, ep)  # [R]
    row_bytes = _row_bytes(hidden, wire is not None)
    sent1, crossed = _bytes(hop1.send_splits, me, rpn, row_bytes)
    sent2, crossed2 = _bytes(hop2.send_splits, me, rpn, row_bytes)
    assert crossed2 == 0, "hop 2 must stay inside the node"
    relay = _Relay(unit=unit, slot=slot, units=x1.shape[0])
    return _result(received, packed, order, recv_counts2.sum(0).tolist(), wire is not None,
                   sent1 + sent2, crossed, T, K, (hop1, hop2), unit_token,
                   torch.full_like(unit_token, -1), relay)


def _result(received, packed, order, per_expert, fp8, sent, crossed, T, K, hops,
            sent_token, sent_slot, relay) -> Dispatched:
    q = scales = None
    if fp8:
        q, scales = _unpack(packed.index_select(0, order), received.shape[1])
    return Dispatched(
        tokens=received.index_select(0, order), tokens_per_expert=per_expert, fp8_q=q,
        fp8_scales=scales, bytes_sent=sent, inter_node_bytes=crossed, num_tokens=T,
        top_k=K, hops=hops, group_order=order, sent_token=sent_token, sent_slot=sent_slot,
        relay=relay)


# --------------------------------------------------------------------------- combine


def combine(expert_out: torch.Tensor, dispatched: Dispatched, gates: torch.Tensor,
            group=None) -> torch.Tensor:
    """expert_out [N, H] (rows as dispatched.tokens) -> sum_k gates[t, k] * out[t, k]: [T, H].

    The reverse all_to_all carries expert_out's dtype (the training dtype); the weighted
    sum is taken in fp32 and returned in expert_out's dtype. Differentiable w.r.t.
    expert_out and gates.
    """
    d = dispatched
    if expert_out.dim() != 2 or expert_out.shape[0] != d.tokens.shape[0]:
        raise ValueError(f"combine: expert_out must be [{d.tokens.shape[0]}, H] like "
                         f"dispatched.tokens; got {tuple(expert_out.shape)}")
    if tuple(gates.shape) != (d.num_tokens, d.top_k):
        raise ValueError(f"combine: gates must be [T, K] = [{d.num_tokens}, {d.top_k}]; "
                         f"got {tuple(gates.shape)}")
    arrived = _ungroup(expert_out, d.group_order)  # [R, H] in the last hop's arrival order
    if d.relay is None:
        return _combine_flat(arrived, d, gates, group)
    return _combine_two_hop(arrived, d, gates, group)


def _ungroup(x, order):
    """Undo tokens = received[order]: rows back to arrival order."""
    return x.index_select(0, torch.argsort(order))


def _back(x, hop: _Hop, group):
    """Reverse one dispatch hop: received rows -> rows in that hop's send order."""
    rows = torch.arange(x.shape[0], device=x.device)
    reverse = _Hop(rows=rows, send_splits=hop.recv_splits, recv_splits=hop.send_splits)
    return _send(x, reverse, group)[0]


def _combine_flat(arrived, d, gates, group):
    back = _back(arrived, d.hops[0], group)  # [P, H] pairs sorted by expert
    weight = gates[d.sent_token, d.sent_slot].float()  # [P]
    out = back.new_zeros(d.num_tokens, arrived.shape[1], dtype=torch.float32)
    return out.index_add(0, d.sent_token, back.float() * weight[:, None]).to(arrived.dtype)


def _combine_two_hop(arrived, d, gates, group):
    hop1, hop2 = d.hops
    relay = d.relay
    # The relay weighs its pairs, so gates travel hop 1 with the tokens ([U1, K], fp32).
    g1 = _send(gates.float(), hop1, group)[0]  # [U1, K]
    back2 = _back(arrived, hop2, group)  # [P2, H] at the relay, in its hop-2 send order
    weighted = back2.float() * g1[relay.unit, relay.slot][:, None]
    per_unit = back2.new_zeros(relay.units, arrived.shape[1], dtype=torch.float32)
    per_unit = per_unit.index_add(0, relay.unit, weighted).to(arrived.dtype)  # [U1, H]
    back1 = _back(per_unit, hop1, group)  # [U, H] one row per (token, node)
    out = back1.new_zeros(d.num_tokens, arrived.shape[1], dtype=torch.float32)
    return out.index_add(0, d.sent_token, back1.float()).to(arrived.dtype)
