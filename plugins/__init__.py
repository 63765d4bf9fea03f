"""megaseek's plugins and the one registry that turns them on.

A `Plugin` names itself, adds its own flags (through Megatron's `extra_args_provider`),
validates the parsed arguments, and offers hooks: a transform of the transformer layer
spec, a pipeline schedule, and a callback after each optimizer step. It claims the
*slots* it replaces (e.g. "self_attention", "schedule"); two enabled plugins may not
claim the same slot.

Nothing activates because it is installed: a plugin runs only when named in
`--plugins NAME [NAME ...]`. Megatron's own flags configure what Megatron already names;
a plugin's flags are only for what Megatron lacks, and giving one without enabling its
plugin is an error at start-up.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Iterable

PLUGINS_FLAG = "--plugins"


class PluginError(ValueError):
    """A plugin configuration that cannot work; the message names the flags to change."""


@dataclass(frozen=True)
class Plugin:
    name: str
    summary: str
    add_arguments: Callable[[argparse._ArgumentGroup], None] | None = None
    validate: Callable[[argparse.Namespace], None] | None = None
    # (layer_spec, args) -> layer_spec; applied to Megatron's GPT layer spec in order.
    transform_layer_spec: Callable[[Any, argparse.Namespace], Any] | None = None
    # args -> a Megatron forward-backward function (same keyword interface).
    schedule: Callable[[argparse.Namespace], Callable[..., Any]] | None = None
    # (args, model_chunks, optimizer) -> a callable run after every successful step.
    on_optimizer_step: Callable[[argparse.Namespace, list, Any], Callable[[], None]] | None = None
    # (args, patcher) -> None: upstream changes the plugin needs for this run, made before
    # Megatron builds its configs (each one names the upstream lines it changes).
    install: Callable[[argparse.Namespace, Any], None] | None = None
    slots: frozenset[str] = frozenset()


class _Unset:
    """Default of every plugin flag at parse time, so that 'given' is told from 'default'."""

    def __repr__(self) -> str:
        return "<unset>"


@dataclass(frozen=True)
class _FlagInfo:
    plugin: str
    option: str  # e.g. "--ema-decay"
    default: Any


class PluginRegistry:
    def __init__(self, plugins: Iterable[Plugin] = ()) -> None:
        self._plugins: dict[str, Plugin] = {}
        self._flags: dict[str, _FlagInfo] = {}  # argparse dest -> owner
        self._unset = _Unset()
        for plugin in plugins:
            self.register(plugin)

    def register(self, plugin: Plugin) -> None:
        if plugin.name in self._plugins:
            raise PluginError(f"plugin {plugin.name!r} is registered twice")
        self._plugins[plugin.name] = plugin

    @property
    def names(self) -> list[str]:
        return sorted(self._plugins)

    def add_arguments(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Megatron `extra_args_provider`: `--plugins` plus every registered plugin's flags."""
        group = parser.add_argument_group("megaseek plugins")
        group.add_argument(PLUGINS_FLAG, nargs="+", default=[], metavar="NAME",
                           help=f"plugins to enable; available: {', '.join(self.names) or 'none'}")
        for plugin in self._plugins.values():
            if plugin.add_arguments is None:
                continue
            before = {id(a) for a in parser._actions}
            try:
                plugin.add_arguments(parser.add_argument_group(f"megaseek plugin {plugin.name}"))
            except argparse.ArgumentError as clash:
                raise PluginError(f"plugin {plugin.name!r} adds a flag that Megatron or another "
                                  f"plugin already defines: {clash}") from clash
            for action in parser._actions:
                if id(action) in before:
                    continue
                # Megatron may build its parser more than once; only another plugin's
                # claim on the same flag is a conflict.
                if action.dest in self._flags and self._flags[action.dest].plugin != plugin.name:
                    other = self._flags[action.dest].plugin
                    raise PluginError(f"plugins {other!r} and {plugin.name!r} both define "
                                      f"{action.option_strings[0]}")
                if action.default is not self._unset:
                    self._flags[action.dest] = _FlagInfo(plugin.name, action.option_strings[0],
                                                        action.default)
                action.default = self._unset
        return parser

    def enabled(self, args: argparse.Namespace) -> list[Plugin]:
        """Checks `--plugins` and the plugin flags in `args`, fills in defaults, runs each
        enabled plugin's validation, and returns the enabled plugins in command-line order."""
        requested = list(getattr(args, "plugins", []) or [])
        unknown = [name for name in requested if name not in self._plugins]
        if unknown:
            raise PluginError(f"{PLUGINS_FLAG}: unknown plugin(s) {', '.join(unknown)}; "
                              f"available: {', '.join(self.names) or 'none'}")
        duplicates = sorted({n for n in requested if requested.count(n) > 1})
        if duplicates:
            raise PluginError(f"{PLUGINS_FLAG}: {', '.join(duplicates)} named more than once")
        chosen = [self._plugins[name] for name in requested]

        orphans = []
        defaulted = set(getattr(args, "plugin_flags_defaulted", ()))
        for dest, info in self._flags.items():
            value = getattr(args, dest, self._unset)
            if value is self._unset:
                setattr(args, dest, info.default)
                defaulted.add(dest)
            elif info.plugin not in requested and dest not in defaulted:
                orphans.append(f"{info.option} needs '{PLUGINS_FLAG} {info.plugin}'")
        args.plugin_flags_defaulted = sorted(defaulted)  # so that a second check agrees
        if orphans:
            raise PluginError("plugin flags given without their plugin: " + "; ".join(orphans))

        claimed: dict[str, str] = {}
        for plugin in chosen:
            for slot in sorted(plugin.slots):
                if slot in claimed:
                    raise PluginError(
                        f"{PLUGINS_FLAG}: plugins {claimed[slot]!r} and {plugin.name!r} both "
                        f"replace {slot!r}; enable only one of them")
                claimed[slot] = plugin.name

        for plugin in chosen:
            if plugin.validate is not None:
                plugin.validate(args)
        return chosen


def builtin_plugins() -> list[Plugin]:
    """The plugins megaseek ships. Each plugin package adds itself here once it works."""
    from plugins.fp8.plugin import FP8
    from plugins.mla.plugin import MLA
    from plugins.moe.plugin import MOE

    return [MLA, MOE, FP8]


def default_registry() -> PluginRegistry:
    return PluginRegistry(builtin_plugins())
