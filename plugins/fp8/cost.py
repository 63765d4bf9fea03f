"""How `--plugins fp8` changes what a layer keeps for backward and what its weight cache
holds: every FP8 linear keeps its input as E4M3 with a float32 scale per 1x128 tile, in
the layout its weight gradient reads; the FP8 MLP recomputes its SwiGLU output. Tested
against the built modules' saved tensors in tests/integration/test_describe.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from plugins.common.cost import FP32, Activations

TILE = 128  # numbers a scale covers: 1x128 activation tiles, 128x128 weight blocks
FP8_BYTES = 1 + FP32 / TILE  # an E4M3 byte plus its share of a float32 tile scale


def _whole_tiles(n: int) -> int:
    return n + -n % TILE


@dataclass(frozen=True)
class FP8Activations(Activations):
    """Activations kept as the FP8 modules keep them."""

    quantized = True

    def linear_input(self, tokens: int, width: int) -> float:
        """x^T in FP8 as Wgrad takes it: 1x128 tiles along tokens, the token count padded
        to whole tiles."""
        return _whole_tiles(tokens) * width * FP8_BYTES

    def norm_output(self, tokens: int, width: int, linears: int = 1,
                    recomputed: bool = False) -> float:
        """Every linear keeps its own FP8 copy of the norm's output, which no
        recomputation drops."""
        return linears * self.linear_input(tokens, width)

    def mlp_terms(self, tokens: int, ffn: int, gated: bool, label: str) -> dict[str, float]:
        """fc1's output (the SwiGLU input) and fc2's input, both in FP8; the SwiGLU
        output is recomputed."""
        width = ffn * (2 if gated else 1)
        return {f"{label} SwiGLU input": tokens * width * FP8_BYTES,
                f"{label} fc2 input": self.linear_input(tokens, ffn)}

    def expert_input(self, rows: int, width: int) -> float:
        return rows * width * FP8_BYTES

    def experts_terms(self, rows: int, ffn: int, act_recomputed: bool) -> dict[str, float]:
        """fc1's output (the SwiGLU input) and fc2's input (the SwiGLU output, quantized
        outside autograd), both in FP8 1x128 tiles along each row's channels. Nothing is
        left for `moe_act` to recompute."""
        return {"experts' SwiGLU input": rows * 2 * ffn * FP8_BYTES,
                "experts' fc2 input": rows * ffn * FP8_BYTES}


def weight_cache_bytes(fp8_parameters: int) -> int:
    """--fp8-cache-weights: W and W^T of every FP8 linear held in E4M3, each with a
    float32 scale a 128x128 block."""
    return 2 * math.ceil(fp8_parameters * (1 + FP32 / (TILE * TILE)))
