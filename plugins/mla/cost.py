"""What `attention.MLASelfAttention` costs: its parameters, the FLOPs of its attention
core, and the bytes it keeps for backward, from the config it is built from (Megatron's
MLA fields of `TransformerConfig`). Tested against the built module in
tests/integration/test_describe.py (numel, a census of saved tensors, FlopCounterMode).
"""

from __future__ import annotations

from dataclasses import dataclass

from plugins.common.cost import FP32, Activations, Count, dense


@dataclass(frozen=True)
class MLAShape:
    """The figures MLA is built from (Megatron's names)."""

    hidden_size: int
    num_attention_heads: int
    q_lora_rank: int | None       # None: one query projection, no compression
    kv_lora_rank: int
    qk_head_dim: int              # per-head q/k width without RoPE
    qk_pos_emb_head_dim: int      # the decoupled RoPE width
    v_head_dim: int

    @classmethod
    def from_config(cls, config) -> "MLAShape":
        """From a `TransformerConfig` (or parsed arguments: the same names)."""
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})

    @property
    def qk_width(self) -> int:
        return self.qk_head_dim + self.qk_pos_emb_head_dim


def parameters(s: MLAShape) -> Count:
    """The projections and the latent norms (one number a channel); the down-projections
    and latent norms are whole on every TP rank, the per-head projections split."""
    h, n = s.hidden_size, s.num_attention_heads
    if s.q_lora_rank:
        q = dense(replicated=h * s.q_lora_rank + s.q_lora_rank,
                  tensor=s.q_lora_rank * n * s.qk_width)
    else:
        q = dense(tensor=h * n * s.qk_width)
    kv = dense(replicated=h * (s.kv_lora_rank + s.qk_pos_emb_head_dim) + s.kv_lora_rank,
               tensor=s.kv_lora_rank * n * (s.qk_head_dim + s.v_head_dim))
    return q + kv + dense(tensor=n * s.v_head_dim * h)


def latent_norm_channels(s: MLAShape) -> int:
    """The channels of the latent norms (q's, when compressed, and kv's): weights no
    matmul reads."""
    return (s.q_lora_rank or 0) + s.kv_lora_rank


def linears(s: MLAShape) -> list[str]:
    """Its linear submodules, by name."""
    query = (["linear_q_down_proj", "linear_q_up_proj"] if s.q_lora_rank
             else ["linear_q_proj"])
    return query + ["linear_kv_down_proj", "linear_kv_up_proj", "linear_proj"]


def core_flops_per_token(s: MLAShape, seq: int) -> int:
    """Forward FLOPs of q.k and p.v for one token of a causal sequence, averaged over
    the sequence ((s + 1) / 2 keys a query), all heads."""
    return 2 * s.num_attention_heads * (s.qk_width + s.v_head_dim) * (seq + 1) // 2


def saved_terms(s: MLAShape, tokens: int, sequence: int, recompute: frozenset[str],
                tp: int, activations: Activations) -> dict[str, float]:
    """Bytes the attention keeps for backward for `tokens` tokens (`sequence` positions
    each), past the input norm's, on a TP rank (its heads), by what keeps them.
    `recompute` holds Megatron's --recompute-modules names: `layernorm` reruns the norms
    whose output a linear keeps, `mla_up_proj` the up-projections (and RoPE) feeding the
    attention core. The core keeps q, k, v, its output and the softmax statistics (no
    s x s matrix)."""
    t, e, a = tokens, activations.element, activations
    n = s.num_attention_heads // tp
    norms_recomputed = "layernorm" in recompute
    terms: dict[str, float] = {}
    # The input norm's output is the down-projections' input (one storage; a copy each
    # when linears keep FP8).
    terms["down-projections' input"] = a.norm_output(t, s.hidden_size, 2, norms_recomputed)
    if s.q_lora_rank:
        terms["q latent norm"] = t * s.q_lora_rank * e + t * FP32
        terms["q up-projection input"] = a.norm_output(t, s.q_lora_rank, 1, norms_recomputed)
    # The kv down-projection's whole output (latent and RoPE key) is one storage (the FP8
    # down-projection computes whole 128-row weight blocks, 576 -> 640 at DeepSeek-V3's,
    # and returns the 576 as a copy of their own)
    kv_out = s.kv_lora_rank + s.qk_pos_emb_head_dim
    terms["kv latent norm"] = t * kv_out * e + t * FP32
    terms["kv up-projection input"] = a.norm_output(t, s.kv_lora_rank, 1, norms_recomputed)
    terms["RoPE tables"] = 4 * sequence * (s.qk_pos_emb_head_dim // 2) * e  # cos, sin: q, k
    qk = s.qk_width
    # PyTorch's CPU flash kernel takes one head width: v is padded to q's (and back).
    qk_w = max(qk, s.v_head_dim) if a.cpu_attention else qk
    v_w = max(qk, s.v_head_dim) if a.cpu_attention else s.v_head_dim
    up = "mla_up_proj" not in recompute
    terms["attention q, k"] = 2 * t * n * qk_w * e if up else 0
    terms["attention v"] = t * n * v_w * e if up else 0
    terms["attention output, softmax statistics"] = t * n * v_w * e + t * n * FP32
    terms["output projection input"] = a.linear_input(t, n * s.v_head_dim)
    return terms
