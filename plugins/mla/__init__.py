"""Multi-head Latent Attention (DeepSeek-V3) for Megatron, not implemented yet.

Will replace the `self_attention` submodule of Megatron's GPT layer spec with an MLA
module that builds without Transformer Engine (Megatron's own `MLASelfAttention` does
not build with the local spec), configured by Megatron's own flags
(`--multi-latent-attention`, `--q-lora-rank`, `--kv-lora-rank`, ...), with selective
recomputation of RMSNorm and the MLA up-projections (`--recompute-modules layernorm
mla_up_proj`). Nothing here is registered until it works.
"""
