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
