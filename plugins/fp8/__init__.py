"""DeepSeek-V3 fine-grained FP8 training for Megatron without Transformer Engine.

Turn it on with Megatron's own `--fp8-format e4m3 --fp8-recipe blockwise` plus
`--plugins fp8` (and `--fp8-backend auto|emulated|torch`). The transformer layer's
column- and row-parallel linears then run Fprop, Dgrad and Wgrad with E4M3 operands,
one scale per 1x128 activation tile and per 128x128 weight block, FP32 accumulation
(`linear`), and keep their input for backward in FP8. Embedding, output head, router,
norms and attention stay in the training dtype. `--fp8-cache-weights` quantizes each
weight once per step instead of per micro-batch (`weight_cache`). Without this plugin
Megatron's FP8 flags do nothing on the local spec.

BF16 Adam moments with FP32 master weights (DeepSeek-V3's optimizer state) come with
Megatron's own `--exp-avg-dtype bf16 --exp-avg-sq-dtype bf16`, which Megatron refuses
without Transformer Engine today (`adam`, `optimizer_hook`; DDP and the distributed
optimizer; state is 2/3 of FP32 moments' bytes, master weights included).

Public API: `quantize(x, block)` / `dequantize(q, scales, block)` (`quantize`),
`fp8_linear(x, weight, backend)` (`linear`), `matmul_limited_accumulation` (the
accumulation-precision study, `accumulation`).
"""

from plugins.fp8.quantize import E4M3_MAX, dequantize, quantize

__all__ = ["E4M3_MAX", "dequantize", "quantize"]
