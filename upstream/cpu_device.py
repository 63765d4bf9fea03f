"""What an upstream module sees as `torch` when the CPU stands in for its CUDA device.

`CpuTorch` is installed as the global name `torch` of chosen Megatron modules only (see
`upstream.cpu`). It forwards every attribute to the real torch, except:
- `torch.cuda`, which becomes `CpuCuda`: the CPU is the rank's one device, streams and
  events are no-ops (CPU work is synchronous), the device RNG is the CPU generator;
- tensor factories called with a CUDA device, which allocate on the CPU instead.
Nothing else in the process changes, so user code keeps the real `torch.cuda`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

CPU = torch.device("cpu")


def cpu_if_cuda(device: Any) -> Any:
    """Maps a CUDA device argument (string, device or bare index) to the CPU."""
    if device is None:
        return None
    if isinstance(device, int):  # a bare index means a CUDA device to torch
        return CPU
    if torch.device(device).type == "cuda":
        return CPU
    return device


class NullEvent:
    """A CUDA event on a device whose work completes before the call returns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "NullEvent") -> float:
        return 0.0


class NullStream:
    """A CUDA stream on the CPU: work is issued in order and finishes at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> NullEvent:
        return event if event is not None else NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> "NullStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


class CpuNvtx:
    range_push = staticmethod(_no_op)
    range_pop = staticmethod(_no_op)
    mark = staticmethod(_no_op)

    @staticmethod
    def range(*args: Any, **kwargs: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class CpuCuda:
    """`torch.cuda` as seen by a patched module: one device, the CPU."""

    Event = NullEvent
    Stream = NullStream
    nvtx = CpuNvtx

    @staticmethod
    def current_device() -> torch.device:
        return CPU

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_stream(device: Any = None) -> NullStream:
        return NullStream()

    default_stream = current_stream

    @staticmethod
    def stream(stream: Any = None) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    synchronize = staticmethod(_no_op)
    empty_cache = staticmethod(_no_op)
    set_device = staticmethod(_no_op)
    reset_peak_memory_stats = staticmethod(_no_op)

    # The device generator is the CPU's default generator: dropout on CPU draws from it.
    get_rng_state = staticmethod(lambda device=None: torch.get_rng_state())
    set_rng_state = staticmethod(lambda state, device=None: torch.set_rng_state(state))
    manual_seed = staticmethod(lambda seed: torch.manual_seed(seed))

    @staticmethod
    def is_current_stream_capturing() -> bool:
        return False

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return 0

    max_memory_allocated = memory_allocated
    memory_reserved = memory_allocated
    max_memory_reserved = memory_allocated

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


_FACTORIES = ("tensor", "as_tensor", "empty", "zeros", "ones", "full", "arange", "rand",
              "randn", "randint", "empty_like", "zeros_like", "ones_like", "full_like")


def _on_cpu(factory: Any) -> Any:
    @functools.wraps(factory)
    def make(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = cpu_if_cuda(kwargs["device"])
        return factory(*args, **kwargs)

    return make


class CpuTorch:
    """The `torch` module with `torch.cuda` and CUDA-device factories mapped to the CPU."""

    cuda = CpuCuda()

    def __init__(self) -> None:
        for name in _FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)
