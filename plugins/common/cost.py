"""What every plugin's cost model counts in: parameters split by how the parallel layout
shares them (`Count`), and how a layer keeps the tensors autograd saves for backward
(`Activations`: in the training dtype here; `plugins.fp8.cost.FP8Activations` keeps
linear inputs in FP8).

A cost model is plain arithmetic over a module's config (the figures the module is built
from) and returns exact integers, or bytes as floats where a format stores a fraction of a
byte per number (FP8 scales); each is tested against the built module: `numel`, a census
of the tensors autograd keeps, FlopCounterMode.
"""

from __future__ import annotations

from dataclasses import dataclass

FP32 = 4  # bytes: statistics, gates, router scores and the like stay in float32


@dataclass(frozen=True)
class Count:
    """Parameters of a part, by how the layout splits them."""

    replicated: int = 0    # every TP rank holds them whole (norms, MLA down-projections, router)
    tensor: int = 0        # split over the TP ranks
    expert: int = 0        # split over the EP ranks (the routed experts)
    activated: int = 0     # read by one token's computation

    @property
    def total(self) -> int:
        return self.replicated + self.tensor + self.expert

    def __add__(self, other: "Count") -> "Count":
        return Count(self.replicated + other.replicated, self.tensor + other.tensor,
                     self.expert + other.expert, self.activated + other.activated)

    def __mul__(self, n: int) -> "Count":
        return Count(self.replicated * n, self.tensor * n, self.expert * n, self.activated * n)


def dense(replicated: int = 0, tensor: int = 0) -> Count:
    """Parameters every token reads."""
    return Count(replicated=replicated, tensor=tensor, activated=replicated + tensor)


def mlp_parameters(hidden: int, ffn: int, gated: bool) -> int:
    """Megatron's MLP without biases: fc1 (both halves when gated, SwiGLU) and fc2."""
    return hidden * ffn * (2 if gated else 1) + ffn * hidden


@dataclass(frozen=True)
class Activations:
    """How a layer keeps what autograd saves: every tensor in the training dtype
    (`element` bytes a number). `cpu_attention`: PyTorch's CPU flash kernel, which takes
    one head width (v padded to q's)."""

    element: int = 2
    cpu_attention: bool = False

    # Whether linear inputs are kept quantized (FP8), which changes what the MoE
    # layer's dispatch and experts keep.
    quantized = False

    def linear_input(self, tokens: int, width: int) -> float:
        """A linear's input as it keeps it for its weight gradient."""
        return tokens * width * self.element

    def norm_output(self, tokens: int, width: int, linears: int = 1,
                    recomputed: bool = False) -> float:
        """A norm's output, kept as its `linears` linears' input (one storage); none when
        `layernorm` recomputation reruns the norm in backward."""
        return 0 if recomputed else self.linear_input(tokens, width)

    def mlp_terms(self, tokens: int, ffn: int, gated: bool, label: str) -> dict[str, float]:
        """What Megatron's MLP keeps past its input (this TP rank's `ffn` width): fc1's
        output, the unfused SwiGLU's SiLU of the gate and product (the activation alone
        when not gated), fc2's input."""
        t, e = tokens, self.element
        width = ffn * (2 if gated else 1)
        return {f"{label} fc1 output": t * width * e,
                f"{label} SwiGLU": (2 * t * ffn * e) if gated else t * ffn * e,
                f"{label} fc2 input": t * ffn * e}

    def expert_input(self, rows: int, width: int) -> float:
        """The routed experts' input rows (token copies), as their fc1 keeps them."""
        return rows * width * self.element

    def experts_terms(self, rows: int, ffn: int, act_recomputed: bool) -> dict[str, float]:
        """What the routed experts (SwiGLU, `plugins.common.experts`) keep past their
        input for `rows` token copies: fc1's output, and the SiLU of the gate and the
        product (`moe_act` recomputes both from fc1's output)."""
        e = self.element
        return {"experts' SwiGLU input": rows * 2 * ffn * e,
                "experts' SwiGLU": 0 if act_recomputed else 2 * rows * ffn * e}
