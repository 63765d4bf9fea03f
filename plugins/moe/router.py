"""DeepSeek-V3's sigmoid router with group (node) limited top-k, as plain torch.

For each token (E experts in G groups of E/G, choose K experts from at most M groups):

  scores  = sigmoid(hidden @ W^T)                 in fp32      [T, E]
  choice  = scores + expert_bias                  bias only picks experts, never weighs them
  group   = sum of the top-2 choice scores in each group      [T, G]
  keep the M best groups, mask the other groups' experts to -inf
  indices = top-K experts by choice score                     [T, K]
  gates   = scores[indices] / sum(scores[indices]) * scaling  [T, K]  (the unbiased scores)

With experts laid out so that each group is one node's experts (Megatron's
`--moe-router-num-groups` = number of nodes in the expert-parallel group), M bounds how
many nodes a token is sent to (DeepSeek-V3: 256 experts, 8 groups, M=4, K=8).

Differences from other implementations, on purpose:
  * Hugging Face's DeepseekV3TopkRouter masks the dropped groups with 0.0, so when the
    kept experts' biased scores are negative (a bias below -1) it picks experts from
    dropped groups; DeepSeek's inference code and Megatron mask with -inf, as here.
  * Megatron scores a group by its top (K/M) experts; DeepSeek-V3 (and HF) by its top 2,
    as here. They agree for DeepSeek-V3's K=8, M=4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["RouterConfig", "route", "DeepSeekRouter"]


@dataclass(frozen=True)
class RouterConfig:
    num_experts: int  # routed experts E (`--num-experts`); shared experts are not routed
    top_k: int  # experts per token K (`--moe-router-topk`); DeepSeek-V3: 8
    num_groups: int = 1  # groups G (n_group); = nodes, so a group limit is a node limit
    group_top_k: int = 1  # groups a token may use M (topk_group); bounds all-to-all fan-out
    scaling_factor: float = 1.0  # routed_scaling_factor; gates sum to it, keeps expert output scale
    normalize: bool = True  # norm_topk_prob; sigmoid scores don't sum to 1 on their own

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_groups

    def validate(self) -> None:
        """Raise ValueError, naming Megatron's flags, for a configuration that cannot route."""
        if self.num_experts < 1:
            raise ValueError(f"--num-experts must be >= 1, got {self.num_experts}")
        if self.num_groups < 1:
            raise ValueError(f"--moe-router-num-groups must be >= 1, got {self.num_groups}")
        if self.num_experts % self.num_groups:
            raise ValueError(
                f"--num-experts ({self.num_experts}) must be divisible by "
                f"--moe-router-num-groups ({self.num_groups})"
            )
        if self.num_groups > 1 and self.experts_per_group < 2:
            # a group is scored by its top-2 experts
            raise ValueError(
                f"--num-experts ({self.num_experts}) / --moe-router-num-groups "
                f"({self.num_groups}) must give at least 2 experts per group"
            )
        if not 1 <= self.group_top_k <= self.num_groups:
            raise ValueError(
                f"--moe-router-group-topk ({self.group_top_k}) must be in "
                f"[1, --moe-router-num-groups ({self.num_groups})]"
            )
        if self.top_k < 1:
            raise ValueError(f"--moe-router-topk must be >= 1, got {self.top_k}")
        available = self.group_top_k * self.experts_per_group
        if self.top_k > available:
            raise ValueError(
                f"--moe-router-topk ({self.top_k}) exceeds the {available} experts that "
                f"--moe-router-group-topk ({self.group_top_k}) groups of "
                f"{self.experts_per_group} experts offer"
            )
        if not self.scaling_factor > 0:
            raise ValueError(
                f"--moe-router-topk-scaling-factor must be > 0, got {self.scaling_factor}"
            )


def _select(scores: torch.Tensor, expert_bias: torch.Tensor | None, config: RouterConfig):
    """Top-k routing of fp32 sigmoid scores [T, E] -> (indices [T, K], gates [T, K]), for a
    validated config. No check of the values, so no host sync."""
    T, E = scores.shape
    G, M, K = config.num_groups, config.group_top_k, config.top_k

    choice = scores.detach()  # [T, E]; choosing is not differentiable
    if expert_bias is not None:
        choice = choice + expert_bias.float()
    if G > 1:
        grouped = choice.view(T, G, E // G)  # [T, G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        kept = group_scores.topk(M, dim=-1).indices  # [T, M]
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)
        choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view(T, E)
    indices = choice.topk(K, dim=-1).indices  # [T, K]

    gates = scores.gather(1, indices)  # [T, K], unbiased
    if config.normalize:
        gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)  # eps as HF/Megatron: 0/0 guard
    return indices, gates * config.scaling_factor


def route(logits: torch.Tensor, expert_bias: torch.Tensor | None, config: RouterConfig):
    """Route router logits [T, E] -> (indices [T, K] int64, gates [T, K] float32).

    `expert_bias` [E] (or None) only changes which experts are chosen; the gates are the
    chosen experts' unbiased sigmoid scores (normalized over them when `config.normalize`)
    times `config.scaling_factor`. Checks its arguments: the config, the expert count,
    and NaN (which raises ValueError, a host sync). `DeepSeekRouter` checks its config once
    and never its values: NaN logits choose an expert (topk ranks NaN first) and give it a
    NaN gate, so they reach the loss, where Megatron's NaN check stops the run.
    """
    config.validate()
    if logits.shape[-1] != config.num_experts:
        raise ValueError(f"router scores have {logits.shape[-1]} experts, config has "
                         f"{config.num_experts}")
    bad = torch.isnan(logits).any(dim=-1)
    if expert_bias is not None:
        bad |= torch.isnan(expert_bias).any()
    if bool(bad.any()):
        raise ValueError(f"{int(bad.sum())} of {logits.shape[0]} tokens have NaN router scores "
                         "(NaN logits or expert_bias)")
    return _select(logits.float().sigmoid(), expert_bias, config)


class DeepSeekRouter(torch.nn.Module):
    """Gate of one MoE layer: hidden [T, H] -> (indices [T, K], gates [T, K], scores [T, E]).

    `scores` are the fp32 sigmoid affinities of all experts, for the sequence-wise balance
    loss. Leading dims of `hidden` other than the last are flattened into T. The two steps
    are also callable apart (`logits`, then `choose`), for losses on the logits (z-loss).
    """

    # Its small [T, E] weight GEMM stays in backward under --delay-wgrad-compute, as
    # Megatron's router does with TE (plugins.common.wgrad_checks).
    wgrad_in_backward = True

    def __init__(self, hidden_size: int, config: RouterConfig, *, init_std: float = 0.02,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        config.validate()  # once: forward trusts it
        self.config = config
        self.init_std = init_std
        # The gate stays in the training dtype (fp32 here), never FP8: a small error in
        # scores flips top-k choices.
        self.weight = torch.nn.Parameter(
            torch.empty(config.num_experts, hidden_size, dtype=dtype, device=device)
        )
        # A buffer, not a parameter: the balancing rule updates it, not the optimizer.
        # Persistent so checkpoints carry it. Named as in DeepSeek's checkpoints; not
        # `expert_bias`, which Megatron's finalize_model_grads would update on its own.
        self.register_buffer(
            "e_score_correction_bias",
            torch.zeros(config.num_experts, dtype=torch.float32, device=device),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.normal_(self.weight, std=self.init_std)
        self.e_score_correction_bias.zero_()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
        return F.linear(hidden.float(), self.weight.float())  # [T, E], fp32 like HF

    def choose(self, logits: torch.Tensor):
        scores = logits.sigmoid()  # [T, E]
        indices, gates = _select(scores, self.e_score_correction_bias, self.config)
        return indices, gates, scores

    def forward(self, hidden: torch.Tensor):
        return self.choose(self.logits(hidden))

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden={self.weight.shape[1]}, experts={c.num_experts}, top_k={c.top_k}, "
                f"groups={c.group_top_k}/{c.num_groups}, scale={c.scaling_factor}")
