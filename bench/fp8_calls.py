"""Every call the GPU benchmarks make into plugins.fp8, in one place: the backend, the FP8
linear with its weight held (as a module with `--fp8-cache-weights` calls it), the
once-per-step weight quantization, and a recorder of the quantizations a linear makes as
it runs. When the plugin's API changes, these functions change, not the benchmarks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from functools import partial, wraps
from types import ModuleType

import torch


def backend() -> str:
    """The GEMM backend `--fp8-backend auto` picks here (`torch` on Hopper, `emulated` on
    the CPU)."""
    from plugins.fp8 import backends

    return backends.resolve("auto")


def weight_cache(flags=None):
    """An empty FP8 weight cache, as every FP8 module holds with --fp8-cache-weights: each
    new W's scales recorded in `flags` (`non_finite_flags()`, no wait on the GPU), or
    checked at once where None."""
    from plugins.fp8.non_finite import FPROP, WEIGHT
    from plugins.fp8.weight_cache import FP8WeightCache

    if flags is None:
        return FP8WeightCache()
    return FP8WeightCache(lambda slot, scales: flags.record(FPROP, (WEIGHT, scales, (128, 128))))


def non_finite_flags():
    """The device-side inf/NaN record an FP8 module owns per projection (read once per
    step by the plugin, never per call)."""
    from plugins.fp8.non_finite import NonFiniteFlags

    return NonFiniteFlags()


def quantize_weight_for_step(cache, weight: torch.Tensor) -> None:
    """What a step does once per weight: the cache dropped (new weights after the
    optimizer step), then W for Fprop and W^T for Dgrad quantized into it, as the first
    micro-batch's forward and backward ask for them."""
    cache.drop()
    cache.get(weight)
    cache.get_transposed(weight)


def fp8_linear_held(backend_name: str, cache, flags=None):
    """linear(x, w) with all three GEMMs in FP8 and the weight's FP8 copies taken from
    `cache` (W in forward, W^T in backward), as an FP8 module calls fp8_linear: inf/NaN
    recorded in `flags` (a module's `NonFiniteFlags`, no wait on the GPU) where given."""
    from plugins.fp8.linear import fp8_linear

    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, w, backend_name, weight_fp8=cache.get(w),
                          weight_fp8_t=partial(cache.get_transposed, w), non_finite=flags)

    return linear


def quantizing_modules() -> tuple[ModuleType, ...]:
    """The modules whose quantization calls the recorder sees: the linear's (per
    micro-batch) and the weight cache's (once per step)."""
    from plugins.fp8 import linear, weight_cache

    return linear, weight_cache


def _is_quantizer(name: str, value) -> bool:
    lower = name.lower()
    return (callable(value) and not isinstance(value, type) and "quantiz" in lower
            and "dequantiz" not in lower and not lower.startswith("raise"))


def _tensors(value) -> list[torch.Tensor]:
    """Every tensor in an argument or a result (tuples, lists, dicts, dataclasses)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in _tensors(getattr(value, f.name))]
    return []


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclasses.dataclass
class QuantizeCall:
    """One quantization as the linear called it: the function, the tensor it read, the
    bytes it read and wrote (each input read once, each output written once), and one
    time per recorded call."""
    phase: str      # "forward", "backward" or "step" (the set the caller is in)
    function: str
    reads: str      # dtype and shape of the largest input
    bytes: int
    marks: list     # (start, end) CUDA events, or seconds on the CPU

    def seconds(self) -> list[float]:
        return [m if isinstance(m, float) else m[0].elapsed_time(m[1]) / 1e3
                for m in self.marks]


class QuantizeRecorder:
    """Times every quantization call of `modules` (by default `quantizing_modules()`) as it
    happens, between CUDA events on the current stream (on the CPU, host clocks): the
    time of the call as the caller sees it on the device, its launches and any wait for
    the host included.

    Calls nest (a helper calling a quantizer): only the outermost is timed. Calls are
    matched across repetitions by their order within one `phase`."""

    def __init__(self, device: torch.device,
                 modules: tuple[ModuleType, ...] | None = None) -> None:
        self.cuda = device.type == "cuda"
        self.modules = quantizing_modules() if modules is None else modules
        self.phase = "forward"
        self.calls: dict[tuple[str, int], QuantizeCall] = {}
        self._order: dict[str, int] = {}
        self._depth = 0

    def start_round(self, phase: str = "forward") -> None:
        """A new repetition begins: calls are numbered from 0 again."""
        self.phase, self._order = phase, {}

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    def _wrap(self, name: str, fn):
        @wraps(fn)
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            try:
                if self.cuda:
                    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                    start.record()
                    out = fn(*args, **kwargs)
                    end.record()
                    mark = (start, end)
                else:
                    began = time.perf_counter()
                    out = fn(*args, **kwargs)
                    mark = time.perf_counter() - began
            finally:
                self._depth -= 1
            index = self._order.get(self.phase, 0)
            self._order[self.phase] = index + 1
            key = (self.phase, index)
            if key not in self.calls:
                inputs = _tensors((args, kwargs))
                largest = max(inputs, key=lambda t: t.numel(), default=None)
                reads = ("-" if largest is None else
                         f"{str(largest.dtype).removeprefix('torch.')}{list(largest.shape)}")
                self.calls[key] = QuantizeCall(self.phase, name, reads,
                                               _nbytes(inputs) + _nbytes(_tensors(out)), [])
            self.calls[key].marks.append(mark)
            return out
        return timed

    @contextlib.contextmanager
    def installed(self):
        """Every quantizer of the modules replaced by its timed version: each function
        whose name says it quantizes (not dequantizes)."""
        replaced = []
        try:
            for module in self.modules:
                for name, value in list(vars(module).items()):
                    if _is_quantizer(name, value):
                        setattr(module, name, self._wrap(name, value))
                        replaced.append((module, name, value))
            yield self
        finally:
            for module, name, value in replaced:
                setattr(module, name, value)

    def summary(self) -> list[dict]:
        """Per call, in order: phase, function, what it read, bytes, seconds per call."""
        return [{"phase": c.phase, "function": c.function, "reads": c.reads,
                 "bytes": c.bytes, "times_s": c.seconds()} for c in self.calls.values()]
