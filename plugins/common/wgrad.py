"""Deferred weight gradients: the W of a zero-bubble schedule's split backward.

With Megatron's `config.delay_wgrad_compute` (`--delay-wgrad-compute`) every linear of a
transformer layer computes only its input gradient in backward (B) and leaves the weight
gradient's GEMM, with the tensors it needs, in its own `deferred_wgrads` store; the
schedule takes them and runs them later, in its W cell:

    run_w = take_deferred_weight_gradients(model_chunk)   # right after a backward
    ...
    run_w()                                               # where the schedule puts W

Each deferred GEMM adds its result where Megatron's DDP would have put it: into
`param.main_grad` (DDP's grad-accumulator hook moves `param.grad` there), else into
`param.grad` as autograd's AccumulateGrad does. The same GEMM on the same tensors, and the
same addition into the same buffer, so the gradients are bit-equal to the undeferred ones
when the W's run in the order of their backwards.

The store is module state, not a global or a thread-local: autograd runs CUDA backward
functions on a device thread, which sees only what the autograd ctx carries.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from plugins.common.wgrad_checks import DELAY_FLAG, check_deferral  # noqa: F401


class WeightGradientStore:
    """One module's deferred weight-gradient computations, oldest first."""

    def __init__(self) -> None:
        # (deferral time, param, index into param or None, computation of the gradient)
        self._pending: list[tuple[int, torch.nn.Parameter, int | None, Callable]] = []

    def sink(self, param: torch.nn.Parameter, index: int | None = None) -> "WgradSink":
        """Where a backward hands the gradient of `param` (of `param[index]`: one expert's
        weight in a stacked parameter)."""
        return WgradSink(self, param, index)

    def defer(self, param, index, compute: Callable[[], torch.Tensor]) -> None:
        # The clock orders deferrals across modules for `take`; within one module the list
        # order is what makes accumulation bit-equal, and that is kept exactly.
        self._pending.append((time.monotonic_ns(), param, index, compute))

    def take(self) -> list:
        pending, self._pending = self._pending, []
        return pending

    def __len__(self) -> int:
        return len(self._pending)


@dataclass(frozen=True)
class WgradSink:
    """What a deferring autograd function carries in its ctx: its weight and store."""

    store: WeightGradientStore
    param: torch.nn.Parameter
    index: int | None = None

    def defer(self, compute: Callable[[], torch.Tensor]) -> None:
        """Keep `compute` (returns the weight gradient) for the W; backward returns None
        for the weight."""
        self.store.defer(self.param, self.index, compute)


def wgrad_store(config) -> WeightGradientStore | None:
    """The store of a module built from `config`: one when `delay_wgrad_compute` is on,
    else None, and the module runs exactly as without this file."""
    return WeightGradientStore() if getattr(config, "delay_wgrad_compute", False) else None


def sink_for(module, param: torch.nn.Parameter, index: int | None = None) -> WgradSink | None:
    """The sink a module's forward hands its autograd function, or None (compute now):
    deferral off, no gradient wanted, or no backward to come (grad mode off)."""
    store = getattr(module, "deferred_wgrads", None)
    if store is None or not param.requires_grad or not torch.is_grad_enabled():
        return None
    return store.sink(param, index)


def accumulate_weight_gradient(param: torch.nn.Parameter, grad: torch.Tensor,
                               index: int | None = None) -> None:
    """Adds `grad` where the undeferred backward would have ended up: `main_grad` (what
    DDP's hook does with `param.grad`; with `grad_added_to_main_grad` unset, as the hook
    leaves it for non-fused wgrads), else `param.grad`, as AccumulateGrad does."""
    with torch.no_grad():
        if hasattr(param, "main_grad"):
            target = param.main_grad
        else:
            if param.grad is None:
                if index is None:
                    param.grad = grad
                    return
                param.grad = torch.zeros_like(param)
            target = param.grad
        (target if index is None else target[index]).add_(grad)


def deferred_in(model_chunk: torch.nn.Module) -> list[WeightGradientStore]:
    """The stores of every module of a model chunk (DDP-wrapped or not) that defers."""
    return [store for module in model_chunk.modules()
            if (store := getattr(module, "deferred_wgrads", None)) is not None]


def take_deferred_weight_gradients(model_chunk: torch.nn.Module) -> Callable[[], None]:
    """Removes every weight-gradient computation that modules of `model_chunk` deferred
    since the last take, and returns one callable that runs them, in the order they were
    deferred, accumulating each as `accumulate_weight_gradient` does. With nothing deferred
    (deferral off) the callable does nothing."""
    check_deferral(model_chunk)
    pending = deque(heapq.merge(*(store.take() for store in deferred_in(model_chunk)),
                                key=lambda entry: entry[0]))

    def run() -> None:
        while pending:  # popped as they run, so each one's tensors are freed after it
            _, param, index, compute = pending.popleft()
            accumulate_weight_gradient(param, compute(), index)

    return run
