"""DeepSeek-V3's decoder as one Megatron spec, for Megatron's own `--spec` flag:

    --spec integration.deepseek_v3 decoder_spec

Every layer has Multi-head Latent Attention; the first layers (`--moe-layer-freq`, e.g.
"([0]*3+[1]*58)") have a dense SwiGLU MLP, the others DeepSeekMoE (routed experts and
shared experts); norms are RMSNorm; the embedding and the output head are separate
(`--untie-embeddings-and-output-weights`). The spec is Megatron's local block spec for
that layout; the plugins (`--plugins mla moe`, and `fp8` for FP8 linears) put their modules
into it as GPTModel is built (`upstream.seams.model.model_specs`), the same rewrite every
other GPT spec gets, so selective recomputation and FP8 follow their own flags. With
`--mtp-num-layers D` Megatron's GPT builders add D MTP layers built like the decoder's last
layer (MLA + MoE), sharing the embedding and output head.

Megatron calls the function with its model config (`GPTModelConfig` when the model is
built without a model provider, as the release `pretrain_gpt.py` does; the
TransformerConfig from `megaseek pretrain`'s model provider) and `vp_stage`.
"""

from __future__ import annotations

from typing import Any

from plugins import PluginError


def decoder_spec(config: Any, vp_stage: int | None = None):
    """This pipeline stage's layers of the DeepSeek-V3 decoder (Megatron's
    `TransformerBlockSubmodules`)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from upstream.seams.model import plugin_specs_in_place

    transformer = getattr(config, "transformer", config)
    missing = [flag for flag, present in (
        ("--multi-latent-attention", transformer.multi_latent_attention),
        ("--num-experts", bool(transformer.num_moe_experts)),
        ("--moe-shared-expert-intermediate-size",
         bool(transformer.moe_shared_expert_intermediate_size)),
        ("--normalization RMSNorm", transformer.normalization == "RMSNorm"),
        ("--swiglu", transformer.gated_linear_unit),
    ) if not present]
    if missing:
        raise PluginError("--spec integration.deepseek_v3 decoder_spec builds DeepSeek-V3's "
                          "layers and needs " + ", ".join(missing))
    if not plugin_specs_in_place():
        raise PluginError("--spec integration.deepseek_v3 decoder_spec is assembled from "
                          "megaseek's plugins: run the script through `megaseek launch` "
                          "(or `megaseek pretrain`) with --plugins mla moe")
    return get_gpt_decoder_block_spec(transformer, use_transformer_engine=False,
                                      normalization="RMSNorm", vp_stage=vp_stage)
