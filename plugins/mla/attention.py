"""Multi-head Latent Attention (DeepSeek-V3) as Megatron's `self_attention` submodule.

Built from a Megatron `ModuleSpec` like Megatron's own MLA and with its submodule names
(`linear_q_down_proj`, `linear_kv_up_proj`, ...), so checkpoints keep their keys; unlike
it, it builds with Megatron's local (non-TE) linears and runs on CPU. Layout:

  query   x -> linear_q_down_proj -> q_layernorm -> linear_q_up_proj -> per head [nope | rope]
          (or x -> linear_q_proj when q_lora_rank is None)
  key/val x -> linear_kv_down_proj -> [latent | k_rope];  k_rope is one head shared by all
          latent -> kv_layernorm -> linear_kv_up_proj -> per head [k_nope | v]
  RoPE    only on q_rope and k_rope (plain or YaRN, `plugins.mla.rope`)
  core    causal softmax(q k^T * scale) v over heads [nope | rope], v of its own width
  out     linear_proj (row-parallel)

Tensor parallelism: heads are split across TP ranks (column-parallel up-projections,
row-parallel output); the down-projections are replicated. With sequence parallelism the
down-projections and latent norms see this rank's sequence shard, and the up-projections
all-gather the (small) latents.

Context parallelism: a rank holds chunks r and 2cp-1-r of each sequence, cut in 2cp
(Megatron's layout, `get_batch_on_this_cp_rank`). Its queries attend to the whole
sequence: the key/value latents and k_rope (kv_lora_rank + rope numbers per token) are
all-gathered over the CP group (backward: reduce-scatter), up-projected, and put in
sequence order; RoPE and the causal mask use each token's position in its sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.transformer.enums import AttnMaskType
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from plugins.common.groups import process_groups
from plugins.mla.rope import Yarn, apply_rotary, rotary_table, yarn_mscale


@dataclass
class MLASubmodules:
    linear_q_proj: ModuleSpec | type | None = None
    linear_q_down_proj: ModuleSpec | type | None = None
    linear_q_up_proj: ModuleSpec | type | None = None
    linear_kv_down_proj: ModuleSpec | type | None = None
    linear_kv_up_proj: ModuleSpec | type | None = None
    q_layernorm: ModuleSpec | type | None = None
    kv_layernorm: ModuleSpec | type | None = None
    linear_proj: ModuleSpec | type | None = None


class _RMSNormFunction(torch.autograd.Function):
    """y = w * x / rms(x), computed in FP32. Keeps only x and one FP32 rstd per token for
    backward (torch's CPU rms_norm keeps FP32 copies of x and of x / rms(x) as well)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)   # [..., 1]
        ctx.save_for_backward(x, rstd, weight)
        return ((x32 * rstd) * weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        x32, g = x.float(), dy.float() * weight.float()
        normed = x32 * rstd
        dx = rstd * (g - normed * (g * normed).mean(-1, keepdim=True))
        dw = (dy.float() * normed).reshape(-1, x.shape[-1]).sum(0)
        return dx.to(x.dtype), dw.to(weight.dtype), None


class RMSNorm(MegatronModule):
    """RMSNorm whose weight is marked for sequence parallelism (Megatron's local norm
    refuses `--sequence-parallel`)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__(config)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class MLASelfAttention(MegatronModule):
    def __init__(self, config, submodules: MLASubmodules, layer_number: int = 1,
                 attn_mask_type=None, pg_collection=None, **unused: Any):
        super().__init__(config)
        if attn_mask_type not in (None, AttnMaskType.causal):
            raise ValueError(f"MLA's attention is causal; the spec asks for {attn_mask_type}")
        self.layer_number = layer_number
        groups = process_groups(pg_collection, ("tp", "cp"))
        self.tp_size, self.cp_group = groups.tp.size(), groups.cp
        self.heads = config.num_attention_heads // self.tp_size  # this rank's heads
        self.nope_dim, self.rope_dim = config.qk_head_dim, config.qk_pos_emb_head_dim
        self.v_dim, self.kv_lora_rank = config.v_head_dim, config.kv_lora_rank
        self.yarn = None if config.rope_type != "yarn" else Yarn(
            config.rotary_scaling_factor, config.original_max_position_embeddings,
            config.beta_fast, config.beta_slow, config.mscale, config.mscale_all_dim)
        mscale = 1.0 if self.yarn is None else yarn_mscale(self.yarn.factor,
                                                           self.yarn.mscale_all_dim)
        self.softmax_scale = mscale * mscale / math.sqrt(self.nope_dim + self.rope_dim)
        # Set by the layer when --recompute-modules has mla_up_proj (plugins.mla.layer).
        self.up_projection_recompute = None

        hidden, qk_dim = config.hidden_size, self.nope_dim + self.rope_dim
        column = dict(config=config, init_method=config.init_method, bias=False,
                      gather_output=False, skip_bias_add=True)
        if config.q_lora_rank is None:
            self.linear_q_proj = build_module(submodules.linear_q_proj, hidden,
                                              config.num_attention_heads * qk_dim, **column)
        else:
            self.linear_q_down_proj = build_module(submodules.linear_q_down_proj, hidden,
                                                   config.q_lora_rank, config=config,
                                                   init_method=config.init_method)
            self.q_layernorm = build_module(submodules.q_layernorm, config=config,
                                            hidden_size=config.q_lora_rank,
                                            eps=config.layernorm_epsilon)
            self.linear_q_up_proj = build_module(submodules.linear_q_up_proj, config.q_lora_rank,
                                                 config.num_attention_heads * qk_dim, **column)
        self.linear_kv_down_proj = build_module(submodules.linear_kv_down_proj, hidden,
                                                self.kv_lora_rank + self.rope_dim,
                                                config=config, init_method=config.init_method)
        self.kv_layernorm = build_module(submodules.kv_layernorm, config=config,
                                         hidden_size=self.kv_lora_rank,
                                         eps=config.layernorm_epsilon)
        self.linear_kv_up_proj = build_module(
            submodules.linear_kv_up_proj, self.kv_lora_rank,
            config.num_attention_heads * (self.nope_dim + self.v_dim), **column)
        self.linear_proj = build_module(
            submodules.linear_proj, config.num_attention_heads * self.v_dim, hidden,
            config=config, init_method=config.output_layer_init_method, bias=False,
            input_is_parallel=True, skip_bias_add=True)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                packed_seq_params=None, inference_context=None, **unused: Any):
        if packed_seq_params is not None or inference_context is not None:
            raise NotImplementedError("plugins.mla: packed sequences and inference contexts "
                                      "are not supported; train with unpacked sequences")
        # Down-projections, on this rank's sequence (shard).   x: [s, b, hidden]
        q_latent = (hidden_states if self.config.q_lora_rank is None
                    else self.linear_q_down_proj(hidden_states))      # [s, b, q_lora]
        kv_latent, k_rope = self.linear_kv_down_proj(hidden_states).split(
            [self.kv_lora_rank, self.rope_dim], dim=-1)               # [s, b, kv_lora], [s, b, rope]
        # k_rope serves every head, so its gradient sums over the TP ranks' heads: the
        # sequence all-gather's backward (reduce-scatter) or an all-reduce does that.
        if self.cp_group.size() > 1:  # every CP rank's part of the keys and values
            kv_latent, k_rope = (tensor_parallel.gather_from_sequence_parallel_region(
                t, group=self.cp_group) for t in (kv_latent, k_rope))
        if self.config.sequence_parallel:
            k_rope = tensor_parallel.gather_from_sequence_parallel_region(k_rope)
        else:
            k_rope = tensor_parallel.copy_to_tensor_model_parallel_region(k_rope)

        up = self._up_project
        if self.up_projection_recompute is not None:
            up = lambda *a: self.up_projection_recompute.run(self._up_project, *a)  # noqa: E731
        query, key, value = up(q_latent, kv_latent, k_rope)    # [b, n, s, d]; k, v: [b, n, S, d]

        # Core attention over this rank's heads; dropout draws per TP rank.
        mask = None if attention_mask is None else ~attention_mask
        if mask is None and self.cp_group.size() > 1:  # causal, by position in the sequence
            query_positions, _ = self._positions(query.shape[2], query.device)
            mask = (torch.arange(key.shape[2], device=query.device)[None, :]
                    <= query_positions[:, None])                      # [s, S]
        with tensor_parallel.get_cuda_rng_tracker().fork():
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, is_causal=mask is None,
                dropout_p=self.config.attention_dropout if self.training else 0.0,
                scale=self.softmax_scale)[..., :self.v_dim]            # [b, n, s, v]
        context = context.permute(2, 0, 1, 3).flatten(2)              # [s, b, n * v]
        return self.linear_proj(context)                               # (output, bias)

    def _up_project(self, q_latent, kv_latent, k_rope):
        """Latents to per-head query, key and value with RoPE applied: [b, n, s, d]."""
        if self.config.q_lora_rank is None:
            q, _ = self.linear_q_proj(q_latent)
        else:
            q, _ = self.linear_q_up_proj(self.q_layernorm(q_latent))
        kv, _ = self.linear_kv_up_proj(self.kv_layernorm(kv_latent))
        (s, b), keys = q.shape[:2], kv.shape[0]                       # keys = s but under CP
        q = q.view(s, b, self.heads, self.nope_dim + self.rope_dim)
        kv = kv.view(keys, b, self.heads, self.nope_dim + self.v_dim)
        query_positions, key_order = self._positions(s, q.device)
        if key_order is not None:  # gathered over CP ranks: into sequence order
            kv, k_rope = kv.index_select(0, key_order), k_rope.index_select(0, key_order)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        k_nope, value = kv.split([self.nope_dim, self.v_dim], dim=-1)

        rotary = lambda positions: rotary_table(  # noqa: E731
            positions, self.rope_dim, self.config.rotary_base, self.yarn, q.dtype)
        q_rope = apply_rotary(q_rope, *rotary(query_positions))
        k_rope = apply_rotary(k_rope.unsqueeze(2),
                              *rotary(torch.arange(keys, device=q.device)))  # [S, b, 1, rope]
        query = torch.cat([q_nope, q_rope], dim=-1)
        key = torch.cat([k_nope, k_rope.expand(-1, -1, self.heads, -1)], dim=-1)
        if value.shape[-1] != query.shape[-1] and value.device.type == "cpu":
            # PyTorch's CPU flash kernel needs one head size for q, k and v; without it SDPA
            # falls back to materializing the [s, s] probabilities. Zero columns of v add
            # zero columns to the output, which forward() drops; zero columns of q and k
            # add nothing to q.k (the softmax scale is given, not taken from the width).
            width = max(value.shape[-1], query.shape[-1])
            query, key, value = (t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))
                                 for t in (query, key, value))
        # Contiguous [b, n, s, d]: what attention keeps for backward is then exactly these
        # tensors, which mla_up_proj recomputation replaces by recipes.
        return tuple(t.permute(1, 2, 0, 3).contiguous() for t in (query, key, value))

    def _positions(self, s: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions in their sequences of this rank's s query rows, and the order that
        sorts the key rows gathered over the CP group into sequence order (None without
        context parallelism: the rows are the sequence)."""
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        if cp == 1:
            return torch.arange(s, device=device), None
        chunk = s // 2
        held = [torch.cat([torch.arange(r * chunk, (r + 1) * chunk),             # chunk r
                           torch.arange((2 * cp - 1 - r) * chunk, (2 * cp - r) * chunk)])
                for r in range(cp)]                                   # [s] per CP rank
        # Gathered rows: over CP, then over TP inside the up-projection under sequence
        # parallelism, each TP rank holding a contiguous 1/tp of its CP rank's rows.
        sp = self.tp_size if self.config.sequence_parallel else 1
        gathered = torch.cat([part for t in range(sp)
                              for part in (h.chunk(sp)[t] for h in held)])  # [cp * s]
        return held[rank].to(device), torch.argsort(gathered).to(device)
