"""DeepSeek-V3 fine-grained FP8 training without Transformer Engine, not implemented yet.

Will replace Megatron's column- and row-parallel (and grouped expert) linear layers with
ones whose Fprop, Dgrad and Wgrad GEMMs take E4M3 operands with 1x128 activation and
128x128 weight scales and accumulate in FP32, cache layer inputs for backward in FP8,
and offer BF16 Adam moments; enabled by Megatron's `--fp8-format e4m3 --fp8-recipe
blockwise`, which without Transformer Engine does nothing today. Nothing here is
registered until it works.
"""
