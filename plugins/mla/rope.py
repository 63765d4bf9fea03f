"""Rotary position embedding for MLA's decoupled RoPE part: plain RoPE and YaRN.

YaRN (Peng et al., 2023, as DeepSeek-V2/V3 use it) keeps the high-frequency dimensions
(more than `beta_fast` rotations over the original context) as they are, divides the
low-frequency ones (fewer than `beta_slow` rotations) by the scaling factor, and blends
linearly in between. It also scales cos/sin by mscale(factor, mscale) /
mscale(factor, mscale_all_dim) and the softmax by mscale(factor, mscale_all_dim)^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Yarn:
    factor: float                    # --rotary-scaling-factor
    original_max_positions: int      # --original-max-position-embeddings
    beta_fast: float = 32.0          # --beta-fast
    beta_slow: float = 1.0           # --beta-slow
    mscale: float = 1.0              # --mscale
    mscale_all_dim: float = 0.0      # --mscale-all-dim


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inverse_frequencies(dim: int, base: float, yarn: Yarn | None = None) -> torch.Tensor:
    """One frequency per pair of rotated dimensions, float64 for exact tables."""
    extrapolated = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if yarn is None:
        return extrapolated
    interpolated = extrapolated / yarn.factor

    def dimension_of(rotations: float) -> float:
        # The pair index whose wavelength fits `rotations` times into the original context.
        return dim * math.log(yarn.original_max_positions / (rotations * 2 * math.pi)) / (
            2 * math.log(base))

    low = max(math.floor(dimension_of(yarn.beta_fast)), 0)
    high = min(math.ceil(dimension_of(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: extrapolate (high frequency), 0: interpolate
    return interpolated * (1 - keep) + extrapolated * keep


def rotary_table(positions: torch.Tensor, dim: int, base: float, yarn: Yarn | None,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [len(positions), dim // 2], on positions' device."""
    frequencies = inverse_frequencies(dim, base, yarn).to(positions.device)
    angles = positions.to(torch.float64)[:, None] * frequencies[None]
    scale = 1.0 if yarn is None else (yarn_mscale(yarn.factor, yarn.mscale)
                                      / yarn_mscale(yarn.factor, yarn.mscale_all_dim))
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the last dimension of x [s, b, n, d]: pairs (x_i, x_{i + d/2}), Megatron's
    layout. DeepSeek's checkpoints pair neighbours (x_2i, x_2i+1); `plugins.mla.convert`
    permutes their weights into this layout, which gives the same attention scores."""
    cos, sin = cos[:, None, None, :], sin[:, None, None, :]  # [s, 1, 1, d/2]
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)
