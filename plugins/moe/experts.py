"""This rank's routed experts: SwiGLU MLPs stored as stacked weights.

Tokens arrive grouped by local expert (`counts[e]` rows each). On a GPU with PyTorch's
grouped GEMM (`torch._grouped_mm`) all experts run as one grouped GEMM per projection;
elsewhere a loop over experts computes the same products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import MegatronModule


def _grouped_mm_available(x: torch.Tensor) -> bool:
    return x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16


class LocalExperts(MegatronModule):
    """`fp8_backend` (set when the fp8 plugin is on): both GEMMs of every expert in FP8
    (plugins.fp8.linear) and the SwiGLU input cached in FP8, as in the dense layers."""

    def __init__(self, config, num_local_experts: int, hidden: int, ffn: int,
                 fp8_backend: str | None = None):
        super().__init__(config)
        self.num_local_experts, self.ffn, self.fp8_backend = num_local_experts, ffn, fp8_backend
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

    def forward(self, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """tokens [n, hidden] grouped by expert -> [n, hidden]."""
        if self.fp8_backend is not None:
            return self._fp8_forward(tokens, counts)
        if _grouped_mm_available(tokens):
            offsets = torch.tensor(counts, device=tokens.device).cumsum(0).to(torch.int32)
            h = torch._grouped_mm(tokens, self.weight1.transpose(1, 2), offs=offsets)
            gate, up = h.chunk(2, dim=-1)
            return torch._grouped_mm(F.silu(gate) * up, self.weight2.transpose(1, 2),
                                     offs=offsets)
        outputs = []
        # unbind, not weight[e]: indexing's backward would zero-fill a gradient the size of
        # the whole stack once per expert.
        for chunk, w1, w2 in zip(tokens.split(counts), self.weight1.unbind(0),
                                 self.weight2.unbind(0)):
            gate, up = F.linear(chunk, w1).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, w2))
        return torch.cat(outputs) if outputs else tokens.new_zeros(0, tokens.shape[-1])

    def _fp8_forward(self, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        from plugins.fp8.linear import fp8_linear
        from plugins.fp8.swiglu import FP8CachedSwiGLU

        outputs = []
        for chunk, w1, w2 in zip(tokens.split(counts), self.weight1.unbind(0),
                                 self.weight2.unbind(0)):
            if chunk.shape[0] % 128:  # Wgrad tiles 128 tokens: pad the expert's rows
                pad = 128 - chunk.shape[0] % 128
                chunk = torch.cat([chunk, chunk.new_zeros(pad, chunk.shape[1])])
            else:
                pad = 0
            h = FP8CachedSwiGLU.apply(fp8_linear(chunk, w1, self.fp8_backend))
            out = fp8_linear(h, w2, self.fp8_backend)
            outputs.append(out[:out.shape[0] - pad])
        return torch.cat(outputs) if outputs else tokens.new_zeros(0, tokens.shape[-1])

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Experts are split over EP ranks along dim 0 and replicated over expert-DP."""
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        ep_size = parallel_state.get_expert_model_parallel_world_size()
        replica = (0, parallel_state.get_expert_tensor_parallel_rank(),
                   parallel_state.get_expert_data_parallel_rank())
        return {
            f"{prefix}{name}": ShardedTensor.from_rank_offsets(
                f"{prefix}{name}", param, *sharded_offsets, (len(sharded_offsets), ep_rank,
                                                             ep_size),
                replica_id=replica, prepend_axis_num=len(sharded_offsets))
            for name, param in (("weight1", self.weight1), ("weight2", self.weight2))
        }
