"""DeepSeek-V3 fine-grained FP8 training for Megatron without Transformer Engine.

Turn it on with Megatron's own `--fp8-format e4m3 --fp8-recipe blockwise` plus
`--plugins fp8` (and `--fp8-backend auto|emulated|torch|triton`). Its spec transform maps
the module classes of every linear slot of the finished layer spec to FP8 versions
(`spec`, `modules`): Megatron's column- and row-parallel linears, the replicated linears
and the routed experts of `plugins.common` (MLA's down-projections, the moe plugin's
experts), whichever plugin put them there. They run Fprop, Dgrad and Wgrad with E4M3
operands, one scale per 1x128 activation tile and per 128x128 weight block, FP32
accumulation (`linear`), and keep their input for backward in FP8. Embedding, output head,
router, norms and attention stay in the training dtype. `--fp8-cache-weights` quantizes
each weight once per step instead of per micro-batch (`weight_cache`). Without this plugin
Megatron's FP8 flags do nothing on the local spec.

No FP8 module waits for the GPU: inf/NaN in an operand goes to its device-side
`NonFiniteFlags`, read once per step (`non_finite`); `--gradient-accumulation-fusion` adds
Wgrad into `main_grad`; `--fp8-exclude-modules` keeps named slots in the training dtype.

Public API: `fp8_linear(x, weight, backend, non_finite=None, main_grad=None)` (`linear`),
`NonFiniteFlags` (`non_finite`), `matmul_limited_accumulation` (the
accumulation-precision study, `accumulation`); the E4M3 format itself, `quantize(x, block)`
/ `dequantize(q, scales, block)`, is `plugins.common.quantize`, shared with the moe plugin's
FP8 dispatch.
"""
