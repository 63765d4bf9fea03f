"""Expert load balancing for DeepSeek-V3's router: auxiliary-loss-free bias updates,
the complementary sequence-wise balance loss, and load statistics.

Auxiliary-loss-free balancing (DeepSeek-V3 section 2.1.2): after each training step,
with load_i the number of tokens routed to expert i over the whole global batch,

    b_i += rate * sign(mean(load) - load_i)

so overloaded experts become less attractive to choose (the bias never weighs outputs).
The counts must be global: each rank sees only its part of the batch, so the caller sums
`expert_load` with `global_load` over every rank that sees other tokens (data- and
context-parallel ranks, and tensor-parallel ones under sequence parallelism) first.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["expert_load", "global_load", "update_expert_bias", "sequence_balance_loss", "imbalance"]


def expert_load(indices: torch.Tensor, num_experts: int,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens routed to each expert: indices [T, K] -> counts [E] int64, counting only
    the entries where `mask` (like indices) is True when given."""
    flat = indices.reshape(-1)  # [T*K]
    ones = (torch.ones_like(flat, dtype=torch.int64) if mask is None
            else mask.reshape(-1).to(torch.int64))
    # scatter_add_, not bincount: a fixed output size, so no host sync on GPU.
    return torch.zeros(num_experts, dtype=torch.int64, device=indices.device).scatter_add_(
        0, flat, ones)


def global_load(local_load: torch.Tensor, group) -> torch.Tensor:
    """Sum of `local_load` [E] over the ranks of `group` (None: the default group).

    Returns a new tensor; `local_load` is left as it was.
    """
    total = local_load.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


@torch.no_grad()
def update_expert_bias(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """In place b_i += rate * sign(mean(load) - load_i); `load` [E] is the global count."""
    load = load.float()
    bias.add_(torch.sign(load.mean() - load), alpha=rate)
    return bias


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, num_experts: int,
                          top_k: int, seq_len: int, alpha: float, group=None) -> torch.Tensor:
    """Complementary sequence-wise balance loss (DeepSeek-V3 eq. 17-20), averaged over sequences.

    For one sequence of T tokens, with N_r routed experts, K_r chosen per token and s_{i,t}
    the sigmoid affinity of token t for expert i:

        f_i      = N_r / (K_r * T) * sum_t 1[expert i is among token t's chosen experts]
        s'_{i,t} = s_{i,t} / sum_j s_{j,t}
        P_i      = (1/T) * sum_t s'_{i,t}
        L        = alpha * sum_i f_i * P_i

    f is a count (no gradient); the gradient flows through P into the scores. L equals
    alpha when routing or affinities are uniform, and grows as both concentrate on the same
    experts within a sequence.

    scores [B*S, E] (all experts, unbiased), indices [B*S, K], arranged batch-major: token t
    of sequence b is row b*S + t, with S = `seq_len` this rank's tokens of each sequence.

    Sequences split over ranks (context parallelism; sequence parallelism over the
    tensor-parallel ranks): every rank of `group` holds S tokens of each of the same B
    sequences (which ones, and their order, do not matter), so T = S * group size. The
    counts are summed over `group` (f is the whole sequence's) and P_i sums only this rank's
    tokens (still divided by the whole T). This rank's loss is then its share of L: the
    shares sum to L over `group`, and the gradient of the share w.r.t. this rank's scores
    is the gradient of L w.r.t. them. `group` None or of one rank: whole sequences here.
    """
    rows, E = scores.shape
    if rows % seq_len:
        raise ValueError(f"{rows} tokens are not a whole number of sequences of {seq_len}")
    ranks = 1 if group is None else dist.get_world_size(group)
    B, S, K = rows // seq_len, seq_len, top_k
    T = S * ranks  # whole sequence: Megatron splits it evenly over CP (and SP) ranks

    s = scores.float().view(B, S, E)
    P = (s / (s.sum(dim=-1, keepdim=True) + 1e-20)).sum(dim=1) / T  # [B, E], this rank's part
    chosen = indices.reshape(B, S * K)  # [B, S*K]
    counts = torch.zeros(B, E, dtype=s.dtype, device=s.device).scatter_add_(
        1, chosen, torch.ones_like(chosen, dtype=s.dtype)
    )  # [B, E], this rank's tokens; fp32 counts are exact below 2^24
    if ranks > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)  # [B, E], whole sequences
    f = counts * (num_experts / (K * T))  # [B, E]
    return alpha * (f * P).sum(dim=-1).mean()


def imbalance(load: torch.Tensor) -> torch.Tensor:
    """max / mean of per-expert counts [E] (1.0 = perfectly balanced), a 0-d fp32 tensor."""
    load = load.float()
    return load.max() / load.mean()
