"""Parse a Megatron command line with megaseek's plugins, as the launch path does."""

from __future__ import annotations

import sys

import integration  # noqa: F401  (megatron.training on Python 3.11)
from plugins import default_registry


def enabled(argv: list[str], monkeypatch):
    """(args, enabled plugins) for `argv`; raises PluginError where start-up would."""
    from megatron.training.arguments import parse_args

    registry = default_registry()
    monkeypatch.setattr(sys, "argv", ["pretrain", *argv])
    args = parse_args(extra_args_provider=registry.add_arguments)
    return args, registry.enabled(args)
