"""The FP8 versions of the layer spec's module classes (`plugins.fp8.spec` maps each class
to its version here). Each keeps its parent's parameters, names and communication and
changes only its GEMMs, which run through `plugins.fp8.linear.fp8_linear`:
- `FP8ColumnParallelLinear`, `FP8RowParallelLinear`: Megatron's linear layers with their
  GEMM function replaced; tensor/sequence-parallel communication stays Megatron's;
- `FP8ReplicatedLinear`: `plugins.common.linear.ReplicatedLinear` (MLA's down-projections;
  DeepSeek-V3 keeps them in FP8 too, the kv one's 576 rows ending in a half 128x128 block);
- `FP8LocalExperts`: `plugins.common.experts.LocalExperts` with fc1 and fc2 of every expert
  in FP8 and the SwiGLU input cached in FP8; tokens that came by FP8 dispatch enter fc1 as
  the bytes that were sent, each expert's rows zero-padded to the multiple its backend's
  GEMMs take without a copy (by the dispatch, else once here).
Each takes `fp8_backend` (a `plugins.fp8.backends` name) and `fp8_cache_weights` (keep its
FP8 weights through the step: `plugins.fp8.weight_cache`). With `config.delay_wgrad_compute`
each defers its FP8 Wgrad GEMMs to the W (`plugins.common.wgrad`). None waits for the GPU:
inf or NaN in an operand is recorded in the module's `fp8_non_finite` flags (one
`NonFiniteFlags` per projection, by the projection's name under the module: "" for a
linear, "linear_fc1" and "linear_fc2" for the experts), which the plugin reads once per
step (`plugins.fp8.non_finite`). Where quantization runs (Triton kernels or torch ops) is
decided once per module and device (`fp8_quantizer`), not per quantization.
"""

from __future__ import annotations

from functools import partial

import torch

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from plugins.common.experts import LocalExperts
from plugins.common.linear import ReplicatedLinear
from plugins.common.quantize import Quantizer, quantize
from plugins.common.tiles import SMALLEST_NORMAL_FP32
from plugins.common.wgrad import sink_for, wgrad_store
from plugins.fp8.backends import ROW_MULTIPLE
from plugins.fp8.linear import ACTIVATION, MainGrad, fp8_linear
from plugins.fp8.non_finite import FPROP, WEIGHT, X, NonFiniteFlags
from plugins.fp8.slots import EXCLUDABLE
from plugins.fp8.swiglu import FP8CachedSwiGLU
from plugins.fp8.weight_cache import FP8WeightCache
from upstream.private_names import FP8_LINEARS_FORWARD_IMPL, require

# The FP8 linears replace Megatron's private `_forward_impl`: checked here, so that a
# Megatron that renamed or changed it fails at import, not with the GEMMs silently run in
# the training dtype.
require(FP8_LINEARS_FORWARD_IMPL)


class _FP8Module:
    """What every FP8 module adds to its parent: the GEMM backend, where it quantizes, its
    inf/NaN flags, and with `fp8_cache_weights` the FP8 copies of its weights, held through
    the step."""

    PROJECTIONS = ("",)  # names of the module's FP8 projections, under its own

    def _set_fp8(self, backend: str, cache_weights: bool) -> None:
        self.fp8_backend = backend
        self._fp8_quantizer: Quantizer | None = None
        self.fp8_non_finite = {name: NonFiniteFlags() for name in self.PROJECTIONS}
        self.fp8_weight_cache = (FP8WeightCache(self._record_weight, self.fp8_quantizer)
                                 if cache_weights else None)
        self.deferred_wgrads = wgrad_store(self.config)

    def fp8_quantizer(self, device: torch.device) -> Quantizer:
        """Where this module quantizes on `device`: decided when it first runs there."""
        if self._fp8_quantizer is None or self._fp8_quantizer.device != device:
            self._fp8_quantizer = Quantizer.for_device(device)
        return self._fp8_quantizer

    def _flags(self, slot=0) -> NonFiniteFlags:
        """The flags of the projection a weight-cache slot belongs to."""
        return self.fp8_non_finite[""]

    def _record_weight(self, slot, scales: torch.Tensor) -> None:
        self._flags(slot).record(FPROP, (WEIGHT, scales, (128, 128)))

    def _main_grad(self, weight: torch.nn.Parameter, fused: bool,
                   index: int | None = None) -> MainGrad | None:
        """Where Wgrad adds its product with `--gradient-accumulation-fusion` (Megatron's
        DDP gives each parameter its FP32 `main_grad`), else None: returned as a gradient."""
        if not fused or not hasattr(weight, "main_grad"):
            return None
        into = weight.main_grad if index is None else weight.main_grad[index]
        return MainGrad(into, weight)

    def _held(self, weight: torch.Tensor, slot=0):
        """The held FP8 copy of `weight` (None: quantize it where it is used)."""
        cache = self.fp8_weight_cache
        return cache.get(weight, slot) if cache is not None else None

    def _held_t(self, weight: torch.Tensor, slot=0):
        """What gives backward the held FP8 W^T (None: quantize it there)."""
        cache = self.fp8_weight_cache
        return partial(cache.get_transposed, weight, slot) if cache is not None else None


def _without_fused_kernel_check(config):
    """`config` for a Megatron linear's __init__, which refuses gradient accumulation fusion
    without apex's fused_weight_gradient_mlp_cuda (tensor_parallel/layers.py:1070): an FP8
    linear adds its Wgrad into main_grad itself, so it needs no such kernel."""
    import copy

    unfused = copy.copy(config)  # no __post_init__: the same config, one field changed
    unfused.gradient_accumulation_fusion = False
    return unfused


def _fp8_forward_impl(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                      sequence_parallel, *, module: _FP8Module, tp_group=None, **unused):
    """Megatron's `linear_with_grad_accumulation_and_async_allreduce` contract with the
    GEMMs in FP8: all-gather the input under sequence parallelism, all-reduce its
    gradient under plain TP (both through Megatron's own mappings); with
    `gradient_accumulation_fusion`, Wgrad adds into the weight's main_grad. The keywords
    left in `unused` carry features refused at start-up: grad_output_buffer and
    wgrad_deferral_limit (--defer-embedding-wgrad-compute, for every run of Megatron's local
    linears), a gtp_remat_size above 1 (GTP weight shards, with the plugin)."""
    if sequence_parallel:
        input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True,
                                                     group=tp_group)
    elif allreduce_dgrad:
        input = copy_to_tensor_model_parallel_region(input, group=tp_group)
    output = fp8_linear(input, weight, module.fp8_backend, weight_fp8=module._held(weight),
                        wgrad=sink_for(module, weight), weight_fp8_t=module._held_t(weight),
                        non_finite=module._flags(),
                        main_grad=module._main_grad(weight, gradient_accumulation_fusion),
                        quantizer=module.fp8_quantizer(input.device))
    return output if bias is None else output + bias


class FP8ColumnParallelLinear(_FP8Module, ColumnParallelLinear):
    def __init__(self, *args, config, fp8_backend: str = "emulated",
                 fp8_cache_weights: bool = False, **kwargs):
        super().__init__(*args, config=_without_fused_kernel_check(config), **kwargs)
        self.config, self.gradient_accumulation_fusion = config, config.gradient_accumulation_fusion
        self._set_fp8(fp8_backend, fp8_cache_weights)
        self._forward_impl = partial(_fp8_forward_impl, module=self)


class FP8RowParallelLinear(_FP8Module, RowParallelLinear):
    def __init__(self, *args, config, fp8_backend: str = "emulated",
                 fp8_cache_weights: bool = False, **kwargs):
        super().__init__(*args, config=_without_fused_kernel_check(config), **kwargs)
        self.config, self.gradient_accumulation_fusion = config, config.gradient_accumulation_fusion
        self._set_fp8(fp8_backend, fp8_cache_weights)
        self._forward_impl = partial(_fp8_forward_impl, module=self)


class FP8ReplicatedLinear(_FP8Module, ReplicatedLinear):
    def __init__(self, *args, fp8_backend: str = "emulated", fp8_cache_weights: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._set_fp8(fp8_backend, fp8_cache_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.fp8_backend, weight_fp8=self._held(self.weight),
                          wgrad=sink_for(self, self.weight),
                          weight_fp8_t=self._held_t(self.weight), non_finite=self._flags(),
                          main_grad=self._main_grad(self.weight,
                                                    self.config.gradient_accumulation_fusion),
                          quantizer=self.fp8_quantizer(x.device))


def _recorded_fp8(x: torch.Tensor, flags: NonFiniteFlags, quantizer: Quantizer
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x in FP8 1x128 tiles, its scales recorded as the projection's Fprop input. Outside
    autograd: the projection takes x's gradient through x itself, and recorded, the
    quantization would keep its fp32 intermediates alive with the FP8 copy the projection
    saves (the GPU's Triton kernel records none)."""
    with torch.no_grad():
        q, scales = quantize(x, ACTIVATION, check_finite=False, quantizer=quantizer)
    flags.record(FPROP, (X, scales, ACTIVATION))
    return q, scales


def _padded_groups(x: torch.Tensor, counts: list[int], multiple: int, fill: float = 0.0
                   ) -> torch.Tensor:
    """x's groups of counts[e] rows, each followed by `fill` rows up to a multiple of
    `multiple`: one copy (a cat) whatever the number of groups."""
    pads = [-c % multiple for c in counts]
    filler = x.new_full((max(pads), *x.shape[1:]), fill)
    return torch.cat([part for chunk, pad in zip(x.split(counts), pads)
                      for part in (chunk, filler[:pad])])


class FP8LocalExperts(_FP8Module, LocalExperts):
    """`token_multiple`: the multiple of rows per expert its GEMMs take without a copy
    (default: the backend's, `backends.ROW_MULTIPLE`; 4 for cuBLAS's block-scaled GEMM,
    whose `_cublas_aligned` otherwise pads A, and cuts the product, in every expert GEMM
    with a ragged count). The moe layer's dispatch lays each expert's rows out so
    (`dispatch(pad_to=)`, in the pass that groups them); tokens that come otherwise are
    padded here, one copy for all the GEMMs, and the padding rows cut off after fc2. Zero
    rows quantize to zero codes, give zero products and add nothing to Wgrad: results are
    unchanged."""

    # Megatron's names for an expert MLP's projections (its TEGroupedMLP and SequentialMLP).
    PROJECTIONS = ("linear_fc1", "linear_fc2")

    def __init__(self, *args, fp8_backend: str = "emulated", fp8_cache_weights: bool = False,
                 token_multiple: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_fp8(fp8_backend, fp8_cache_weights)
        self.token_multiple = (ROW_MULTIPLE[fp8_backend] if token_multiple is None
                               else token_multiple)
        if self.token_multiple < 1:
            raise ValueError(f"FP8LocalExperts: token_multiple must be >= 1; got "
                             f"{self.token_multiple}")

    def _flags(self, slot=("fc1", 0)) -> NonFiniteFlags:
        return self.fp8_non_finite[f"linear_{slot[0]}"]

    def forward(self, tokens: torch.Tensor, counts: list[int],
                tokens_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """fc1, SwiGLU and fc2 of every expert in FP8. 1x128 tiles run along one token's
        channels, so the layer quantizes all tokens at once, and all SwiGLU outputs at
        once, with each expert's own bits: one launch and one inf/NaN record (no wait on
        the GPU) per projection for the layer, not per expert. Dispatched FP8 tokens were
        checked by their sender."""
        quantizer = self.fp8_quantizer(tokens.device)
        given = counts
        if any(c % self.token_multiple for c in counts):
            tokens, tokens_fp8, counts = self._padded(tokens, tokens_fp8, counts)
        if tokens_fp8 is None:
            tokens_fp8 = _recorded_fp8(tokens, self._flags(("fc1", 0)), quantizer)
        h = FP8CachedSwiGLU.apply(torch.cat(self._project(tokens, tokens_fp8, counts,
                                                          self.weight1, "fc1", quantizer)),
                                  quantizer)
        outputs = self._project(h, _recorded_fp8(h, self._flags(("fc2", 0)), quantizer), counts,
                                self.weight2, "fc2", quantizer)
        outputs = [out[:c] for out, c in zip(outputs, given)]  # padding rows dropped
        return torch.cat(outputs) if outputs else tokens.new_zeros(0, tokens.shape[-1])

    def _padded(self, tokens, tokens_fp8, counts):
        """tokens (and their FP8 bytes and scales) with each expert's rows zero-padded to
        a multiple of `token_multiple`, and the padded counts. Padding scales are the
        quantizer's for an all-zero tile."""
        multiple = self.token_multiple
        if tokens_fp8 is not None:
            q, scales = tokens_fp8
            tokens_fp8 = (_padded_groups(q.view(torch.uint8), counts, multiple
                                         ).view(torch.float8_e4m3fn),
                          _padded_groups(scales, counts, multiple, SMALLEST_NORMAL_FP32))
        return (_padded_groups(tokens, counts, multiple), tokens_fp8,
                [c + -c % multiple for c in counts])

    def _project(self, x, x_fp8, counts, weights, name: str, quantizer: Quantizer
                 ) -> list[torch.Tensor]:
        """Each expert's rows of x times its weight, in FP8 (x_fp8: x's bytes and scales).

        One GEMM per expert: the pinned torch 2.13 has no grouped GEMM for these scalings.
        Its `torch._scaled_grouped_mm` (and `_scaled_grouped_mm_v2`, `F.scaled_grouped_mm`)
        takes FP8 with float32 scales only per row of A and per column of B (RowWise, sm90;
        `meta_scaled_grouped_mm` in torch/_meta_registrations.py) or MXFP8/FP4 (sm100),
        and writes only BF16 (aten/src/ATen/native/cuda/GroupedBlas.cpp,
        scale_grouped_kernel_dispatch); BlockWise1x128 and BlockWise128x128 exist for
        `_scaled_mm` alone."""
        return [fp8_linear(chunk, w, self.fp8_backend, (q, scales), self._held(w, (name, e)),
                           sink_for(self, weights, e), self._held_t(w, (name, e)),
                           self._flags((name, e)),
                           self._main_grad(weights, self.config.gradient_accumulation_fusion, e),
                           quantizer)
                for e, (chunk, q, scales, w) in enumerate(zip(
                    x.split(counts), x_fp8[0].split(counts), x_fp8[1].split(counts),
                    weights.unbind(0)))]


def fp8_census(model_chunks, excluded: list[str]) -> str:
    """The start-up line saying which linears run in FP8, by their place in a transformer
    layer (`self_attention.linear_kv_up_proj`, `mlp.experts`, ...) and how many layers have
    each, and which the exclusions keep in the training dtype."""
    from collections import Counter

    fp8, kept = Counter(), Counter()
    for chunk in model_chunks:
        for name, module in chunk.named_modules():
            place = name.split(".layers.", 1)[-1].partition(".")[2]  # after "layers.N."
            slots = set(place.split("."))
            if isinstance(module, _FP8Module):
                fp8[place] += 1
            elif (slots & set(excluded) and place.split(".")[-1] in EXCLUDABLE
                  and any(p.dim() >= 2 for p in module.parameters(recurse=False))):
                kept[place] += 1

    def listed(counts: Counter) -> str:
        return ", ".join(f"{place} x{n}" for place, n in sorted(counts.items())) or "none"

    line = f"fp8: linears in FP8: {listed(fp8)}"
    if excluded:
        line += f"; kept in the training dtype (--fp8-exclude-modules): {listed(kept)}"
    return line

