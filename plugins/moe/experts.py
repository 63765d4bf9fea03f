"""This rank's routed experts: SwiGLU MLPs stored as stacked weights.

Tokens arrive grouped by local expert (`counts[e]` rows each). Where PyTorch has its
grouped GEMM (`torch._grouped_mm`: BF16 on CUDA, any float dtype on the CPU) all experts
run as one grouped GEMM per projection; elsewhere a loop over experts computes the same
products. With the fp8 plugin on, each expert runs its two GEMMs in FP8, and tokens that
arrived in FP8 (the MoE plugin's FP8 dispatch) enter fc1 as the bytes that were sent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import MegatronModule


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
    """`fp8_backend` (set when the fp8 plugin is on): both GEMMs of every expert in FP8
    (plugins.fp8.linear) and the SwiGLU input cached in FP8, as in the dense layers;
    `fp8_cache_weights`: each expert's FP8 weights kept through the step
    (plugins.fp8.weight_cache)."""

    def __init__(self, config, num_local_experts: int, hidden: int, ffn: int,
                 fp8_backend: str | None = None, fp8_cache_weights: bool = False):
        super().__init__(config)
        self.num_local_experts, self.ffn, self.fp8_backend = num_local_experts, ffn, fp8_backend
        self.fp8_weight_cache = None
        if fp8_cache_weights:
            from plugins.fp8.weight_cache import FP8WeightCache

            self.fp8_weight_cache = FP8WeightCache()
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
        tokens as (E4M3 [n, hidden], 1x128 scales [n, hidden/128]), as dispatched."""
        if self.fp8_backend is not None:
            return self._fp8_forward(tokens, counts, tokens_fp8)
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

    def _fp8_forward(self, tokens: torch.Tensor, counts: list[int],
                     tokens_fp8: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """fc1, SwiGLU and fc2 of every expert in FP8. 1x128 tiles run along one token's
        channels, so the layer quantizes all tokens at once, and all SwiGLU outputs at
        once, with each expert's own bits: one launch and one inf/NaN check (one wait on
        the GPU) per projection for the layer, not per expert."""
        from plugins.fp8.linear import fp8_linear
        from plugins.fp8.quantize import quantize, raise_if_non_finite
        from plugins.fp8.swiglu import FP8CachedSwiGLU

        def checked_fp8(x: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
            q, scales = quantize(x, (1, 128), check_finite=False)
            raise_if_non_finite(scales, (1, 128), f"moe experts: {what}")
            return q, scales

        def project(x, x_fp8, weights, name: str) -> list[torch.Tensor]:
            cache = self.fp8_weight_cache
            return [fp8_linear(chunk, w, self.fp8_backend, (q, scales),
                               cache.get(w, (name, e)) if cache is not None else None)
                    for e, (chunk, q, scales, w) in enumerate(zip(
                        x.split(counts), x_fp8[0].split(counts), x_fp8[1].split(counts),
                        weights.unbind(0)))]

        if tokens_fp8 is None:  # (dispatched FP8 tokens were checked by their sender)
            tokens_fp8 = checked_fp8(tokens, "the tokens (fc1's input)")
        h = FP8CachedSwiGLU.apply(torch.cat(project(tokens, tokens_fp8, self.weight1, "fc1")))
        outputs = project(h, checked_fp8(h, "the SwiGLU output (fc2's input)"), self.weight2,
                          "fc2")
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
