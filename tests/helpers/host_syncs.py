"""Count the calls that make the host wait for the device (each a sync on a GPU)."""

from __future__ import annotations

import contextlib

import torch

SYNCS = ("tolist", "item", "__bool__", "__int__", "__float__", "nonzero")


@contextlib.contextmanager
def host_syncs():
    """Yields a list that collects the name of every syncing Tensor method called inside
    the block (`torch.nonzero(t)` and the like are not seen: call them as methods)."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def counted(name):
        def call(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)
        return call

    for name in SYNCS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


# aten ops whose result the host must read from the device (on a GPU, each waits for it):
# a Python scalar (`item`, `bool(t)`, comparisons of whole tensors) or an output shape
# that depends on the values.
WAITING_OPS = ("_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero",
               "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
               "unique_dim", "repeat_interleave")


class _WaitingOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        # repeat_interleave waits only without output_size (which fixes the shape).
        if name in WAITING_OPS and not (name == "repeat_interleave"
                                        and kwargs.get("output_size") is not None):
            self.calls.append(f"aten::{name}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def device_waits():
    """Yields a list that collects every host synchronization inside the block: the aten
    ops of `WAITING_OPS` as the dispatcher sees them (whoever calls them: `bool(t)`,
    `t.item()`, `torch.nonzero`, ...) and the Tensor methods of `SYNCS` (`tolist` reads a
    CPU tensor's memory without dispatching an op). Backward passes run inside the block
    are seen too (the CPU autograd engine runs them on this thread)."""
    with host_syncs() as methods:
        ops: list[str] = []
        with _WaitingOps(ops):
            yield ops
        ops.extend(m for m in methods if m == "tolist")
