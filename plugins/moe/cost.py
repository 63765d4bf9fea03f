"""What `layer.DeepSeekMoE` costs: router, routed experts (SwiGLU) and Megatron's shared
experts: parameters (total and activated per token), the FLOPs of combining the experts'
outputs, and the bytes it keeps for backward, from the config it is built from
(Megatron's MoE fields of `TransformerConfig`). Tested against the built module in
tests/integration/test_describe.py (numel, a census of saved tensors, FlopCounterMode).
"""

from __future__ import annotations

from dataclasses import dataclass

from plugins.common.cost import FP32, Activations, Count, dense, mlp_parameters


@dataclass(frozen=True)
class MoEShape:
    """The figures the MoE layer is built from (Megatron's names)."""

    hidden_size: int
    num_moe_experts: int
    moe_ffn_hidden_size: int
    moe_router_topk: int
    moe_shared_expert_intermediate_size: int  # 0: no shared experts
    moe_shared_expert_gate: bool
    gated_linear_unit: bool                   # the shared experts' MLP is SwiGLU
    sequence_balance_loss: bool = False       # the sequence-wise balance loss is on

    @classmethod
    def from_config(cls, config) -> "MoEShape":
        """From a `TransformerConfig`."""
        return cls(hidden_size=config.hidden_size, num_moe_experts=config.num_moe_experts,
                   moe_ffn_hidden_size=config.moe_ffn_hidden_size,
                   moe_router_topk=config.moe_router_topk,
                   moe_shared_expert_intermediate_size=(
                       config.moe_shared_expert_intermediate_size or 0),
                   moe_shared_expert_gate=config.moe_shared_expert_gate,
                   gated_linear_unit=config.gated_linear_unit,
                   sequence_balance_loss=sequence_balance_loss_on(config))


def sequence_balance_loss_on(config) -> bool:
    """Whether the layer adds the sequence-wise balance loss, as `layer.DeepSeekMoE` reads
    Megatron's --moe-router-load-balancing-type and --moe-aux-loss-coeff."""
    kinds = config.moe_router_load_balancing_type
    coeff = config.moe_aux_loss_coeff
    return ("seq_aux_loss" in (kinds if isinstance(kinds, list) else [kinds])
            and float(coeff[0] if isinstance(coeff, list) else coeff or 0) > 0)


def router_parameters(s: MoEShape) -> int:
    """The router's weight (a matmul weight, kept in the training dtype under FP8); the
    expert bias is a buffer, not a parameter."""
    return s.num_moe_experts * s.hidden_size


def parameters(s: MoEShape) -> Count:
    """Router and shared experts are read by every token; of the routed experts (always
    SwiGLU: fc1 both halves, fc2), the top-k a token is sent to."""
    h = s.hidden_size
    expert = h * s.moe_ffn_hidden_size * 2 + s.moe_ffn_hidden_size * h
    count = dense(replicated=router_parameters(s))
    count += Count(expert=s.num_moe_experts * expert, activated=s.moe_router_topk * expert)
    if s.moe_shared_expert_intermediate_size:
        count += dense(tensor=mlp_parameters(h, s.moe_shared_expert_intermediate_size,
                                             s.gated_linear_unit))
        if s.moe_shared_expert_gate:
            count += dense(replicated=h)
    return count


def linears(s: MoEShape) -> list[str]:
    """Its linear submodules (the routed experts as one), by name; the router is not
    among them (it stays in the training dtype)."""
    names = ["experts"]
    if s.moe_shared_expert_intermediate_size:
        names += ["shared_experts.linear_fc1", "shared_experts.linear_fc2"]
    return names


def combine_flops_per_token(s: MoEShape) -> int:
    """The experts' outputs weighed by the gates and summed, forward + backward (3x)."""
    return 3 * 2 * s.moe_router_topk * s.hidden_size


def saved_terms(s: MoEShape, tokens: int, recompute: frozenset[str], tp: int,
                activations: Activations, sequence: int | None = None) -> dict[str, float]:
    """Bytes the layer keeps for backward for `tokens` tokens (sequences of `sequence`,
    default one), past the pre-MLP norm's, on a TP rank (its share of the shared experts),
    by what keeps them. `recompute` holds
    Megatron's --recompute-modules names: `moe` reruns the whole layer from its input,
    `moe_act` the experts' SwiGLU, `shared_experts` the shared experts, `layernorm` the
    norm whose output the layer reads."""
    a, t, h = activations, tokens, s.hidden_size
    e, k, x = a.element, s.moe_router_topk, s.num_moe_experts
    norm_recomputed = "layernorm" in recompute
    if "moe" in recompute:  # the whole MoE layer reruns from its input
        return {"MoE input": a.norm_output(t, h, 1, norm_recomputed)}
    terms: dict[str, float] = {}
    lowp = e != FP32  # the router's fp32 copies are new tensors (in fp32 they are the input)
    # The router runs in fp32 on fp32 copies of its input (the norm's output itself when
    # training in fp32, then recomputed with `layernorm`) and of its weight (the
    # parameter itself in fp32): scores, the chosen indices (int64), their gates and
    # normaliser.
    terms["router input (fp32)"] = 0 if norm_recomputed and not lowp else t * h * FP32
    terms["router"] = (t * x * FP32 + (x * h * FP32 if lowp else 0) + t * k * 8
                       + t * k * FP32 + t * FP32)
    if s.sequence_balance_loss:
        # Its affinities normalised per token: the scores batch-major (a copy of the
        # router's when a micro-batch holds several sequences) and their sums (fp32), the
        # expert counts of each sequence (fp32), the loss its gradient scaler keeps.
        sequences = tokens // (sequence or tokens)
        terms["sequence balance loss"] = ((t * x * FP32 if sequences > 1 else 0) + t * FP32
                                          + sequences * x * FP32 + FP32)
    # The shared experts' input: the norm's output (a storage of its own below fp32); a
    # quantizing fc1 keeps its own copy.
    if s.moe_shared_expert_intermediate_size and "shared_experts" not in recompute:
        if a.quantized:
            terms["shared experts' fc1 input"] = a.linear_input(t, h)
        elif lowp:
            terms["shared experts' fc1 input"] = 0 if norm_recomputed else t * h * e
    # Dispatch bookkeeping: tokens per expert (int32) twice a micro-batch (not kept by
    # quantized experts); the FP8 wire is quantized outside autograd and keeps nothing.
    terms["dispatch"] = 0 if a.quantized else 2 * x * 4
    terms["experts' input"] = a.expert_input(t * k, h)
    terms.update(a.experts_terms(t * k, s.moe_ffn_hidden_size, "moe_act" in recompute))
    # The experts' outputs, weighed by the gates in fp32.
    terms["experts' output, gates (fp32)"] = t * k * h * FP32 + t * k * FP32
    shared = s.moe_shared_expert_intermediate_size
    if shared:
        if "shared_experts" in recompute:
            terms["shared experts"] = 0
        else:
            terms.update(a.mlp_terms(t, shared // tp, s.gated_linear_unit, "shared experts"))
    return terms
