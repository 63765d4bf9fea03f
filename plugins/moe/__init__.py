"""DeepSeek-V3's fine-grained MoE for Megatron.

Replaces the `mlp` submodule of Megatron's MoE layers (`--moe-layer-freq` keeps the first
layers dense) with `layer.DeepSeekMoE`: a sigmoid router that chooses with an expert bias
and limits each token to the best groups/nodes (`router`), auxiliary-loss-free balancing
updated after every optimizer step plus the optional sequence-wise loss (`balance`,
`hooks`), expert-parallel all-to-all dispatch on torch.distributed with FP8 and
node-aware two-hop options (`dispatch`), SwiGLU routed experts (`plugins.common.experts`,
the layer spec's `experts` slot, which other plugins may map) and Megatron's
shared experts. Turn it on with `--plugins moe` and Megatron's MoE flags
(`--num-experts`, `--moe-router-score-function sigmoid`, `--moe-router-enable-expert-bias`,
`--moe-router-num-groups`, `--moe-router-group-topk`, ...). Megatron's MoE flags the layer
does not implement are refused at start-up, by name (`plugin.REFUSED`).
"""
