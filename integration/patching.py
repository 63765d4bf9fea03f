"""Narrow, reversible fixes of upstream code, each tied to the upstream lines it addresses.

A `Fix` says which upstream file and version it concerns, why it exists, how to tell that
the upstream code still needs it (`still_needed`), and how to apply it. `Patcher` records
every attribute a fix replaces so that `undo()` puts the originals back (tests rely on it).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Fix:
    name: str
    upstream: str  # file:line and version, e.g. "megatron/core/... .py:303 (megatron-core 0.19.2)"
    reason: str
    still_needed: Callable[[], bool]  # False once upstream no longer has the problem
    apply: Callable[["Patcher"], None]


class Patcher:
    """Replaces attributes and remembers the originals, so that every change can be undone."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def setattr(self, owner: Any, name: str, value: Any) -> None:
        if name in vars(owner):
            old = vars(owner)[name]
            self._undo.append(lambda: setattr(owner, name, old))
        else:
            self._undo.append(lambda: delattr(owner, name))
        setattr(owner, name, value)

    def add_log_filter(self, logger: logging.Logger, log_filter: Callable) -> None:
        logger.addFilter(log_filter)
        self._undo.append(lambda: logger.removeFilter(log_filter))

    @property
    def changes(self) -> int:
        return len(self._undo)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def source_of(obj: Any) -> str:
    return inspect.getsource(inspect.unwrap(obj))


def source_has(obj: Any, *needles: str) -> bool:
    """True when every needle still stands in the upstream source of `obj` (False once
    `obj` is our rewrite of it, so that applying fixes twice changes nothing)."""
    if getattr(inspect.unwrap(obj), "__megaseek_rewrite__", False):
        return False
    text = source_of(obj)
    return all(n in text for n in needles)


def rewrite_function(owner: Any, name: str, replacements: dict[str, str]) -> Any:
    """Recompiles `owner.name` from its upstream source with exact text replacements.

    Used where a check is written into a function body (a `.type()` string, a `.cuda()`
    call) and nothing short of its text can change it. Every replacement must match, so a
    changed upstream function fails loudly here instead of being patched half-way.
    """
    original = vars(owner)[name] if name in vars(owner) else getattr(owner, name)
    func = original.__func__ if isinstance(original, (staticmethod, classmethod)) else original
    text = source_of(func)
    for old, new in replacements.items():
        if old not in text:
            raise RuntimeError(f"{func.__module__}.{func.__qualname__}: {old!r} not found; "
                               "the upstream code changed, review this fix")
        text = text.replace(old, new)
    # A method keeps its indentation (re-indenting would change multi-line strings) and is
    # compiled inside a factory that gives it the `__class__` cell zero-argument super()
    # needs; a top-level function compiles as it is.
    nested = text[:1].isspace()
    if nested:
        text = f"def _factory(__class__):\n{text}\n    return {func.__name__}\n"
    namespace: dict[str, Any] = {}
    exec(compile(text, f"<megaseek fix of {func.__module__}.{func.__qualname__}>", "exec"),
         func.__globals__, namespace)
    new = (namespace["_factory"](owner if isinstance(owner, type) else None) if nested
           else namespace[func.__name__])
    if isinstance(original, (staticmethod, classmethod)) and not isinstance(new, type(original)):
        new = type(original)(new)
    (new.__func__ if isinstance(new, (staticmethod, classmethod)) else new).__megaseek_rewrite__ = True
    return new
