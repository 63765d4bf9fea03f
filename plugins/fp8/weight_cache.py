"""FP8 weights kept from their first use in a training step until the optimizer step.

Weights change only at the optimizer step, yet without a cache every micro-batch quantizes
every weight twice (forward, and again in backward): 2 x micro-batches quantizations per
weight per step where one does. `--fp8-cache-weights` keeps each weight's E4M3 bytes and
128x128 scales (1 byte per weight, plus 4 bytes per 16384) while the step runs; backward
uses them as they are. The cost is that memory, held through the step, like Transformer
Engine's cached FP8 weights.

A cached copy is used only while it is provably current: the plugin drops every cache after
each successful optimizer step (`drop_fp8_weights`, Megatron's optimizer writes the new
weights through `.data` or into its parameter buffers, which no version counter records),
and a weight changed in place by an ordinary op between steps (its version counter moves)
or another tensor in its place is quantized again.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import torch

from plugins.fp8.backends import Operand
from plugins.common.quantize import pad_to_tiles, quantize, raise_if_non_finite

WEIGHT = (128, 128)


def quantize_weight(weight: torch.Tensor, check_finite: bool = True) -> Operand:
    """weight [out, in] in 128x128 blocks, `out` zero-padded to whole blocks (DeepSeek's
    layout for MLA's 576-row kv down-projection): zero rows add nothing to a product."""
    padded = pad_to_tiles(weight, rows=WEIGHT[0])
    operand = Operand(*quantize(padded, WEIGHT, check_finite=False), WEIGHT)
    if check_finite:
        raise_if_non_finite(operand.scales, WEIGHT, "fp8_linear: the weight")
    return operand


class FP8WeightCache:
    """One module's FP8 weights, each under a slot of the module's choosing."""

    def __init__(self) -> None:
        self._held: dict[Hashable, tuple[tuple[int, int], Operand]] = {}
        self.quantizations = 0  # how many weights were quantized (tests, logs)

    def get(self, weight: torch.Tensor, slot: Hashable = 0) -> Operand:
        """The FP8 weight for `slot`, quantized (and checked for inf/NaN) when not held."""
        key = (weight.data_ptr(), weight._version)
        held = self._held.get(slot)
        if held is not None and held[0] == key:
            return held[1]
        operand = quantize_weight(weight.detach())
        self._held[slot] = (key, operand)
        self.quantizations += 1
        return operand

    def drop(self) -> None:
        self._held.clear()


def drop_fp8_weights(model_chunks: Iterable[torch.nn.Module]) -> None:
    """Drops every FP8 weight cache in the model: after each optimizer step."""
    for chunk in model_chunks:
        for module in chunk.modules():
            cache = getattr(module, "fp8_weight_cache", None)
            if cache is not None:
                cache.drop()
