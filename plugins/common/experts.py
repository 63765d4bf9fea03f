"""This rank's routed experts: SwiGLU MLPs stored as stacked weights.

Tokens arrive grouped by local expert (`counts[e]` rows each). Where PyTorch has its
grouped GEMM (`torch._grouped_mm`: BF16 on CUDA, any float dtype on the CPU) all experts
run as one grouped GEMM per projection; elsewhere a loop over experts computes the same
products. Tokens that also arrived in FP8 (`tokens_fp8`, from an FP8 dispatch) are taken
from their training-dtype copy here; a subclass that runs its GEMMs in FP8 takes the bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_pg_rank, get_pg_size

from plugins.common.groups import process_groups


def _grouped_mm_available(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    return x.dtype == torch.bfloat16 if x.is_cuda else x.is_floating_point()


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: `torch._grouped_mm`'s
    backward rejects the stride-0 gradients that, e.g., a `sum()` produces."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class LocalExperts(MegatronModule):
    """The `experts` slot of the moe plugin's layer: built as
    `experts(config, num_local_experts, hidden, ffn, pg_collection=...)`."""

    def __init__(self, config, num_local_experts: int, hidden: int, ffn: int,
                 pg_collection=None, **unused):
        super().__init__(config)
        self.num_local_experts, self.ffn = num_local_experts, ffn
        self.pg_collection = pg_collection  # for the checkpoint's expert sharding
        # [experts, 2 * ffn, hidden] (gate | up) and [experts, hidden, ffn]
        self.weight1 = torch.nn.Parameter(torch.empty(num_local_experts, 2 * ffn, hidden,
                                                      dtype=config.params_dtype))
        self.weight2 = torch.nn.Parameter(torch.empty(num_local_experts, hidden, ffn,
                                                      dtype=config.params_dtype))
        if config.perform_initialization:
            # Each EP rank draws its own experts.
            with tensor_parallel.get_cuda_rng_tracker().fork(
                    tensor_parallel.random.get_expert_parallel_rng_tracker_name()):
                for e in range(num_local_experts):
                    config.init_method(self.weight1[e])
                    config.output_layer_init_method(self.weight2[e])
        for w in (self.weight1, self.weight2):
            w.allreduce = False  # expert parameter: Megatron reduces it over expert-DP only

    def forward(self, tokens: torch.Tensor, counts: list[int],
                tokens_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """tokens [n, hidden] grouped by expert -> [n, hidden]. `tokens_fp8`: the same
        tokens as (E4M3 [n, hidden], 1x128 scales [n, hidden/128]) when they were
        dispatched so; unused here (`tokens` holds their values)."""
        if _grouped_mm_available(tokens):
            return self._grouped_forward(tokens, counts)
        outputs = []
        # unbind, not weight[e]: indexing's backward would zero-fill a gradient the size of
        # the whole stack once per expert.
        for chunk, w1, w2 in zip(tokens.split(counts), self.weight1.unbind(0),
                                 self.weight2.unbind(0)):
            gate, up = F.linear(chunk, w1).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, w2))
        return torch.cat(outputs) if outputs else tokens.new_zeros(0, tokens.shape[-1])

    def _grouped_forward(self, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ends = torch.tensor(counts, device=tokens.device).cumsum(0).to(torch.int32)  # [e]
        h = torch._grouped_mm(tokens, self.weight1.transpose(1, 2), offs=ends)  # [n, 2f]
        gate, up = _ContiguousGrad.apply(h).chunk(2, dim=-1)
        out = torch._grouped_mm(F.silu(gate) * up, self.weight2.transpose(1, 2), offs=ends)
        return _ContiguousGrad.apply(out)                                        # [n, h]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Experts are split over EP ranks along dim 0 and replicated over expert-DP."""
        groups = process_groups(self.pg_collection, ("ep", "expt_tp", "expt_dp"))
        ep_rank, ep_size = get_pg_rank(groups.ep), get_pg_size(groups.ep)
        replica = (0, get_pg_rank(groups.expt_tp), get_pg_rank(groups.expt_dp))
        return {
            f"{prefix}{name}": ShardedTensor.from_rank_offsets(
                f"{prefix}{name}", param, *sharded_offsets, (len(sharded_offsets), ep_rank,
                                                             ep_size),
                replica_id=replica, prepend_axis_num=len(sharded_offsets))
            for name, param in (("weight1", self.weight1), ("weight2", self.weight2))
        }
