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


# DeepSeek-V3's training run as the report (section 3) gives it, as `megaseek describe`
# flags: no TP, PP 16, EP 64 over 2048 GPUs (DP 128, ZeRO-1), BF16 with FP8 linears, BF16
# Adam moments and FP32 master weights, RMSNorm and MLA up-projections recomputed, one
# 4096-token sequence a micro-batch, the final batch of 15360 sequences. The EMA lives on
# the host (--plugins ema), not in GPU memory.
RECIPE = ("--plugins", "mla", "moe", "fp8", "dualpipe", "--pipeline-model-parallel-size", "16",
          "--expert-model-parallel-size", "64", "--data-parallel-size", "128",
          "--micro-batch-size", "1", "--global-batch-size", "15360", "--bf16",
          "--use-distributed-optimizer", "--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype", "bf16",
          "--recompute-granularity", "selective", "--recompute-modules", "layernorm",
          "mla_up_proj")

# --pipeline-model-parallel-layout for that run, balanced by describe's FLOPs per stage
# (tests/integration/test_describe.py: no move of one layer between stages lowers the
# most loaded stage or rank). One micro-batch through the output head is 1.4 layers'
# FLOPs, through the MTP module (its layer, projection and its own pass through the head)
# 2.5: the stage with the loss weighs 3.9 layers besides its own.
# - DualPipe, 16 stages (rank r: stage r one way, 15-r the other): four layers a stage,
#   the last stage one layer with MTP and the loss (stages max/mean 1.21, ranks 1.10).
# - DualPipeV, 32 stages (rank r: stages r and 31-r): Megatron-Bridge's DeepSeek-V3
#   layout, two layers a stage, one with the embedding, none with MTP and the loss
#   (stages 1.93: the last stage cannot be cut; ranks 1.21).
PIPELINE_LAYOUTS = {
    "dualpipe": "Etttt|(tttt|)*14tmL",
    "dualpipev": "Et|(tt|)*30mL",
}
