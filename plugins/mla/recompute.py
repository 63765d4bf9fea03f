"""Selective recomputation through saved-tensor hooks: chosen outputs are not kept for
backward but recomputed from their (smaller, already kept) inputs.

While a `SelectiveRecompute` is entered, every output of a tracked call is remembered
(by its storage). When autograd then saves a tensor that lives in such an output (the
RMSNorm output a linear saves as its input; the query, key and value attention saves),
the pack hook keeps a recipe instead of the tensor: the call, its inputs and the view's
geometry. In backward the first unpack reruns the call under `no_grad` (the same ops on
the same inputs: bit-identical values) and every saved view is cut from the result.

This needs no storage-sharing extension and no Transformer Engine, and it composes:
the normalized latent inside a recomputed up-projection is recomputed too.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

Ledger = Callable[[torch.Tensor, bool], None]  # (saved tensor, recomputed?) per pack


def _tensors(output: Any) -> list[torch.Tensor]:
    items = output if isinstance(output, (tuple, list)) else (output,)
    return [t for t in items if isinstance(t, torch.Tensor)]


class _Call:
    """One tracked call; computes its outputs again on the first unpack, frees them after
    the last."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.pending = 0
        self.outputs: list[torch.Tensor] | None = None

    def unpack(self, index: int) -> torch.Tensor:
        if self.outputs is None:
            with torch.no_grad():
                self.outputs = _tensors(self.fn(*self.args, **self.kwargs))
        output = self.outputs[index]
        self.pending -= 1
        if self.pending == 0:  # every saved view is back: free the recomputed results
            self.outputs = None
        return output


class _Recipe:
    def __init__(self, call: _Call, index: int, saved: torch.Tensor) -> None:
        self.call, self.index = call, index
        self.size, self.stride, self.offset = saved.size(), saved.stride(), saved.storage_offset()
        call.pending += 1

    def unpack(self) -> torch.Tensor:
        return self.call.unpack(self.index).as_strided(self.size, self.stride, self.offset)


class SelectiveRecompute:
    """Use as a context around a forward pass; `track` modules or `run` calls inside it."""

    def __init__(self, ledger: Ledger | None = None) -> None:
        self.ledger = ledger
        self._outputs: dict[int, tuple[_Call, int, torch.Tensor]] = {}  # storage -> output
        self._active = False

    def track(self, modules: Iterable[torch.nn.Module]) -> None:
        """The outputs of these modules' forward calls will be recomputed."""
        for module in modules:
            module.register_forward_hook(self._remember_module_call, with_kwargs=True)

    def run(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Calls fn; inside the context its outputs will be recomputed."""
        output = fn(*args, **kwargs)
        if self._active:
            self._remember(_Call(fn, args, kwargs), output)
        return output

    def _remember_module_call(self, module, args, kwargs, output) -> None:
        if self._active:
            self._remember(_Call(module, args, kwargs), output)

    def _remember(self, call: _Call, output: Any) -> None:
        for index, tensor in enumerate(_tensors(output)):
            self._outputs[tensor.untyped_storage().data_ptr()] = (call, index, tensor)

    def _pack(self, saved: torch.Tensor) -> Any:
        found = self._outputs.get(saved.untyped_storage().data_ptr()) if saved.numel() else None
        if self.ledger is not None:
            self.ledger(saved, found is not None)
        return saved if found is None else _Recipe(found[0], found[1], saved)

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        return packed.unpack() if isinstance(packed, _Recipe) else packed

    def __enter__(self) -> "SelectiveRecompute":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._active = False
        self._outputs.clear()  # recipes keep what they need; outputs may now be freed
        self._hooks.__exit__(*exc)
