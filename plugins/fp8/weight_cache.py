"""FP8 weights kept from their first use in a training step until the optimizer step.

Weights change only at the optimizer step, yet without a cache every micro-batch quantizes
every weight twice (W in forward, W^T in backward): 2 x micro-batches quantizations per
weight per step where one pass does: the first forward that needs the weight with autograd
on writes W and W^T from one read of it (`quantize_weight_with_transposed`). `--fp8-cache-weights` keeps each weight's E4M3 bytes and
128x128 scales as W and as W^T (2 bytes per weight, plus 8 bytes per 16384) while the
step runs. The cost is that memory, held through the step, like Transformer Engine's
cached FP8 weights (it also keeps both orientations).

A cached copy is used only while it is provably current: the plugin drops every cache after
each successful optimizer step (`drop_fp8_weights`, Megatron's optimizer writes the new
weights through `.data` or into its parameter buffers, which no version counter records),
and a weight changed in place by an ordinary op between steps (its version counter moves)
or another tensor in its place is quantized again.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

import torch

from plugins.fp8.backends import Operand
from plugins.common.quantize import (Quantizer, pad_to_tiles, quantize,
                                     quantize_blocks_transposed,
                                     quantize_blocks_with_transposed, raise_if_non_finite)

WEIGHT = (128, 128)


def quantize_weight(weight: torch.Tensor, check_finite: bool = True,
                    quantizer: Quantizer | None = None) -> Operand:
    """weight [out, in] in 128x128 blocks, `out` zero-padded to whole blocks (DeepSeek's
    layout for MLA's 576-row kv down-projection): zero rows add nothing to a product."""
    padded = pad_to_tiles(weight, rows=WEIGHT[0])
    operand = Operand(*quantize(padded, WEIGHT, check_finite=False, quantizer=quantizer),
                      WEIGHT)
    if check_finite:
        raise_if_non_finite(operand.scales, WEIGHT, "fp8_linear: the weight")
    return operand


def quantize_weight_transposed(weight: torch.Tensor, check_finite: bool = True,
                               quantizer: Quantizer | None = None) -> Operand:
    """W^T [in, out_p] in 128x128 blocks, as Dgrad takes it: the bits of
    `quantize_weight(weight)` transposed (the blocks are square), written transposed in one
    pass over W on a GPU. FP8 GEMMs on Hopper read both operands K-major, so Dgrad cannot
    use W's own bytes; a transposed copy of them cost more than this whole quantization
    (H200, 2026-11-26: bench/gpu-runs.md)."""
    operand = Operand(*quantize_blocks_transposed(weight, check_finite=False,
                                                  quantizer=quantizer), WEIGHT)
    if check_finite:
        raise_if_non_finite(operand.scales, WEIGHT, "fp8_linear: the weight")
    return operand


def quantize_weight_with_transposed(weight: torch.Tensor, check_finite: bool = True,
                                    quantizer: Quantizer | None = None
                                    ) -> tuple[Operand, Operand]:
    """(W, W^T) as `quantize_weight` and `quantize_weight_transposed` give them, written
    from one read of W (one launch on a GPU, as Transformer Engine's W/W^T quantization)."""
    w, w_t = quantize_blocks_with_transposed(weight, check_finite=False, quantizer=quantizer)
    operands = Operand(*w, WEIGHT), Operand(*w_t, WEIGHT)
    if check_finite:
        raise_if_non_finite(operands[0].scales, WEIGHT, "fp8_linear: the weight")
    return operands


class FP8WeightCache:
    """One module's FP8 weights, each under a slot of the module's choosing, as W for Fprop
    and as W^T for Dgrad: both from one read of the weight when W is asked for with
    autograd on (backward will ask for W^T), else each when first asked for.

    `record(slot, scales)`: takes each new W's scales for the owner's inf/NaN check
    (`plugins.fp8.non_finite.NonFiniteFlags`, no wait on the GPU); None: each new W is
    checked at once (a host sync). `quantizer`: the owner's `Quantizer` for a weight's
    device (None: decided per quantization)."""

    def __init__(self, record: Callable[[Hashable, torch.Tensor], None] | None = None,
                 quantizer: Callable[[torch.device], Quantizer] | None = None) -> None:
        self._record, self._quantizer = record, quantizer
        self._held: dict[tuple[Hashable, bool], tuple[tuple[int, int], Operand]] = {}
        self.quantizations = 0  # how many weights were quantized as W (tests, logs)
        self.transposed_quantizations = 0  # and as W^T
        self.reads = 0  # passes over a weight: one writes W, W^T or both

    def get(self, weight: torch.Tensor, slot: Hashable = 0) -> Operand:
        """The FP8 weight for `slot`, quantized (and checked for inf/NaN) when not held."""
        return self._get(weight, slot, transposed=False)

    def get_transposed(self, weight: torch.Tensor, slot: Hashable = 0) -> Operand:
        """The FP8 W^T for `slot` (`quantize_weight_transposed`), quantized when not held."""
        return self._get(weight, slot, transposed=True)

    def _get(self, weight: torch.Tensor, slot: Hashable, transposed: bool) -> Operand:
        key = (weight.data_ptr(), weight._version)
        held = self._held.get((slot, transposed))
        if held is not None and held[0] == key:
            return held[1]
        self.reads += 1
        quantizer = self._quantizer(weight.device) if self._quantizer is not None else None
        if not transposed and torch.is_grad_enabled():
            w, w_t = quantize_weight_with_transposed(weight.detach(),
                                                     check_finite=self._record is None,
                                                     quantizer=quantizer)
            if self._record is not None:
                self._record(slot, w.scales)
            self._held[(slot, False)], self._held[(slot, True)] = (key, w), (key, w_t)
            self.quantizations += 1
            self.transposed_quantizations += 1
            return w
        if transposed:  # the same version's W was checked for inf/NaN when it was held
            checked = self._held.get((slot, False), (None,))[0] == key
            operand = quantize_weight_transposed(
                weight.detach(), check_finite=not checked and self._record is None,
                quantizer=quantizer)
            if self._record is not None and not checked:
                self._record(slot, operand.scales)
        else:
            operand = quantize_weight(weight.detach(), check_finite=self._record is None,
                                      quantizer=quantizer)
            if self._record is not None:
                self._record(slot, operand.scales)
        self._held[(slot, transposed)] = (key, operand)
        if transposed:
            self.transposed_quantizations += 1
        else:
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
