"""What a megaseek GPT model costs, composed from its parts' cost models: the plugins' own
(`plugins.mla.cost`, `plugins.moe.cost`, `plugins.fp8.cost`) and, here, those of the
parts megaseek builds through Megatron as the DeepSeek-V3 spec uses them: standard
attention, the dense MLP, the norms, embedding and output head, and the MTP modules.

Counting conventions (each checked in tests/integration/test_describe.py against the built model):
- Parameters are those autograd trains (`numel`); the expert-bias buffer is not one.
- Activated parameters: everything a token's computation reads, that is all but the
  routed experts it is not sent to, with one row of the input embedding.
- MTP modules: their own parameters (norms, projection, transformer layer, final norm);
  they share the embedding and the output head with the main model.
- Saved bytes: what autograd keeps for backward in a layer (unique storages, parameters
  excluded), term by term, as the layers keep it on a GPU (`Activations`), dropout off.
- FLOPs per token: 6 per activated matmul weight (2 forward, 4 backward) plus causal
  attention over (s + 1) / 2 keys on average and the gate-weighted sum of the experts'
  outputs, each 3x its forward. The embedding is a lookup; recomputation is not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from plugins.common.cost import FP32, Activations, Count, dense, mlp_parameters
from plugins.mla import cost as mla
from plugins.moe import cost as moe


@dataclass(frozen=True)
class StandardAttention:
    """Megatron's self-attention without biases: linear_qkv (grouped query), the core,
    linear_proj."""

    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int


def attention_parameters(a: StandardAttention | mla.MLAShape) -> Count:
    if isinstance(a, mla.MLAShape):
        return mla.parameters(a)
    h, n, g, d = a.hidden_size, a.num_attention_heads, a.num_query_groups, a.kv_channels
    return dense(tensor=h * (n + 2 * g) * d + n * d * h)


def attention_flops_per_token(a: StandardAttention | mla.MLAShape, seq: int) -> int:
    """Forward FLOPs of the attention core (q.k and p.v), causal, per token."""
    if isinstance(a, mla.MLAShape):
        return mla.core_flops_per_token(a, seq)
    return 2 * a.num_attention_heads * 2 * a.kv_channels * (seq + 1) // 2


@dataclass(frozen=True)
class GPTShape:
    """A GPT model as megaseek builds it: the layers' attention, the dense MLP's width,
    the MoE layer (None without) and which layers are MoE, norms, vocabulary, MTP."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    vocab_size: int
    untied: bool                    # the output layer has its own weight
    gated_linear_unit: bool         # the dense MLP is SwiGLU
    norm_numbers: int               # numbers a channel: 1 (RMSNorm) or 2 (LayerNorm)
    attention: StandardAttention | mla.MLAShape
    moe: moe.MoEShape | None
    moe_layers: tuple[int, ...]     # 1 where a layer (0-based) is MoE
    mtp_num_layers: int

    def is_moe(self, layer: int) -> bool:
        """Layer 0-based; MTP layers are built like the decoder's last layer."""
        return bool(self.moe_layers[min(layer, self.num_layers - 1)])


def moe_layer_pattern(freq: int | list[int], layers: int) -> tuple[int, ...]:
    """Megatron's --moe-layer-freq as parsed (`megatron.training.arguments.moe_freq_type`)
    as one 0/1 a layer, as Megatron's decoder spec reads it: N puts a MoE layer at every
    N-th layer from the first, a list is the pattern itself."""
    if isinstance(freq, int):
        return tuple(int(i % freq == 0) for i in range(layers))
    return tuple(int(x) for x in freq)


# --- parameters ---------------------------------------------------------------------------

def layer_parameters(m: GPTShape, layer: int) -> Count:
    """One transformer layer (0-based; MTP's inner layer is built like the last one): its
    two norms, attention, and the dense MLP or the MoE layer."""
    count = dense(replicated=2 * m.norm_numbers * m.hidden_size) + attention_parameters(m.attention)
    if m.is_moe(layer):
        return count + moe.parameters(m.moe)
    return count + dense(tensor=mlp_parameters(m.hidden_size, m.ffn_hidden_size,
                                               m.gated_linear_unit))


def mtp_layer_parameters(m: GPTShape) -> Count:
    """enorm, hnorm, eh_proj ([2h -> h]), the inner layer, the final norm."""
    h = m.hidden_size
    return (dense(replicated=3 * m.norm_numbers * h, tensor=2 * h * h)
            + layer_parameters(m, m.num_layers))


def embedding_parameters(m: GPTShape, vocab: int) -> Count:
    """A lookup: one row read a token."""
    return Count(tensor=vocab * m.hidden_size, activated=m.hidden_size)


def head_parameters(m: GPTShape, vocab: int) -> Count:
    """Final norm and (untied) output layer."""
    return dense(replicated=m.norm_numbers * m.hidden_size) + (
        dense(tensor=vocab * m.hidden_size) if m.untied else Count())


def model_parameters(m: GPTShape) -> dict[str, Count]:
    """{"main": the main model, "mtp": the MTP modules} at the vocabulary as given."""
    main = embedding_parameters(m, m.vocab_size) + head_parameters(m, m.vocab_size)
    for layer in range(m.num_layers):
        main += layer_parameters(m, layer)
    mtp = Count()
    for _ in range(m.mtp_num_layers):
        mtp += mtp_layer_parameters(m)
    return {"main": main, "mtp": mtp}


def norm_weights(m: GPTShape, layer: int) -> int:
    """The activated parameters of a layer that no matmul reads: its norms' weights (the
    router's is a matmul weight)."""
    latent = (mla.latent_norm_channels(m.attention)
              if isinstance(m.attention, mla.MLAShape) else 0)
    return m.norm_numbers * (2 * m.hidden_size + latent)


def linear_names(m: GPTShape) -> list[str]:
    """Every linear of the model's layers, by its place in a layer (embedding, head,
    router, norms and attention core are not linears here)."""
    attention = (mla.linears(m.attention) if isinstance(m.attention, mla.MLAShape)
                 else ["linear_qkv", "linear_proj"])
    names = [f"self_attention.{name}" for name in attention]
    kinds = [m.is_moe(layer) for layer in range(m.num_layers)]
    if not all(kinds):
        names += ["mlp.linear_fc1", "mlp.linear_fc2"]
    if any(kinds):
        names += [f"mlp.{name}" for name in moe.linears(m.moe)]
    return names


def linear_parameters(m: GPTShape, layer: int, tp: int, ep: int) -> int:
    """This TP/EP rank's parameters of a layer's linears (all but norms and router)."""
    c = layer_parameters(m, layer)
    router = moe.router_parameters(m.moe) if m.is_moe(layer) else 0
    return c.tensor // tp + c.expert // ep + c.replicated - norm_weights(m, layer) - router


# --- FLOPs --------------------------------------------------------------------------------

def layer_flops_per_token(m: GPTShape, layer: int, seq: int) -> int:
    """One transformer layer (0-based; MTP's inner layer is built like the last one),
    forward + backward: 6 per activated matmul weight, 3x the attention core's forward and
    the experts' combine."""
    combine = moe.combine_flops_per_token(m.moe) if m.is_moe(layer) else 0
    weights = layer_parameters(m, layer).activated - norm_weights(m, layer)
    return 6 * weights + 3 * attention_flops_per_token(m.attention, seq) + combine


def head_flops_per_token(m: GPTShape) -> int:
    """One prediction through the output layer, forward + backward (the final norm and the
    loss are not matmuls)."""
    return 6 * m.vocab_size * m.hidden_size


def mtp_flops_per_token(m: GPTShape, seq: int) -> int:
    """One MTP module, forward + backward: eh_proj ([2h -> h]), its transformer layer and
    its prediction through the shared output head (its embedding is a lookup)."""
    h = m.hidden_size
    return 6 * 2 * h * h + layer_flops_per_token(m, m.num_layers, seq) + head_flops_per_token(m)


def training_flops_per_token(m: GPTShape, seq: int) -> dict[str, int]:
    """Forward + backward FLOPs per token: 6 per activated matmul weight, 3x the attention
    core's forward and the experts' combine. Main model and MTP modules (which also run
    the shared output head)."""
    main = (sum(layer_flops_per_token(m, layer, seq) for layer in range(m.num_layers))
            + head_flops_per_token(m))
    mtp = m.mtp_num_layers * mtp_flops_per_token(m, seq)
    return {"main": main, "mtp": mtp, "total": main + mtp}


# --- saved bytes --------------------------------------------------------------------------

class NotCounted(ValueError):
    """A model whose saved bytes no cost model describes."""


def layer_saved_terms(m: GPTShape, layer: int, tokens: int, sequence: int,
                      recompute: frozenset[str] = frozenset(), tp: int = 1,
                      activations: Activations = Activations()) -> dict[str, float]:
    """Bytes autograd keeps for backward in one layer for one micro-batch of `tokens`
    tokens (`sequence` positions each), by what keeps them, on a TP rank; `recompute`
    holds Megatron's --recompute-modules names."""
    if not isinstance(m.attention, mla.MLAShape):
        raise NotCounted("activation bytes are counted for MLA layers "
                         "(--multi-latent-attention) only")
    a, t, h = activations, tokens, m.hidden_size
    # Each norm keeps its input and one fp32 statistic a token.
    terms = {"input norm": t * h * a.element + t * FP32}
    terms.update(mla.saved_terms(m.attention, t, sequence, recompute, tp, a))
    terms["pre-MLP norm"] = t * h * a.element + t * FP32
    if m.is_moe(layer):
        terms.update(moe.saved_terms(m.moe, t, recompute, tp, a, sequence))
    else:
        terms.update(mlp_saved_terms(h, m.ffn_hidden_size // tp, m.gated_linear_unit, t,
                                     recompute, a))
    return terms


def mlp_saved_terms(hidden: int, ffn: int, gated: bool, tokens: int,
                    recompute: frozenset[str], activations: Activations) -> dict[str, float]:
    """Megatron's MLP (`ffn`: this TP rank's width): its input, the pre-MLP norm's output
    (rerun in backward with `layernorm`), and what it keeps past it; with `mlp` it reruns
    from its input."""
    a = activations
    norms_recomputed = "layernorm" in recompute
    if "mlp" in recompute:
        return {"MLP input": 0 if norms_recomputed else a.norm_output(tokens, hidden)}
    return {"MLP input": a.norm_output(tokens, hidden, 1, norms_recomputed),
            **a.mlp_terms(tokens, ffn, gated, "MLP")}


def layer_saved_bytes(*args, **kwargs) -> int:
    return math.ceil(sum(layer_saved_terms(*args, **kwargs).values()))


def mtp_extra_saved_bytes(m: GPTShape, tokens: int, element: int) -> int:
    """An MTP module besides its transformer layer: its three RMSNorms (enorm, hnorm and
    the final norm, Megatron's: input and output in fp32, and statistics), eh_proj's [2h]
    input, and the shifted token ids its embedding lookup keeps (int64)."""
    h = m.hidden_size
    return tokens * (3 * (2 * h * FP32 + FP32) + 2 * h * element + 8)


def head_saved_bytes(m: GPTShape, tokens: int, tp: int, element: int) -> int:
    """The final norm (Megatron's, as the MTP modules' norms: input and output in fp32,
    statistics), then per prediction (the main model's and each MTP module's) the output
    layer's input, the loss's fp32 softmax over this TP rank's vocabulary and which
    targets fall in it (the targets, int64, and a mask); per MTP module, its loss mask
    shifted once more and the per-token loss its gradient scaler keeps (fp32 each), and
    the token count that loss is divided by."""
    h, predictions = m.hidden_size, 1 + m.mtp_num_layers
    return (tokens * (2 * h * FP32 + FP32
                      + predictions * (h * element + FP32 * (-(-m.vocab_size // tp)) + 8 + 1))
            + m.mtp_num_layers * (tokens * 2 * FP32 + FP32))
