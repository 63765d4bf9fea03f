"""Patch-and-undo for tests: upstream changes that last as long as a block (or a test).

Tests use the `patcher` fixture (tests/conftest.py); code that runs outside a test function,
such as a rank's body under `run_ranks` or a helper that builds a model, uses `patching(...)`.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

from upstream.patching import Fix, Patcher, apply_fixes


@contextlib.contextmanager
def patching(fixes: Iterable[Fix] = ()) -> Iterator[Patcher]:
    """A `Patcher` with `fixes` applied where the installed upstream code still needs them;
    every change it records (those made inside the block included) is undone when the block
    ends, however it ends."""
    patcher = apply_fixes(fixes, Patcher())
    try:
        yield patcher
    finally:
        patcher.undo()


def plugin_fixes(plugins) -> list[Fix]:
    """The fixes the enabled `plugins` offer from their `fixes` hook, in registry order (what
    the launch path applies for them)."""
    return [fix for plugin in plugins if plugin.fixes is not None for fix in plugin.fixes()]
