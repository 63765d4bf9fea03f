"""Weight layout conversion for DeepSeek checkpoints.

DeepSeek's checkpoints (and Hugging Face's DeepseekV3 with `rope_interleave=True`) rotate
neighbouring pairs (x_2i, x_2i+1) of the RoPE dimensions; Megatron rotates (x_i, x_i+d/2).
Permuting the output rows that produce the RoPE dimensions (evens first, then odds) turns
one layout into the other exactly: q and k are permuted alike, so q.k is unchanged.
"""

from __future__ import annotations

import torch


def _evens_then_odds(rope_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])


def from_interleaved_rope(state: dict[str, torch.Tensor], heads: int, qk_head_dim: int,
                          rope_dim: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """A copy of an MLA state dict (Megatron names) with its RoPE rows reordered from
    DeepSeek's interleaved layout to Megatron's half-split one."""
    order = _evens_then_odds(rope_dim)
    out = dict(state)
    for name in ("linear_q_up_proj.weight", "linear_q_proj.weight"):
        key = prefix + name
        if key in out:
            w = out[key].view(heads, qk_head_dim + rope_dim, -1)
            rope = w[:, qk_head_dim:][:, order]
            out[key] = torch.cat([w[:, :qk_head_dim], rope], dim=1).reshape(out[key].shape)
    key = prefix + "linear_kv_down_proj.weight"
    latent = out[key].shape[0] - rope_dim
    out[key] = torch.cat([out[key][:latent], out[key][latent:][order]])
    return out
