"""Megatron's modules as the fixes and seams of `upstream/` reach them.

Every fix and seam names the Megatron module it changes or probes and imports it when it
is applied or probed, never when `upstream/` is imported: importing `upstream` (e.g. for
`megaseek fixes`, or from `import integration`) then costs no Megatron import, and a
module that needs a fix of `upstream.compat` in place first is imported after it.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def megatron_module(name: str) -> ModuleType:
    """The module `name` (e.g. "megatron.training.arguments"), imported now."""
    return importlib.import_module(name)


def megatron_training() -> ModuleType:
    """megatron.training.training: the training loop most seams attach to."""
    return megatron_module("megatron.training.training")


def megatron_checkpointing() -> ModuleType:
    """megatron.training.checkpointing: where checkpoints are saved and loaded."""
    return megatron_module("megatron.training.checkpointing")


def megatron_arguments() -> ModuleType:
    """megatron.training.arguments: Megatron's parser and its validation."""
    return megatron_module("megatron.training.arguments")
