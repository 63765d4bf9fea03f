"""DeepSeek-V3 fine-grained MoE for Megatron, not implemented yet.

Will replace the `mlp` submodule of MoE layers: sigmoid router with group- and
node-limited top-k, auxiliary-loss-free expert-bias balancing updated after each
optimizer step, shared experts, and expert-parallel all-to-all dispatch in FP8 (one
scale per 1x128 tile) with a BF16 combine, including a node-aware two-hop dispatch.
Configured by Megatron's `--moe-router-*` flags. Nothing here is registered until it works.
"""
