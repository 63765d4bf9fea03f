"""This rank's routed experts: SwiGLU MLPs stored as stacked weights.

Tokens arrive grouped by local expert (`counts[e]` rows each). Where PyTorch has its
grouped GEMM (`torch._grouped_mm`: BF16 on CUDA, any float dtype on the CPU) all experts
run as one grouped GEMM per projection; elsewhere a loop over experts computes the same
products. Tokens that also arrived in FP8 (`tokens_fp8`, from an FP8 dispatch) are taken
from their training-dtype copy here; a subclass that runs its GEMMs in FP8 takes the bytes.

With `--recompute-modules moe_act` the SwiGLU output (fc2's input) is not kept for
backward: fc2 saves a recipe instead, and backward computes the activation again from fc1's
output, the one tensor the activation keeps (its own backward needs nothing else). That is
what Megatron's `moe_act` keeps too, through CheckpointWithoutOutput, which needs
Transformer Engine.

With `config.delay_wgrad_compute` both projections' weight gradients are left to the W
(`plugins.common.wgrad`), computed by the same grouped GEMM (or loop) backward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_pg_rank, get_pg_size

from plugins.common.groups import process_groups
from plugins.common.wgrad import sink_for, wgrad_store
from plugins.common.wgrad_autograd import split_backward


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


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of h = [gate | up] ([n, 2f] -> [n, f])."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SwiGLUKeepingInput(torch.autograd.Function):
    """`swiglu` that keeps only its input for backward (autograd would keep silu(gate) and
    up as well); the same ops backward as autograd's, so the same gradient bits."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return swiglu(h)

    @staticmethod
    def backward(ctx, dy):
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        d_gate = torch.ops.aten.silu_backward(dy * up, gate)
        return torch.cat([d_gate, dy * F.silu(gate)], dim=-1)


class _Recomputed:
    """A tensor backward computes again (once, however many views of it were saved)."""

    def __init__(self, compute) -> None:
        self.compute, self.value = compute, None

    def view(self, size, stride, offset) -> torch.Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.compute()
        return self.value.as_strided(size, stride, offset)


@contextlib.contextmanager
def _saved_as_recipe(output: torch.Tensor, compute):
    """Inside, autograd saving `output` (or a view of it) for backward keeps `compute`
    instead, which backward calls to get the same values again."""
    storage = output.untyped_storage().data_ptr()
    recomputed = _Recomputed(compute)

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() != storage:
            return t
        return recomputed, t.size(), t.stride(), t.storage_offset()

    def unpack(saved):
        return saved if isinstance(saved, torch.Tensor) else saved[0].view(*saved[1:])

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


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
        self.recompute_activation = (config.recompute_granularity == "selective"
                                     and "moe_act" in (config.recompute_modules or ()))
        self.deferred_wgrads = wgrad_store(config)

    def forward(self, tokens: torch.Tensor, counts: list[int],
                tokens_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """tokens [n, hidden] grouped by expert -> [n, hidden]. `tokens_fp8`: the same
        tokens as (E4M3 [n, hidden], 1x128 scales [n, hidden/128]) when they were
        dispatched so; unused here (`tokens` holds their values)."""
        h = self._expert_linear(tokens, counts, self.weight1)              # [n, 2f]
        if not (self.recompute_activation and torch.is_grad_enabled()):
            return self._expert_linear(swiglu(h), counts, self.weight2)    # [n, hidden]
        act = _SwiGLUKeepingInput.apply(h)                                 # [n, f]
        with _saved_as_recipe(act, lambda: swiglu(h)):
            return self._expert_linear(act, counts, self.weight2)

    def _expert_linear(self, x: torch.Tensor, counts: list[int],
                       weight: torch.Tensor) -> torch.Tensor:
        """Each expert's rows of x [n, k] times its weight [out, k]: [n, out]."""
        sink = sink_for(self, weight)
        if sink is None:
            return self._expert_product(x, counts, weight)
        return split_backward(sink, lambda x, w: self._expert_product(x, counts, w), x, weight)

    @staticmethod
    def _expert_product(x: torch.Tensor, counts: list[int], weight: torch.Tensor) -> torch.Tensor:
        if _grouped_mm_available(x):
            ends = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)  # [e]
            out = torch._grouped_mm(x, weight.transpose(1, 2), offs=ends)
            return _ContiguousGrad.apply(out)
        # unbind, not weight[e]: indexing's backward would zero-fill a gradient the size of
        # the whole stack once per expert.
        return torch.cat([F.linear(chunk, w) for chunk, w in zip(x.split(counts),
                                                                 weight.unbind(0))])

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
