"""Per-step statistics that a module adds up over the step's micro-batches (e.g. tokens
per expert, for auxiliary-loss-free balancing), declared by buffer name.

A pipeline schedule that runs one stage on several ranks, each on its share of the
micro-batches (DualPipe), sums the declared buffers between the copies, so that every
copy sees the step's whole count, as it sees the step's whole gradient. (Declared by name
on the module, not marked on the tensor: moving a module to a device replaces its
buffers' tensors.)
"""

from __future__ import annotations

import torch

_DECLARED = "megaseek_step_statistics"


def declare_step_statistic(module: torch.nn.Module, buffer_name: str) -> None:
    """`module.<buffer_name>` adds up each micro-batch's count until the optimizer step."""
    names = getattr(module, _DECLARED, ())
    object.__setattr__(module, _DECLARED, (*names, buffer_name))


def step_statistics(module: torch.nn.Module) -> list[torch.Tensor]:
    """The declared buffers of `module` and its submodules, in module order."""
    return [getattr(sub, name) for sub in module.modules()
            for name in getattr(sub, _DECLARED, ())]
