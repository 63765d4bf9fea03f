"""Multi-head Latent Attention (DeepSeek-V3) for Megatron, with selective recomputation.

Replaces the `self_attention` submodule of Megatron's GPT layer spec (and the layer's
norms, by RMSNorms that support sequence parallelism) with `attention.MLASelfAttention`,
which builds without Transformer Engine (Megatron's own MLA does not build with the
local spec) and runs on CPU. Turn it on with `--plugins mla --multi-latent-attention`
and Megatron's MLA flags (`--q-lora-rank`, `--kv-lora-rank`, `--qk-head-dim`,
`--qk-pos-emb-head-dim`, `--v-head-dim`, `--rope-type yarn --rotary-scaling-factor ...`);
`--recompute-granularity selective --recompute-modules layernorm mla_up_proj` recompute
the RMSNorm outputs and the up-projected query/key/value in backward (`recompute`).
"""
