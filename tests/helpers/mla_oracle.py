"""Test oracle: DeepSeek-V3 Multi-head Latent Attention computed by Hugging Face transformers.

The oracle builds ``transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3Attention`` and
``DeepseekV3RotaryEmbedding`` from a small ``DeepseekV3Config`` (no downloads, ``attn_implementation="eager"``,
fp32, attention dropout 0, ``attention_bias=False``), copies weights given under Megatron-Core's MLA parameter
names into it, and runs causal self-attention over positions ``0..seq-1``.

Megatron-Core name -> HF module parameter::

    linear_q_down_proj.weight  -> q_a_proj.weight            [q_lora_rank, hidden]             (q_lora_rank set)
    q_layernorm.weight         -> q_a_layernorm.weight       [q_lora_rank]                     (q_lora_rank set)
    linear_q_up_proj.weight    -> q_b_proj.weight            [heads*(nope+rope), q_lora_rank]  (q_lora_rank set)
    linear_q_proj.weight       -> q_proj.weight              [heads*(nope+rope), hidden]       (q_lora_rank None)
    linear_kv_down_proj.weight -> kv_a_proj_with_mqa.weight  [kv_lora_rank+rope, hidden]
    kv_layernorm.weight        -> kv_a_layernorm.weight      [kv_lora_rank]
    linear_kv_up_proj.weight   -> kv_b_proj.weight           [heads*(nope+v), kv_lora_rank]
    linear_proj.weight         -> o_proj.weight              [hidden, heads*v]

(nope = ``MLAShape.qk_head_dim`` = HF ``qk_nope_head_dim``; rope = ``MLAShape.qk_pos_emb_head_dim`` = HF
``qk_rope_head_dim``; v = ``v_head_dim``.)

Facts read from the transformers 4.57.1 source (``models/deepseek_v3/modeling_deepseek_v3.py``,
``modeling_rope_utils.py``, ``masking_utils.py``):

(a) Layouts (all head-major, i.e. the output features are ``view``-ed as ``[..., heads, per_head]``):

    * ``q_b_proj`` (or ``q_proj``) output, size ``heads*(nope+rope)``: viewed as ``[b, s, heads, nope+rope]``,
      then split per head as ``[q_nope (nope) | q_rope (rope)]``. So head h occupies rows
      ``h*(nope+rope) : (h+1)*(nope+rope)``, first ``nope`` rows no-RoPE, last ``rope`` rows RoPE.
    * ``kv_a_proj_with_mqa`` output, size ``kv_lora_rank+rope``: ``[latent (kv_lora_rank) | k_rope (rope)]``.
      The latent goes through ``kv_a_layernorm`` (RMSNorm) and then ``kv_b_proj``; ``k_rope`` is NOT normalized,
      is a single head shared (broadcast/expanded) by all heads.
    * ``kv_b_proj`` output, size ``heads*(nope+v)``: viewed as ``[b, s, heads, nope+v]``, split per head as
      ``[k_nope (nope) | v (v)]``.
    * The query side: ``q_a_proj`` -> ``q_a_layernorm`` (RMSNorm) -> ``q_b_proj``. No activation anywhere.
    * Per head: ``query = cat(q_nope, rope(q_rope))``, ``key = cat(k_nope, rope(k_rope))`` (nope first, rope
      last); attention output per head has ``v`` dims, reshaped head-major to ``[b, s, heads*v]`` -> ``o_proj``.
    * RMSNorm: ``w * x * rsqrt(mean(x**2, -1) + eps)`` computed in fp32 (eps = ``rms_norm_eps``, used for both
      norms).

(b) ``rope_interleave=True`` (the DeepseekV3Config default) uses ``apply_rotary_pos_emb_interleave``: before RoPE,
    each of ``q_rot`` [b, h, s, d] and ``k_rot`` is permuted with
    ``x.view(..., d//2, 2).transpose(-1, -2).reshape(..., d)``, i.e. the new order is
    ``[x0, x2, x4, ..., x_{d-2}, x1, x3, ..., x_{d-1}]`` (even-indexed dims first, then odd-indexed). Then the
    ordinary rotate-half RoPE is applied to the permuted vector: ``y = x' * cos + rotate_half(x') * sin`` with
    ``rotate_half(x') = cat(-x'[d/2:], x'[:d/2])`` and ``cos/sin = cat(freqs, freqs)`` (freqs[i] = pos *
    inv_freq[i], i < d/2). Net effect: the pair (x_{2i}, x_{2i+1}) is rotated by angle pos*inv_freq[i]
    (= the "interleaved"/complex RoPE of the original DeepSeek code), giving
    ``y[i] = x_{2i} cos - x_{2i+1} sin`` and ``y[d/2+i] = x_{2i+1} cos + x_{2i} sin``.
    The output is NOT permuted back: it stays in the de-interleaved [evens | odds] order. Since q and k get the same
    permutation, q.k (and hence the attention output) equals that of complex/interleaved RoPE in natural order.
    ``rope_interleave=False`` uses ``apply_rotary_pos_emb``: plain rotate-half on the unpermuted dims, i.e. pair
    (x_i, x_{i+d/2}) rotated by pos*inv_freq[i].

(c) Softmax scale: ``scaling = (nope + rope) ** -0.5``; if ``rope_scaling`` is set and
    ``mscale_all_dim = rope_scaling.get("mscale_all_dim", 0)`` is truthy (nonzero), it is multiplied by
    ``yarn_get_mscale(factor, mscale_all_dim) ** 2`` with
    ``yarn_get_mscale(scale, m) = 1.0 if scale <= 1 else 0.1 * m * ln(scale) + 1.0``. (``mscale`` plays no role in
    the softmax scale.) Logits are ``q.k * scaling`` (+ mask), softmax in fp32.

    YaRN attention factor applied to cos and sin (both multiplied by it, hence q_rope.k_rope gets it squared;
    the nope part does not): unless ``rope_scaling["attention_factor"]`` is given explicitly,
    ``get_mscale(s, m) = 1.0 if s <= 1 else 0.1 * m * ln(s) + 1.0`` and

    * if ``mscale`` and ``mscale_all_dim`` are both present and truthy:
      ``attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)``
      (DeepSeek-V3's own config has mscale = mscale_all_dim = 1.0, giving exactly 1.0);
    * otherwise (either absent, None or 0): ``attention_factor = get_mscale(factor) = 0.1*ln(factor) + 1``
      -- note that a lone ``mscale`` (without ``mscale_all_dim``) is then IGNORED, which differs from the original
      DeepSeek reference (``yarn_get_mscale(f, mscale) / yarn_get_mscale(f, 0)``) when ``mscale != 1``.

    Plain RoPE (``rope_scaling=None``): attention factor 1.0, inv_freq[i] = theta ** (-2i/d), d = rope dim.

(d) YaRN inv_freq (``_compute_yarn_parameters``), with ``d = qk_rope_head_dim`` (the config sets
    ``head_dim = qk_rope_head_dim``; partial_rotary_factor 1), ``base = rope_theta``,
    ``L = original_max_position_embeddings`` (falls back to ``max_position_embeddings`` if absent),
    ``beta_fast = rope_scaling.get("beta_fast") or 32``, ``beta_slow = rope_scaling.get("beta_slow") or 1``::

        pos_freqs[i]   = base ** (2i / d),           i = 0 .. d/2-1    (fp32: torch.arange(0, d, 2).float() / d)
        extrap[i]      = 1 / pos_freqs[i]
        interp[i]      = 1 / (factor * pos_freqs[i])
        corr_dim(r)    = d * ln(L / (r * 2 * pi)) / (2 * ln(base))
        low            = floor(corr_dim(beta_fast))     # truncate=True by default
        high           = ceil(corr_dim(beta_slow))      # (rope_scaling["truncate"]=False skips floor/ceil)
        low, high      = max(low, 0), min(high, d - 1)
        if low == high: high += 0.001
        ramp[i]        = clamp((i - low) / (high - low), 0, 1)        i = 0 .. d/2-1 (fp32 arange)
        extrap_factor  = 1 - ramp
        inv_freq       = interp * (1 - extrap_factor) + extrap * extrap_factor
                       = interp * ramp + extrap * (1 - ramp)

    i.e. low-index (high-frequency) dims keep the original frequency, high-index dims are divided by ``factor``.
    ``factor`` must be >= 1 (a float; the config casts factor/beta_fast/beta_slow to float). The rotary module's
    forward computes ``freqs = inv_freq[:, None] @ position_ids[None, :]`` in fp32, ``emb = cat(freqs, freqs)``,
    ``cos = cos(emb) * attention_factor``, ``sin = sin(emb) * attention_factor``. No dynamic update for "yarn".

Causal mask: ``masking_utils.eager_mask`` -> additive float mask [b, 1, q, kv], 0 where key_pos <= query_pos and
``torch.finfo(float32).min`` above the diagonal, added to the logits after scaling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["MLAShape", "hf_mla", "random_weights", "expected_weight_shapes", "hf_config"]

_YARN_KEYS = frozenset(
    {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}
)


@dataclass(frozen=True)
class MLAShape:
    hidden: int
    heads: int
    q_lora_rank: int | None  # None: a single query projection (HF q_proj)
    kv_lora_rank: int
    qk_head_dim: int  # no-RoPE part of q/k per head (HF qk_nope_head_dim)
    qk_pos_emb_head_dim: int  # decoupled RoPE part (HF qk_rope_head_dim)
    v_head_dim: int
    eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_interleave: bool = True  # HF DeepseekV3Config.rope_interleave
    # None: plain RoPE. Else keys: factor, original_max_position_embeddings, beta_fast, beta_slow, mscale,
    # mscale_all_dim (absent keys take HF's defaults, see module docstring (c)/(d)).
    yarn: dict | None = None


# Megatron-Core name -> HF DeepseekV3Attention parameter name.
_Q_LORA_MAP = {
    "linear_q_down_proj.weight": "q_a_proj.weight",
    "q_layernorm.weight": "q_a_layernorm.weight",
    "linear_q_up_proj.weight": "q_b_proj.weight",
}
_Q_DENSE_MAP = {"linear_q_proj.weight": "q_proj.weight"}
_KV_O_MAP = {
    "linear_kv_down_proj.weight": "kv_a_proj_with_mqa.weight",
    "kv_layernorm.weight": "kv_a_layernorm.weight",
    "linear_kv_up_proj.weight": "kv_b_proj.weight",
    "linear_proj.weight": "o_proj.weight",
}


def _name_map(shape: MLAShape) -> dict[str, str]:
    q = _Q_DENSE_MAP if shape.q_lora_rank is None else _Q_LORA_MAP
    return {**q, **_KV_O_MAP}


def expected_weight_shapes(shape: MLAShape) -> dict[str, tuple[int, ...]]:
    """Megatron-Core MLA parameter name -> expected shape (HF layout: linear weights are [out, in])."""
    h, n = shape.hidden, shape.heads
    nope, rope, v = shape.qk_head_dim, shape.qk_pos_emb_head_dim, shape.v_head_dim
    out: dict[str, tuple[int, ...]] = {}
    if shape.q_lora_rank is None:
        out["linear_q_proj.weight"] = (n * (nope + rope), h)
    else:
        r = shape.q_lora_rank
        out["linear_q_down_proj.weight"] = (r, h)
        out["q_layernorm.weight"] = (r,)
        out["linear_q_up_proj.weight"] = (n * (nope + rope), r)
    out["linear_kv_down_proj.weight"] = (shape.kv_lora_rank + rope, h)
    out["kv_layernorm.weight"] = (shape.kv_lora_rank,)
    out["linear_kv_up_proj.weight"] = (n * (nope + v), shape.kv_lora_rank)
    out["linear_proj.weight"] = (h, n * v)
    return out


def random_weights(shape: MLAShape, seed: int) -> dict[str, torch.Tensor]:
    """Random fp32 weights under Megatron-Core names: linears ~ N(0, 1/in_features), norms 1 + 0.1*N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shp in expected_weight_shapes(shape).items():
        if len(shp) == 1:  # RMSNorm weight
            weights[name] = 1.0 + 0.1 * torch.randn(shp, generator=gen, dtype=torch.float32)
        else:
            weights[name] = torch.randn(shp, generator=gen, dtype=torch.float32) / math.sqrt(shp[1])
    return weights


def hf_config(shape: MLAShape):
    """The DeepseekV3Config the oracle uses for ``shape`` (eager attention, no dropout, no bias)."""
    from transformers import DeepseekV3Config

    rope_scaling = None
    max_pos = 4096
    if shape.yarn is not None:
        unknown = set(shape.yarn) - _YARN_KEYS
        if unknown:
            raise KeyError(f"unknown yarn keys {sorted(unknown)}; allowed: {sorted(_YARN_KEYS)}")
        if "factor" not in shape.yarn:
            raise KeyError("yarn dict needs 'factor'")
        rope_scaling = {"rope_type": "yarn"}
        rope_scaling.update({k: v for k, v in shape.yarn.items() if v is not None})
        if "original_max_position_embeddings" in rope_scaling:
            max_pos = int(round(float(rope_scaling["factor"]) * rope_scaling["original_max_position_embeddings"]))
    config = DeepseekV3Config(
        vocab_size=32,
        hidden_size=shape.hidden,
        intermediate_size=8,
        moe_intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        n_shared_experts=1,
        n_routed_experts=2,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=1,
        kv_lora_rank=shape.kv_lora_rank,
        q_lora_rank=shape.q_lora_rank,
        qk_rope_head_dim=shape.qk_pos_emb_head_dim,
        qk_nope_head_dim=shape.qk_head_dim,
        v_head_dim=shape.v_head_dim,
        max_position_embeddings=max_pos,
        rms_norm_eps=shape.eps,
        rope_theta=shape.rope_theta,
        rope_scaling=rope_scaling,
        rope_interleave=shape.rope_interleave,
        attention_bias=False,
        attention_dropout=0.0,
        attn_implementation="eager",
    )
    config._attn_implementation = "eager"
    return config


def _check_weights(weights: dict[str, torch.Tensor], shape: MLAShape) -> None:
    expected = expected_weight_shapes(shape)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        mode = "q_lora_rank=None" if shape.q_lora_rank is None else f"q_lora_rank={shape.q_lora_rank}"
        raise KeyError(
            f"MLA weights do not match the expected names for {mode}: missing={missing}, unexpected={unexpected}; "
            f"expected exactly {sorted(expected)}"
        )
    bad = {n: (tuple(weights[n].shape), s) for n, s in expected.items() if tuple(weights[n].shape) != s}
    if bad:
        raise ValueError(
            "MLA weight shape mismatch (name: (got, expected)): "
            + ", ".join(f"{n}: {g} != {s}" for n, (g, s) in sorted(bad.items()))
        )


def hf_mla(weights: dict[str, torch.Tensor], x: torch.Tensor, shape: MLAShape) -> torch.Tensor:
    """x: [batch, seq, hidden] -> causal self-attention output [batch, seq, hidden], positions 0..seq-1.

    Computed in fp32 by HF's DeepseekV3Attention (eager). Gradients flow to ``x`` only (the copied weights are
    frozen). The output is fp32 on x's device.
    """
    from transformers.masking_utils import eager_mask
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention,
        DeepseekV3RotaryEmbedding,
    )

    if x.dim() != 3 or x.shape[-1] != shape.hidden:
        raise ValueError(f"x must be [batch, seq, {shape.hidden}], got {tuple(x.shape)}")
    _check_weights(weights, shape)

    device = x.device
    x = x.to(torch.float32)
    config = hf_config(shape)
    attn = DeepseekV3Attention(config, layer_idx=0).to(device=device, dtype=torch.float32).eval()
    params = dict(attn.named_parameters())
    name_map = _name_map(shape)
    if set(params) != set(name_map.values()):  # guards against HF adding/removing parameters
        raise RuntimeError(f"HF DeepseekV3Attention parameters {sorted(params)} != mapped {sorted(name_map.values())}")
    with torch.no_grad():
        for mc_name, hf_name in name_map.items():
            params[hf_name].copy_(weights[mc_name].detach().to(device=device, dtype=torch.float32))
    attn.requires_grad_(False)

    rotary = DeepseekV3RotaryEmbedding(config, device=device)
    batch, seq, _ = x.shape
    position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)
    cos, sin = rotary(x, position_ids)
    mask = eager_mask(
        batch_size=batch,
        cache_position=torch.arange(seq, device=device),
        kv_length=seq,
        dtype=torch.float32,
    )
    out, _ = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=mask)
    return out
