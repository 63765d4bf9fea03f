"""Megatron flags that a plugin's modules do not read, refused by name at start-up."""

from __future__ import annotations

import argparse
from typing import Any, Iterable

# (argparse dest, flag, the values the plugin honours (Megatron's default first), why any
# other value is refused)
Refusal = tuple[str, str, tuple[Any, ...], str]


def recompute_granularity(args) -> str | None:
    """--recompute-granularity as Megatron's validation sets it: --recompute-activations
    is its spelling of 'selective' (arguments.py:589). The run plan is made before."""
    if getattr(args, "recompute_activations", False):
        return "selective"
    return getattr(args, "recompute_granularity", None)


def first_refused(args: argparse.Namespace, refusals: Iterable[Refusal]) -> str | None:
    """The error message for the first flag given a value the plugin does not honour
    (flags another enabled plugin implements, `Plugin.honours`, are that plugin's: the
    start-up check's `plugins.StartUpArguments` says which)."""
    elsewhere = getattr(args, "honoured_by_plugins", frozenset())
    for dest, flag, honoured, why in refusals:
        if dest in elsewhere:
            continue
        value = getattr(args, dest)
        if value not in honoured:
            shown = getattr(value, "name", value)  # an enum's value as its flag spells it
            given = flag if isinstance(value, bool) else f"{flag} {shown}"
            return f"{given} is not supported: {why}"
    return None
