"""Tensor names: Hugging Face DeepSeek-V3 <-> the Megatron GPTModel that megaseek builds
(Megatron's local spec with the mla and moe plugins' modules).

    model.embed_tokens.weight                    embedding.word_embeddings.weight
    model.norm.weight                            decoder.final_layernorm.weight
    lm_head.weight                               output_layer.weight
    model.layers.i.input_layernorm               decoder.layers.i.input_layernorm
    model.layers.i.post_attention_layernorm      decoder.layers.i.pre_mlp_layernorm
    .self_attn.q_a_proj / q_a_layernorm          .self_attention.linear_q_down_proj / q_layernorm
    .self_attn.q_b_proj (q_proj without q-LoRA)  .self_attention.linear_q_up_proj (linear_q_proj)  *
    .self_attn.kv_a_proj_with_mqa                .self_attention.linear_kv_down_proj              *
    .self_attn.kv_a_layernorm / kv_b_proj        .self_attention.kv_layernorm / linear_kv_up_proj
    .self_attn.o_proj                            .self_attention.linear_proj
    .mlp.{gate,up}_proj (dense)                  .mlp.linear_fc1 rows [gate | up]
    .mlp.down_proj                               .mlp.linear_fc2
    .mlp.gate.weight                             .mlp.router.weight
    .mlp.gate.e_score_correction_bias            .mlp.router.e_score_correction_bias
    .mlp.experts.e.{gate,up}_proj                .mlp.experts.weight1[e] rows [gate | up]
    .mlp.experts.e.down_proj                     .mlp.experts.weight2[e]
    .mlp.shared_experts.{gate,up,down}_proj      .mlp.shared_experts.linear_fc1 / linear_fc2

    * RoPE rows: DeepSeek's interleaved pairs, reordered by `plugins.mla.convert`.

MTP depth j is HF layer N + j (N = num_hidden_layers): its enorm, hnorm, eh_proj and
shared_head.norm are `mtp.layers.j.{enorm, hnorm, eh_proj, final_layernorm}`, its
transformer layer `mtp.layers.j.mtp_model_layer.*` (names as above); its embed_tokens and
shared_head.head are copies of the main model's embedding and head, which Megatron shares.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from integration.hf.config import HFConversionError, HFModel

COPY, GATE, UP, EXPERT_GATE, EXPERT_UP, EXPERT_DOWN, ROPE_Q, ROPE_KV, SHARED = (
    "copy", "gate", "up", "expert_gate", "expert_up", "expert_down", "rope_q", "rope_kv",
    "shared")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one HF tensor lives in the Megatron model: parameter `name`, and how (`kind`):
    whole, the gate or up half of a fused fc1, expert `expert`'s slice of a stacked
    weight, with RoPE rows reordered, or a copy of a tensor Megatron shares (`SHARED`)."""
    name: str
    kind: str = COPY
    expert: int | None = None


_ATTENTION = {
    "q_a_proj.weight": ("linear_q_down_proj.weight", COPY),
    "q_a_layernorm.weight": ("q_layernorm.weight", COPY),
    "q_b_proj.weight": ("linear_q_up_proj.weight", ROPE_Q),
    "q_proj.weight": ("linear_q_proj.weight", ROPE_Q),
    "kv_a_proj_with_mqa.weight": ("linear_kv_down_proj.weight", ROPE_KV),
    "kv_a_layernorm.weight": ("kv_layernorm.weight", COPY),
    "kv_b_proj.weight": ("linear_kv_up_proj.weight", COPY),
    "o_proj.weight": ("linear_proj.weight", COPY),
}
_MLP = {"gate_proj.weight": ("linear_fc1.weight", GATE),
        "up_proj.weight": ("linear_fc1.weight", UP),
        "down_proj.weight": ("linear_fc2.weight", COPY)}
_EXPERT = {"gate_proj.weight": ("weight1", EXPERT_GATE), "up_proj.weight": ("weight1", EXPERT_UP),
           "down_proj.weight": ("weight2", EXPERT_DOWN)}
_MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
            "eh_proj.weight": "eh_proj.weight", "shared_head.norm.weight": "final_layernorm.weight"}
_MTP_SHARED = {"embed_tokens.weight": "embedding.word_embeddings.weight",
               "shared_head.head.weight": "output_layer.weight"}
_TOP = {"model.embed_tokens.weight": "embedding.word_embeddings.weight",
        "model.norm.weight": "decoder.final_layernorm.weight",
        "lm_head.weight": "output_layer.weight"}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _layer_target(rest: str, prefix: str) -> Target | None:
    """A transformer layer's tensor (HF name after `model.layers.i.`) under Megatron prefix."""
    if rest == "input_layernorm.weight":
        return Target(prefix + "input_layernorm.weight")
    if rest == "post_attention_layernorm.weight":
        return Target(prefix + "pre_mlp_layernorm.weight")
    if rest.startswith("self_attn.") and rest[10:] in _ATTENTION:
        name, kind = _ATTENTION[rest[10:]]
        return Target(prefix + "self_attention." + name, kind)
    if rest == "mlp.gate.weight":
        return Target(prefix + "mlp.router.weight")
    if rest == "mlp.gate.e_score_correction_bias":
        return Target(prefix + "mlp.router.e_score_correction_bias")
    match = re.fullmatch(r"mlp\.experts\.(\d+)\.(.+)", rest)
    if match and match.group(2) in _EXPERT:
        name, kind = _EXPERT[match.group(2)]
        return Target(prefix + "mlp.experts." + name, kind, int(match.group(1)))
    match = re.fullmatch(r"mlp\.(shared_experts\.)?(.+)", rest)
    if match and match.group(2) in _MLP:
        name, kind = _MLP[match.group(2)]
        return Target(prefix + "mlp." + (match.group(1) or "") + name, kind)
    return None


def megatron_target(hf_name: str, model: HFModel, mtp_layers: int) -> Target | None:
    """The Megatron target of an HF tensor, or None if the architecture has no such tensor
    (`mtp_layers`: MTP depths being converted)."""
    if hf_name in _TOP:
        return Target(_TOP[hf_name])
    match = _LAYER.fullmatch(hf_name)
    if not match:
        return None
    layer, rest = int(match.group(1)), match.group(2)
    if layer < model.num_hidden_layers:
        target = _layer_target(rest, f"decoder.layers.{layer}.")
    elif layer < model.num_hidden_layers + mtp_layers:
        depth = layer - model.num_hidden_layers
        if rest in _MTP_OWN:
            return Target(f"mtp.layers.{depth}.{_MTP_OWN[rest]}")
        if rest in _MTP_SHARED:
            return Target(_MTP_SHARED[rest], SHARED)
        target = _layer_target(rest, f"mtp.layers.{depth}.mtp_model_layer.")
    else:
        return None
    if target is None or not _in_architecture(target, rest, model, layer):
        return None
    return target


def _in_architecture(target: Target, rest: str, model: HFModel, layer: int) -> bool:
    if rest.startswith("self_attn.q_"):
        lora = rest.startswith(("self_attn.q_a_", "self_attn.q_b_"))
        return lora == (model.q_lora_rank is not None)
    if rest.startswith("mlp."):
        moe = model.moe_layer(layer)
        if rest.startswith(("mlp.gate.", "mlp.experts.")):
            if target.expert is not None and target.expert >= (model.n_routed_experts or 0):
                return False
            return moe
        if rest.startswith("mlp.shared_experts."):
            return moe and model.n_shared_experts > 0
        return not moe
    return True


def hf_names(model: HFModel, mtp_layers: int, mtp_shared_copies: bool = True) -> list[str]:
    """Every HF tensor of the architecture with `mtp_layers` MTP depths, in model order
    (DeepSeek's layout: MTP layers carry copies of the embedding and head)."""
    names = ["model.embed_tokens.weight"]
    for layer in range(model.num_hidden_layers + mtp_layers):
        p = f"model.layers.{layer}."
        mtp = layer >= model.num_hidden_layers
        if mtp:
            names += [p + "enorm.weight", p + "hnorm.weight", p + "eh_proj.weight"]
            if mtp_shared_copies:
                names.append(p + "embed_tokens.weight")
        names.append(p + "input_layernorm.weight")
        q = (["q_a_proj", "q_a_layernorm", "q_b_proj"] if model.q_lora_rank is not None
             else ["q_proj"])
        names += [p + f"self_attn.{n}.weight" for n in
                  q + ["kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"]]
        names.append(p + "post_attention_layernorm.weight")
        mlp = ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
        if model.moe_layer(layer):
            names += [p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"]
            names += [p + f"mlp.experts.{e}.{n}"
                      for e in range(model.n_routed_experts) for n in mlp]
            if model.n_shared_experts:
                names += [p + f"mlp.shared_experts.{n}" for n in mlp]
        else:
            names += [p + f"mlp.{n}" for n in mlp]
        if mtp:
            names.append(p + "shared_head.norm.weight")
            if mtp_shared_copies:
                names.append(p + "shared_head.head.weight")
    return names + ["model.norm.weight", "lm_head.weight"]


def rope_order(rope_dim: int) -> torch.Tensor:
    """The row order `plugins.mla.convert.from_interleaved_rope` applies to RoPE rows
    (read from that function, so the layout is defined in one place)."""
    from plugins.mla.convert import from_interleaved_rope

    rows = torch.arange(rope_dim, dtype=torch.float64)[:, None]
    out = from_interleaved_rope({"linear_kv_down_proj.weight": rows}, heads=1, qk_head_dim=0,
                                rope_dim=rope_dim)
    return out["linear_kv_down_proj.weight"][:, 0].long()


def expected_shape(target: Target, param: torch.Tensor) -> tuple[int, ...]:
    """The HF tensor's shape for its Megatron target `param`."""
    if target.kind in (GATE, UP):
        return (param.shape[0] // 2, param.shape[1])
    if target.kind in (EXPERT_GATE, EXPERT_UP):
        return (param.shape[1] // 2, param.shape[2])
    if target.kind == EXPERT_DOWN:
        return tuple(param.shape[1:])
    return tuple(param.shape)


def reorder_rope(weight: torch.Tensor, kind: str, model: HFModel, inverse: bool) -> torch.Tensor:
    """RoPE rows of q (per head) or of the kv down-projection (its last rows) from
    DeepSeek's interleaved layout to Megatron's (or back, `inverse`)."""
    rope = model.qk_rope_head_dim
    order = rope_order(rope)
    if inverse:
        order = torch.argsort(order)
    if kind == ROPE_KV:
        latent = weight.shape[0] - rope
        return torch.cat([weight[:latent], weight[latent:][order]])
    nope, heads = model.qk_nope_head_dim, model.num_attention_heads
    w = weight.view(heads, nope + rope, -1)
    return torch.cat([w[:, :nope], w[:, nope:][:, order]], dim=1).reshape(weight.shape)


def check_names(found: set[str], model: HFModel, mtp_layers: int) -> None:
    """Raises naming the first missing or extra tensor (scale tensors excluded)."""
    expected = set(hf_names(model, mtp_layers, mtp_shared_copies=False))
    optional = set(hf_names(model, mtp_layers)) - expected
    missing = sorted(expected - found, key=natural_order)
    extra = sorted(found - expected - optional, key=natural_order)
    if missing:
        raise HFConversionError(f"missing tensor {missing[0]}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise HFConversionError(f"unexpected tensor {extra[0]}"
                                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def natural_order(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
