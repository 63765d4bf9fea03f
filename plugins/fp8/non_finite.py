"""Inf and NaN in FP8 operands, found without waiting for the GPU.

A tile holding inf or NaN quantizes to scale inf (`plugins.common.quantize.tile_scales`),
so a GEMM it enters gives no finite value; but the error must say where it came from.
Two ways to say it:

- `EagerChecks` (what `fp8_linear` does when given nothing else, for plain-torch callers):
  each direction checks its operands once its GEMMs are queued, a wait on the GPU, and
  raises naming the operand and its first bad tile;
- `NonFiniteFlags` (what every FP8 module of a Megatron model owns): each pass ORs its
  operands' largest scale into a small device tensor of the module, with no wait. The
  plugin reads every module's flags once per step, where Megatron waits for the gradients
  anyway (`plugins.fp8.plugin.before_gradient_checks`), and fails the step naming the
  module, the pass and the operand, and the iteration.

What a pass records, as (pass, operand): `SLOTS`. Under fp16 with Megatron's dynamic loss
scaler, an overflow in backward is the scaler's signal to skip the step and lower the
scale: such operands give inf/NaN gradients, which the scaler sees (the inf scale makes
every product they enter non-finite), so the step check leaves the backward slots to it.
"""

from __future__ import annotations

import torch

from plugins.common.tiles import raise_if_non_finite

FPROP, BACKWARD = "Fprop", "Dgrad/Wgrad"
X, WEIGHT, DY = "input x", "weight", "output gradient dy"
# (pass, operand) of each flag, in order. Dgrad and Wgrad share their operand dy (tiled
# along channels for one, along tokens for the other: the same values); Wgrad's x is
# re-tiled from x's Fprop bytes and Dgrad's W^T has W's values, both checked in Fprop.
SLOTS: tuple[tuple[str, str], ...] = ((FPROP, X), (FPROP, WEIGHT), (BACKWARD, DY))


class EagerChecks:
    """Raises at once: one host sync per call, for all the operands given, then the error
    names the operand and its tile. No state."""

    def record(self, pass_: str, *operands: tuple[str, torch.Tensor, tuple[int, int]]) -> None:
        """operands: (what, scales, block) each."""
        if not operands or bool(torch.stack([torch.isfinite(scales).all()
                                             for _, scales, _ in operands]).all()):
            return
        for what, scales, block in operands:
            raise_if_non_finite(scales, block, f"fp8_linear: {pass_}: the {what}")


class NonFiniteFlags:
    """One FP8 projection's record, on its device: per slot the largest scale seen since the
    last `clear` (inf or NaN once a non-finite tile was quantized). Recording queues two
    small kernels and never waits; `found` is the one read, a host sync."""

    def __init__(self) -> None:
        self._largest: torch.Tensor | None = None  # [len(SLOTS)] float32, on first use

    def record(self, pass_: str, *operands: tuple[str, torch.Tensor, tuple[int, int]]) -> None:
        for what, scales, _ in operands:
            if scales.numel() == 0:  # an expert without tokens (amax needs an element)
                continue
            if self._largest is None or self._largest.device != scales.device:
                self._largest = torch.zeros(len(SLOTS), device=scales.device)
            slot = self._largest[SLOTS.index((pass_, what))]
            torch.maximum(slot, scales.detach().amax(), out=slot)

    def found(self) -> list[tuple[str, str]]:
        """The slots that saw a non-finite operand (a host sync, when anything was recorded)."""
        if self._largest is None:
            return []
        finite = torch.isfinite(self._largest).tolist()
        return [slot for slot, ok in zip(SLOTS, finite) if not ok]

    def clear(self) -> None:
        if self._largest is not None:
            self._largest.zero_()


def found_in(named: list[tuple[str, NonFiniteFlags]]) -> list[tuple[str, str, str]]:
    """(name, pass, operand) of every slot of the named flags that saw a non-finite
    operand, read in one transfer (one host sync) however many modules there are."""
    recorded = [(name, flags._largest) for name, flags in named if flags._largest is not None]
    if not recorded:
        return []
    finite = torch.isfinite(torch.stack([t for _, t in recorded])).tolist()  # [modules, slots]
    return [(name, *slot) for (name, _), row in zip(recorded, finite)
            for slot, ok in zip(SLOTS, row) if not ok]


def named_flags(model_chunks) -> list[tuple[str, NonFiniteFlags]]:
    """Every FP8 projection's flags in the model, by qualified name: Megatron's wrappers'
    `module.` prefixes dropped, a transformer layer named by its global index (as in the
    checkpoint) wherever pipeline stages put it, an expert group's projections under it
    (`decoder.layers.3.mlp.experts.linear_fc1`)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    named = []
    for chunk in model_chunks:
        renamed: dict[str, str] = {}  # a layer's local name -> its global one
        for name, module in chunk.named_modules():
            while name.startswith("module."):
                name = name[len("module."):]
            for local, global_ in renamed.items():
                if name.startswith(local + "."):
                    name = global_ + name[len(local):]
            if isinstance(module, TransformerLayer) and name.rpartition(".")[2].isdigit():
                global_ = f"{name.rpartition('.')[0]}.{module.layer_number - 1}"
                renamed[name], name = global_, global_
            for projection, flags in getattr(module, "fp8_non_finite", {}).items():
                named.append((f"{name}.{projection}" if projection else name, flags))
    return named
