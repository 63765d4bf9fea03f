"""Adam moments stored in BF16 with FP32 master weights (DeepSeek-V3's optimizer state),
without Transformer Engine.

Megatron's own `--exp-avg-dtype bf16 --exp-avg-sq-dtype bf16` turn it on: no
`--plugins` entry is needed, the flags are the opt-in. Megatron 0.19.2 refuses them
without TE's precision-aware optimizer; this plugin checks them (`plugin`) and has
Megatron's optimizer factory build `adam.AdamWBF16Moments`, torch's Adam(W) update with
the moments rounded to BF16 after each step, through the fixes of `upstream.optimizer`.
Works with Megatron's DDP and distributed optimizer; the optimizer state, master
weights included, is 2/3 of that with FP32 moments.
"""
