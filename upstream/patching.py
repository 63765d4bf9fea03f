"""Narrow, reversible fixes of upstream code, each tied to the upstream lines it addresses.

A `Fix` says which upstream file and version it concerns, why it exists, when it applies
(its `Scope`: every machine, CPU only, a plugin on, a flag given), how to tell that the
upstream code still needs it (`still_needed`), and how to apply it. `Patcher` records
every attribute a fix replaces so that `undo()` puts the originals back (tests rely on it).
Every fix of the project is listed by `upstream.registry.all_fixes()`.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable


@dataclass(frozen=True)
class Scope:
    """When a fix applies: in words (`megaseek fixes`) and as a condition on Megatron's
    parsed arguments. Machine scopes (every machine, CPU only) hold before the arguments
    are parsed too (`args` None); a scope that reads flags does not hold without them."""

    label: str  # e.g. "CPU only", "plugin fp8, with --num-experts"
    holds: Callable[[argparse.Namespace | None], bool]


EVERY_MACHINE = Scope("every machine", lambda args: True)


def plugin_scope(name: str, when: str = "",
                 condition: Callable[[Any], bool] = lambda config: True) -> Scope:
    """The scope of a fix that plugin `name` offers from its `fixes` hook: the plugin object
    that returns it scopes it (no name is matched); it holds for that plugin's run config
    where `condition(config)` holds (`when` says it, `name` labels it in `megaseek
    fixes`). The config holds the Megatron arguments the condition reads, by their names."""
    return Scope(f"plugin {name}" + (f", with {when}" if when else ""),
                 lambda config: config is not None and bool(condition(config)))


@dataclass(frozen=True)
class Fix:
    name: str
    upstream: str  # file:line and version, e.g. "megatron/core/... .py:303 (megatron-core 0.19.2)"
    reason: str
    # True while the installed upstream code has the problem; a fix that rewrites upstream
    # code also reads False once applied, so that applying it twice changes nothing.
    still_needed: Callable[[], bool]
    apply: Callable[["Patcher"], None]
    scope: Scope

    def applies(self, args: argparse.Namespace | None) -> bool:
        return self.scope.holds(args)


def applicable(fixes: Iterable[Fix], args: argparse.Namespace | None) -> list[Fix]:
    """The fixes whose scope holds for `args` (a plugin's `fixes` hook returns these)."""
    return [fix for fix in fixes if fix.applies(args)]


def apply_fixes(fixes: Iterable[Fix], patcher: "Patcher") -> "Patcher":
    """Applies each fix the installed upstream code still needs; returns `patcher`."""
    for fix in fixes:
        if fix.still_needed():
            fix.apply(patcher)
    return patcher


def patches_nothing(patcher: "Patcher") -> None:
    """`apply` of a fix recorded for its probe only: the workaround is megaseek's own code
    (its reason says where), and nothing of upstream is changed."""


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

    @contextlib.contextmanager
    def scoped(self, owner: Any, name: str, value: Any):
        """`owner.name = value` inside the block only."""
        old = vars(owner)[name]
        setattr(owner, name, value)
        try:
            yield
        finally:
            setattr(owner, name, old)

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
    """The source of `obj` as it runs now: upstream's, or the text of our rewrite of it."""
    func = inspect.unwrap(obj)
    rewritten = getattr(func, "__megaseek_source__", None)
    return rewritten if rewritten is not None else inspect.getsource(func)


def source_has(obj: Any, *needles: str) -> bool:
    """True when every needle still stands in the source of `obj` as it runs now. A fix
    probes for the upstream text it replaces, so the probe reads False once the fix is
    applied, and stays True while only another fix has rewritten the same function."""
    text = source_of(obj)
    return all(n in text for n in needles)


def rewrite_function(owner: Any, name: str, replacements: dict[str, str]) -> Any:
    """Recompiles `owner.name` from its upstream source with exact text replacements.

    Used where a check is written into a function body (a `.type()` string, a `.cuda()`
    call) and nothing short of its text can change it. Every replacement must match, so a
    changed upstream function fails loudly here instead of being patched half-way. A
    function rewritten before is rewritten again from that rewrite's text, so two fixes of
    one function compose.
    """
    original = vars(owner)[name] if name in vars(owner) else getattr(owner, name)
    func = original.__func__ if isinstance(original, (staticmethod, classmethod)) else original
    text = source_of(func)
    for old, new in replacements.items():
        if old not in text:
            raise RuntimeError(f"{func.__module__}.{func.__qualname__}: {old!r} not found; "
                               "the upstream code changed, review this fix")
        text = text.replace(old, new)
    rewritten = text
    # A method keeps its indentation (re-indenting would change multi-line strings) and is
    # compiled inside a factory that gives it the `__class__` cell zero-argument super()
    # needs; a top-level function compiles as it is.
    nested = text[:1].isspace()
    if nested:
        text = f"def _factory(__class__):\n{text}\n    return {func.__name__}\n"
    # Compiled under the upstream file's name and line numbers, so that a traceback through
    # the rewrite points into upstream's source (a replacement of other length shifts the
    # lines after it).
    code = func.__code__
    text = "\n" * (code.co_firstlineno - 1 - int(nested)) + text
    namespace: dict[str, Any] = {}
    exec(compile(text, code.co_filename, "exec"), func.__globals__, namespace)
    new = (namespace["_factory"](owner if isinstance(owner, type) else None) if nested
           else namespace[func.__name__])
    if isinstance(original, (staticmethod, classmethod)) and not isinstance(new, type(original)):
        new = type(original)(new)
    (new.__func__ if isinstance(new, (staticmethod, classmethod)) else new).__megaseek_source__ = rewritten
    return new
