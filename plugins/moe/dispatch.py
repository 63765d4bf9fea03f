"""Expert-parallel token dispatch and combine for DeepSeek-V3 MoE, as plain torch.distributed.

Layout: E routed experts split evenly over the EP group's `ep` ranks; rank r owns experts
[r*E/ep, (r+1)*E/ep) and calls them local experts 0 .. E/ep-1.

    d   = dispatch(hidden [T, H], indices [T, K], E, group, fp8=...)
    out = experts(d.tokens [N, H] grouped by local expert, d.tokens_per_expert)   [N, H]
    y   = combine(out, d, gates [T, K], group)                                     [T, H]

Every exchange is `all_to_all_single` with split sizes passed as Python lists of ints:
gloo rejects tensor split sizes (that is why Megatron's alltoall dispatcher fails on CPU).
Each hop first exchanges small int64 count tensors, then the payload. Reading the counts
is the hop's one host sync (the split sizes must be on the host); nothing else in
dispatch or combine waits for the device: no value checks, no data-dependent shapes
(row positions come from sorts and offsets of counts the host already has). Row
reorderings are permutations whose backward gathers with the inverse permutation.

FP8 (`fp8=True`, DeepSeek-V3's dispatch): the sender quantizes each token once with
power-of-two scales in 1x128 tiles (`plugins.common.quantize`) and sends, per (token,
expert) row, one packed uint8 buffer: H E4M3 bytes followed by the H/128 float32 scales
as 4*H/128 bytes ([rows, H + H/32] uint8), so the payload is a single all_to_all. Tiles
with inf or NaN are counted, and the count travels with the split sizes: every rank
raises before any payload moves.
The receiver returns both the dequantized tokens (in the hidden dtype; exact, since the
scales are powers of two) and the raw q/scales for FP8 expert GEMMs. Only the forward
dispatch is quantized: its backward is straight-through (the gradient of dequantize o
quantize is taken as identity) and sends gradients back in their own dtype (fp32/BF16),
as DeepSeek-V3 does; combine always runs in the expert output's dtype.

Padding (`pad_to=m`, for FP8 experts whose GEMMs take row counts in multiples of m without
a copy): the received rows are laid out grouped by local expert with each expert's rows
followed by zero rows up to a multiple of m (FP8: zero codes with a zero tile's scale,
2^-126), in the same pass that groups them (rows placed into a zeroed buffer instead of
gathered); `tokens_per_expert` counts the padding, combine drops it. Nothing extra is sent.

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

from plugins.common.quantize import dequantize, quantize, raise_if_non_finite
from plugins.common.tiles import SMALLEST_NORMAL_FP32
from plugins.moe.balance import expert_load

__all__ = ["Dispatched", "dispatch", "combine", "fp8_row_bytes"]

TILE = 128  # 1x128 quantization tiles along H, as DeepSeek-V3's FP8 dispatch
_BLOCK = (1, TILE)


@dataclass(frozen=True)
class _Rows:
    """x[index]: which rows of a tensor, in which order. With `inverse`, index is
    order // copies for a permutation `order` of copies x (rows of x) whose inverse is
    `inverse` (flat dispatch sends each token once per chosen expert): backward then
    gathers each row's gradients and sums its copies, where otherwise it scatter-adds
    (serial on the CPU, nondeterministic on a GPU)."""

    index: torch.Tensor  # [S] int64
    inverse: torch.Tensor | None = None  # [S] int64
    copies: int = 1

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, self.index)

    def put_back(self, grad: torch.Tensor, num_rows: int) -> torch.Tensor:
        """The gradient of x [num_rows, ...] from that of take(x)."""
        if self.inverse is None:
            zeros = grad.new_zeros((num_rows,) + tuple(grad.shape[1:]))
            return zeros.index_add_(0, self.index, grad)
        grad = grad.index_select(0, self.inverse)  # copy c of row r at r * copies + c
        if self.copies == 1:
            return grad
        return grad.view(num_rows, self.copies, *grad.shape[1:]).sum(1)


def _permutation(order: torch.Tensor, inverse: torch.Tensor | None = None,
                 copies: int = 1) -> _Rows:
    """Rows order // copies, with the inverse of the permutation `order`."""
    if inverse is None:
        inverse = torch.empty_like(order).index_copy_(
            0, order, torch.arange(order.numel(), device=order.device))
    return _Rows(order // copies if copies > 1 else order, inverse, copies)


class _Reorder(torch.autograd.Function):
    """rows.take(x), differentiable."""

    @staticmethod
    def forward(ctx, x, rows: _Rows):
        ctx.rows, ctx.num_rows = rows, x.shape[0]
        return rows.take(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.rows.put_back(grad, ctx.num_rows), None


def _reorder(x: torch.Tensor, rows: _Rows | None) -> torch.Tensor:
    return x if rows is None else _Reorder.apply(x, rows)


class _Place(torch.autograd.Function):
    """x's rows at rows.index of `size` zero rows (the reverse of `_Reorder`): received
    rows into their padded grouped layout; backward gathers them back. rows.index is
    one-to-one, so each row is one add to zero: exact, in any order."""

    @staticmethod
    def forward(ctx, x, rows: _Rows, size: int):
        ctx.rows = rows
        return rows.put_back(x, size)

    @staticmethod
    def backward(ctx, grad):
        return ctx.rows.take(grad), None, None


@dataclass(frozen=True)
class _Hop:
    """One all_to_all: `rows` picks the sent rows of the source tensor in send order
    (None: all of them, in order)."""

    send_splits: list[int]  # rows to each rank of the group
    recv_splits: list[int]  # rows from each rank of the group
    rows: _Rows | None = None

    def reverse(self) -> "_Hop":
        """Sends the received rows back, in order."""
        return _Hop(self.recv_splits, self.send_splits)


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
                              (within an expert: by source rank, then token order,
                              then `pad_to` zero rows); dequantized, in the hidden dtype;
                              differentiable
    tokens_per_expert E/ep    Python ints, rows per local expert, padding included (sum N)
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
    # For combine: hops in dispatch order; how the last hop's received rows were grouped
    # (None: they came grouped, as at EP = 1); flat: the pairs' send order; two-hop: the
    # token of each row sent in hop 1, and the relay's bookkeeping.
    hops: tuple[_Hop, ...]
    grouping: _Rows | None
    pairs: _Rows | None = None
    sent_token: torch.Tensor | None = None
    relay: _Relay | None = None
    # With padding: each received row's row in `tokens` (then `grouping` is not used).
    placed: _Rows | None = None


# --------------------------------------------------------------------------- all-to-all


def _all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group):
    """x [sum(send_splits), ...] -> [sum(recv_splits), ...]; splits are lists (gloo)."""
    if dist.get_world_size(group) == 1:  # EP = 1: everything stays here, no collective
        return x
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


@dataclass(frozen=True)
class _Counts:
    """A hop's row counts after their exchange: `sent` [ep, c] (row r: to rank r) and
    `received` [ep, c] (row r: from rank r) on the device, and on the host."""

    received: torch.Tensor
    sent_rows: list[int]  # rows to each rank
    received_rows: list[int]  # rows from each rank
    received_per_column: list[int]  # rows received per column (local expert)
    bad_tiles: list[int]  # non-finite FP8 tiles each rank reported


def _exchange_counts(counts: torch.Tensor, group, bad_tiles: torch.Tensor | None = None
                     ) -> _Counts:
    """Sends counts[r] to rank r. The hop's one host sync: the split sizes. `bad_tiles`
    (0-d int64, FP8 dispatch): this rank's non-finite tiles, sent to every rank with the
    counts, so that all ranks learn of them before any payload moves."""
    ep = counts.shape[0]
    flag = counts.new_zeros(()) if bad_tiles is None else bad_tiles
    sent = torch.cat([counts, flag.expand(ep, 1)], dim=1)  # [ep, c + 1]
    received = _all_to_all(sent, [1] * ep, [1] * ep, group)
    host_sent, host_received = torch.stack([sent, received]).tolist()
    return _Counts(received=received[:, :-1],
                   sent_rows=[sum(row[:-1]) for row in host_sent],
                   received_rows=[sum(row[:-1]) for row in host_received],
                   received_per_column=[sum(col) for col in zip(*host_received)][:-1],
                   bad_tiles=[row[-1] for row in host_received])


class _Exchange(torch.autograd.Function):
    """Send hop.rows of x (or of its packed FP8 `wire`) to the group; backward sends back.

    Returns (received values [R, H] in x.dtype, received wire [R, B] uint8 or empty).
    Backward is the reverse all_to_all of the gradient in its own dtype, put back into
    x's rows (summed where a row was sent several times): straight-through for the FP8
    wire.
    """

    @staticmethod
    def forward(ctx, x, hop: _Hop, group, wire):
        ctx.hop, ctx.group, ctx.num_rows = hop, group, x.shape[0]
        payload = x if wire is None else wire
        if hop.rows is not None:
            payload = hop.rows.take(payload)
        received = _all_to_all(payload, hop.send_splits, hop.recv_splits, group)
        if wire is None:
            empty = torch.empty(0, dtype=torch.uint8, device=x.device)
            ctx.mark_non_differentiable(empty)
            return received, empty
        ctx.mark_non_differentiable(received)
        q, scales = _unpack(received, x.shape[1])
        return dequantize(q, scales, _BLOCK, x.dtype), received

    @staticmethod
    def backward(ctx, grad, _grad_wire):
        hop = ctx.hop
        back = _all_to_all(grad, hop.recv_splits, hop.send_splits, ctx.group)  # [S, H]
        if hop.rows is not None:
            back = hop.rows.put_back(back, ctx.num_rows)
        return back, None, None, None


def _send(x, hop: _Hop, group, wire=None):
    return _Exchange.apply(x, hop, group, wire)


# --------------------------------------------------------------------------- FP8 wire


def fp8_row_bytes(hidden_size: int) -> int:
    """Wire bytes of one FP8 row: H E4M3 bytes + H/128 float32 scales."""
    return hidden_size + 4 * (hidden_size // TILE)


def _pack(hidden: torch.Tensor) -> torch.Tensor:
    """hidden [T, H] -> [T, H + H/32] uint8: E4M3 bytes, then the float32 scales' bytes.
    Unchecked here (a tile with inf or NaN gets scale inf): `_raise_if_non_finite`.
    Outside autograd: the wire carries no gradient (`_Exchange` is straight-through), and
    recorded, the quantization would keep its fp32 intermediates alive with the wire
    until backward (the GPU's Triton kernel records none)."""
    with torch.no_grad():
        q, scales = quantize(hidden, _BLOCK, power_of_two_scales=True, check_finite=False)
    return torch.cat([q.view(torch.uint8), scales.view(torch.uint8)], dim=1)


def _unpack(packed: torch.Tensor, hidden_size: int):
    """[R, H + H/32] uint8 -> (q [R, H] float8_e4m3fn, scales [R, H/128] float32)."""
    q = packed[:, :hidden_size].contiguous().view(torch.float8_e4m3fn)
    scales = packed[:, hidden_size:].contiguous().view(torch.float32)
    return q, scales


def _bad_tiles(wire: torch.Tensor | None, hidden_size: int) -> torch.Tensor | None:
    return None if wire is None else (~torch.isfinite(_unpack(wire, hidden_size)[1])).sum()


def _raise_if_non_finite(counts: _Counts, wire, hidden_size: int, me: int) -> None:
    """Every rank raises when any rank's tokens had inf or NaN (before any payload moves:
    no rank is left waiting in an all_to_all); the rank holding them names the tile."""
    if not any(counts.bad_tiles):
        return
    if counts.bad_tiles[me]:
        raise_if_non_finite(_unpack(wire, hidden_size)[1], _BLOCK, "FP8 dispatch: hidden")
    ranks = [r for r, bad in enumerate(counts.bad_tiles) if bad]
    raise ValueError(f"FP8 dispatch: rank(s) {ranks} of the expert-parallel group hold "
                     "tokens with inf or NaN")


def _row_bytes(hidden: torch.Tensor, fp8: bool) -> int:
    return fp8_row_bytes(hidden.shape[1]) if fp8 else hidden.shape[1] * hidden.element_size()


# --------------------------------------------------------------------------- checks


def _check(hidden, indices, num_experts, ep, fp8, ranks_per_node, two_hop, pad_to):
    """Shapes and sizes only (no host sync); expert indices in [0, num_experts) are the
    caller's promise (`route` gives them)."""
    if pad_to < 1:
        raise ValueError(f"dispatch: pad_to ({pad_to}) must be at least 1")
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
    if ranks_per_node is not None and (ranks_per_node < 1 or ep % ranks_per_node):
        raise ValueError(f"dispatch: ranks_per_node ({ranks_per_node}) must divide the "
                         f"expert-parallel size ({ep})")
    if two_hop and ranks_per_node is None:
        raise ValueError("dispatch: two_hop=True needs ranks_per_node")


# --------------------------------------------------------------------------- dispatch


def dispatch(hidden: torch.Tensor, indices: torch.Tensor, num_experts: int, group=None, *,
             fp8: bool, ranks_per_node: int | None = None,
             two_hop: bool | None = None, pad_to: int = 1) -> Dispatched:
    """Send each (token, chosen expert) row of hidden [T, H] to the rank owning the expert.

    indices [T, K] int64 in [0, num_experts) (distinct experts per token, as `route`
    gives). `ranks_per_node` sets the (simulated) node size for `inter_node_bytes` and,
    unless two_hop=False, selects the node-aware two-hop dispatch; None: the whole group
    is one node, flat. `pad_to`: each local expert's rows padded with zero rows to a
    multiple of it (see the module docstring; 1: no padding).
    """
    ep, me = dist.get_world_size(group), dist.get_rank(group)
    _check(hidden, indices, num_experts, ep, fp8, ranks_per_node, two_hop, pad_to)
    if two_hop is None:
        two_hop = ranks_per_node is not None and ranks_per_node < ep
    rpn = ep if ranks_per_node is None else ranks_per_node
    wire = _pack(hidden) if fp8 else None  # [T, H + H/32] uint8; quantized once per token
    plan = _flat if not two_hop else _two_hop
    return plan(hidden, wire, indices.long(), num_experts // ep, ep, me, rpn, group, pad_to)


def _by_column(counts: torch.Tensor, rows: int) -> _Rows:
    """Rows laid out in blocks counts[i, j] (row-major: block (0, 0), (0, 1), ...) regrouped
    column-major (block (0, 0), (1, 0), ...), each block's rows in their order: received
    rows, which come by source rank then local expert, grouped by local expert then source
    rank. Built from offsets, no sort and no host sync."""

    def starts(blocks):  # exclusive cumulative sum
        return blocks.cumsum(0) - blocks

    by_row = counts.reshape(-1)  # [ep * epr], the received layout
    by_col = counts.t().reshape(-1)  # the grouped layout
    shift = (starts(by_row).view(counts.shape).t().reshape(-1) - starts(by_col))  # per block
    order = torch.arange(rows, device=counts.device) + shift.repeat_interleave(
        by_col, output_size=rows)
    return _permutation(order)


def _flat(hidden, wire, indices, epr, ep, me, rpn, group, pad_to) -> Dispatched:
    T, K = indices.shape
    expert = indices.reshape(-1)  # [T*K], pair p = t*K + k
    pair_order = torch.sort(expert, stable=True).indices  # [P] by expert, then token
    counts = _exchange_counts(expert_load(indices, epr * ep).view(ep, epr), group,
                              _bad_tiles(wire, hidden.shape[1]))
    _raise_if_non_finite(counts, wire, hidden.shape[1], me)
    pairs = _permutation(pair_order)
    hop = _Hop(counts.sent_rows, counts.received_rows, _permutation(pair_order, pairs.inverse, K))

    received, packed = _send(hidden, hop, group, wire)  # [R, H] by source, then expert
    grouping = _by_column(counts.received, received.shape[0]) if ep > 1 else None
    sent, crossed = _bytes(hop.send_splits, me, rpn, _row_bytes(hidden, wire is not None))
    return _result(received, packed, grouping, counts, pad_to, sent, crossed,
                   T, K, (hop,), pairs=pairs)


def _grouping(recv_counts: torch.Tensor, src: torch.Tensor, ep: int) -> _Rows:
    """Grouping of received rows by local expert, then source rank (two-hop: rows from
    several relays interleave their sources).

    recv_counts [ep, epr]: rows per (sender, local expert), the senders' blocks each
    sorted by local expert; src [R]: each row's source rank. Stable: token order stays.
    """
    epr = recv_counts.shape[1]
    ids = torch.arange(epr, device=src.device).repeat(ep)
    local = ids.repeat_interleave(recv_counts.reshape(-1), output_size=src.numel())  # [R]
    return _permutation(torch.sort(local * ep + src, stable=True).indices)


def _first(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Flat positions of mask's True entries, in order: nonzero() without its host sync,
    for a `count` the host already knows."""
    return torch.sort(mask.logical_not().reshape(-1).to(torch.int8), stable=True).indices[:count]


def _bytes(send_splits, me, rpn, row_bytes):
    """(bytes to other ranks, bytes to other nodes) for one hop's send splits."""
    off_rank = sum(n for r, n in enumerate(send_splits) if r != me)
    off_node = sum(n for r, n in enumerate(send_splits) if r // rpn != me // rpn)
    return off_rank * row_bytes, off_node * row_bytes


def _two_hop(hidden, wire, indices, epr, ep, me, rpn, group, pad_to) -> Dispatched:
    T, K = indices.shape
    nodes, local_idx = ep // rpn, me % rpn
    node_of = indices // (epr * rpn)  # [T, K] node owning each chosen expert

    # Hop 1 ("IB"): token t once to each node it uses, to the rank with our local index.
    dev = indices.device
    hits = torch.zeros(nodes, T, dtype=torch.bool, device=dev)
    hits[node_of.reshape(-1), torch.arange(T, device=dev).repeat_interleave(K)] = True
    counts1 = torch.zeros(nodes, rpn, dtype=torch.long, device=dev)
    counts1[:, local_idx] = hits.sum(1)  # [nodes] tokens to each node
    counts1 = _exchange_counts(counts1.view(ep, 1), group, _bad_tiles(wire, hidden.shape[1]))
    _raise_if_non_finite(counts1, wire, hidden.shape[1], me)
    unit = _first(hits, sum(counts1.sent_rows))  # [U] by node, then token
    unit_node, unit_token = unit // T, unit % T
    hop1 = _Hop(counts1.sent_rows, counts1.received_rows, _Rows(unit_token))
    x1, packed1 = _send(hidden, hop1, group, wire)  # [U1, H]

    # The relay needs each unit's experts on its node (-1: elsewhere) and its source rank.
    on_node = node_of[unit_token] == unit_node[:, None]  # [U, K]
    meta = torch.where(on_node, indices[unit_token], -1)  # [U, K]
    meta1 = _all_to_all(meta, hop1.send_splits, hop1.recv_splits, group)  # [U1, K]
    src1 = torch.arange(ep, device=dev).repeat_interleave(
        counts1.received.reshape(-1), output_size=x1.shape[0])  # [U1]

    # Hop 2 ("NVLink"): forward each (unit, expert) pair to its owner in our node.
    forwarded = meta1 >= 0  # [U1, K]
    counts2 = _exchange_counts(
        expert_load(meta1.clamp_min(0), epr * ep, forwarded).view(ep, epr), group)
    # Pairs in row-major (unit, k) order, then by owner rank, local expert, source rank.
    key = torch.where(forwarded, meta1 * ep + src1[:, None], (epr * ep) * ep)  # [U1, K]
    pair = torch.sort(key.reshape(-1), stable=True).indices[:sum(counts2.sent_rows)]  # [P2]
    unit, slot = pair // K, pair % K
    hop2 = _Hop(counts2.sent_rows, counts2.received_rows, _Rows(unit))
    received, packed = _send(x1, hop2, group, packed1 if wire is not None else None)
    src = _all_to_all(src1[unit], hop2.send_splits, hop2.recv_splits, group)  # [R]

    grouping = _grouping(counts2.received, src, ep)  # [R]
    row_bytes = _row_bytes(hidden, wire is not None)
    sent1, crossed = _bytes(hop1.send_splits, me, rpn, row_bytes)
    sent2, crossed2 = _bytes(hop2.send_splits, me, rpn, row_bytes)
    assert crossed2 == 0, "hop 2 must stay inside the node"
    relay = _Relay(unit=unit, slot=slot, units=x1.shape[0])
    return _result(received, packed, grouping, counts2, pad_to, sent1 + sent2,
                   crossed, T, K, (hop1, hop2), sent_token=unit_token, relay=relay)


def _placement(grouping: _Rows | None, per_expert: torch.Tensor, pad_to: int,
               rows: int) -> _Rows:
    """Each received row's row in the grouped layout with every local expert's rows
    (per_expert [epr], on the device) padded to a multiple of pad_to."""
    pads = -per_expert % pad_to  # [epr]
    shift = (pads.cumsum(0) - pads).repeat_interleave(per_expert, output_size=rows)
    grouped = (torch.arange(rows, device=per_expert.device) if grouping is None
               else grouping.inverse)  # [R] each received row's grouped row
    return _Rows(grouped + shift[grouped])


def _result(received, packed, grouping, counts: _Counts, pad_to, sent, crossed, T, K, hops,
            **for_combine) -> Dispatched:
    per_expert = counts.received_per_column
    placed = None
    if any(c % pad_to for c in per_expert):
        placed = _placement(grouping, counts.received.sum(0), pad_to, received.shape[0])
        per_expert = [c + -c % pad_to for c in per_expert]
    q = scales = None
    if packed.dim() == 2:  # the FP8 wire (else an empty placeholder)
        if placed is not None:  # zero codes; scales as the quantizer gives a zero tile
            grouped = packed.new_zeros(sum(per_expert), packed.shape[1])
            grouped[:, received.shape[1]:].view(torch.float32).fill_(SMALLEST_NORMAL_FP32)
            grouped.index_copy_(0, placed.index, packed)
        else:
            grouped = packed if grouping is None else grouping.take(packed)
        q, scales = _unpack(grouped, received.shape[1])
    tokens = (_reorder(received, grouping) if placed is None
              else _Place.apply(received, placed, sum(per_expert)))
    return Dispatched(
        tokens=tokens, tokens_per_expert=per_expert, fp8_q=q,
        fp8_scales=scales, bytes_sent=sent, inter_node_bytes=crossed, num_tokens=T,
        top_k=K, hops=hops, grouping=grouping, placed=placed, **for_combine)


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
    # Back to the last hop's arrival order (padding rows dropped).
    if d.placed is not None:
        arrived = _reorder(expert_out, d.placed)
    else:
        arrived = expert_out if d.grouping is None else _reorder(expert_out,
                                                                  _inverse(d.grouping))
    if d.relay is None:
        return _combine_flat(arrived, d, gates, group)
    return _combine_two_hop(arrived, d, gates, group)


def _inverse(rows: _Rows) -> _Rows:
    return _Rows(rows.inverse, rows.index)


def _back(x, hop: _Hop, group):
    """Reverse one dispatch hop: received rows -> rows in that hop's send order."""
    if dist.get_world_size(group) == 1:
        return x
    return _send(x, hop.reverse(), group)[0]


def _combine_flat(arrived, d, gates, group):
    back = _back(arrived, d.hops[0], group)  # [P, H] pairs sorted by expert
    by_token = _reorder(back, _inverse(d.pairs)).view(d.num_tokens, d.top_k, -1)  # [T, K, H]
    out = torch.bmm(gates.float().unsqueeze(1), by_token.float())  # [T, 1, H]
    return out.squeeze(1).to(arrived.dtype)


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
