"""DeepSeek-V3's exponential moving average of the weights, kept in host memory.

Megatron has no weight EMA. `--plugins ema --ema-decay D` keeps, on every rank, an FP32
EMA of the weights that rank owns (with the distributed optimizer: its shard of the FP32
main weights), updated on a background thread after each optimizer step
(`--ema-interval N`, `--ema-start-iter K`), saved and resharded with Megatron's
checkpoint, and with `--ema-eval` evaluated beside the training weights.
`HostEMA.swapped_in()` puts the EMA into the model for users' own evaluation code.
"""

from plugins.ema.ema import EMAConfig, EMAWorkerFailed, HostEMA, owned_shards

__all__ = ["EMAConfig", "EMAWorkerFailed", "HostEMA", "owned_shards"]
