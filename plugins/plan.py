"""The run plan: what one run enables, resolved once from its command line
(`plugins.PluginRegistry.plan`) before Megatron validates it, and the enabled plugins'
hooks bound to their configs."""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from plugins.common.errors import PluginError

if TYPE_CHECKING:
    from plugins import Plugin

PLUGINS_FLAG = "--plugins"


class StartUpArguments:
    """Megatron's parsed arguments as a plugin's start-up check reads them: read only (a
    plugin states what Megatron must run with in its `overrides`), with the Megatron flags
    that the enabled plugins implement themselves (`Plugin.honours`)."""

    def __init__(self, args: argparse.Namespace, honoured_by_plugins: frozenset[str]) -> None:
        object.__setattr__(self, "_args", args)
        object.__setattr__(self, "honoured_by_plugins", honoured_by_plugins)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._args, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError(f"a plugin's check may not set Megatron's argument {name!r}: declare "
                        "it in the plugin's overrides")

    __delattr__ = __setattr__


def _bound(hook: Callable | None, first: Any) -> Callable | None:
    return None if hook is None else functools.partial(hook, first)


@dataclass(frozen=True)
class Enabled:
    """An enabled plugin and its config for the run; its hooks bound to that config."""

    plugin: Plugin
    config: Any

    @property
    def name(self) -> str:
        return self.plugin.name

    @property
    def fixes(self) -> Callable[[], Iterable[Any]] | None:
        return _bound(self.plugin.fixes, self.config)

    @property
    def transform_layer_spec(self) -> Callable[[Any], Any] | None:
        return _bound(self.plugin.transform_layer_spec, self.config)

    @property
    def schedule(self) -> Callable[[], Callable[..., Any]] | None:
        return _bound(self.plugin.schedule, self.config)

    @property
    def placement(self) -> Callable[[], Any] | None:
        return _bound(self.plugin.placement, self.config)

    def run_hooks(self) -> "RunHooks":
        """The run-time hooks for one run, each bound to the config (or to the state the
        plugin makes for the run, `Plugin.run_state`)."""
        plugin = self.plugin
        first = self.config if plugin.run_state is None else plugin.run_state(self.config)
        return RunHooks(self.name, *(_bound(hook, first) for hook in (
            plugin.before_gradient_checks, plugin.on_optimizer_step, plugin.on_training_end,
            plugin.checkpoint_state, plugin.evaluation)))


@dataclass(frozen=True)
class RunHooks:
    """One enabled plugin's run-time hooks, bound (see `Plugin` for each)."""

    name: str
    before_gradient_checks: Callable[[list], Callable[[int], None]] | None
    on_optimizer_step: Callable[[list, Any], Callable[[int], None]] | None
    on_training_end: Callable[[list], None] | None
    checkpoint_state: Callable[[list], Any] | None
    evaluation: Callable[[list], Any] | None


@dataclass(frozen=True)
class Explained:
    """An override's value with why the plugin sets it, for the start-up log (a plugin's
    `overrides` may give one where the bare value would puzzle a user)."""

    value: Any
    why: str


@dataclass(frozen=True)
class Override:
    """A Megatron argument a plugin sets before Megatron validates the arguments."""

    plugin: str
    dest: str  # argparse's name, e.g. "num_virtual_stages_per_pipeline_rank"
    value: Any
    why: str = ""

    def __str__(self) -> str:
        said = f"--plugins {self.plugin} sets Megatron's {self.dest} = {self.value!r}"
        return f"{said} ({self.why})" if self.why else said


@dataclass(frozen=True)
class RunPlan:
    """What a run enables, resolved once from the command line before Megatron validates
    it: the enabled plugins in registry order (the order their hooks run in), each with its
    typed config, and the Megatron arguments they set."""

    plugins: tuple[Enabled, ...] = ()
    overrides: tuple[Override, ...] = ()

    @property
    def names(self) -> list[str]:
        return [enabled.name for enabled in self.plugins]

    def config(self, name: str) -> Any:
        for enabled in self.plugins:
            if enabled.name == name:
                return enabled.config
        raise KeyError(f"plugin {name!r} is not enabled in this run")

    def apply_overrides(self, args: argparse.Namespace) -> list[str]:
        """Sets the overrides on Megatron's arguments (before its validation); returns the
        start-up log's lines that say them."""
        said = []
        for override in self.overrides:
            if not hasattr(args, override.dest) or getattr(args, override.dest) != override.value:
                said.append(f"megaseek: {override}")  # what it changes, not what it keeps
            setattr(args, override.dest, override.value)
        return said

    def enabled_by_their_flags(self, args: argparse.Namespace) -> list[str]:
        """The start-up log's lines for the enabled plugins that `--plugins` does not name
        (a plugin whose Megatron flags turn it on, `Plugin.enabled_by`)."""
        named = set(getattr(args, "plugins", None) or ())
        return [f"megaseek: plugin {enabled.name} is enabled by its Megatron flags (not named "
                f"in {PLUGINS_FLAG})" for enabled in self.plugins if enabled.name not in named]

    def transform_spec(self, spec: Any) -> Any:
        return transform_spec(self.plugins, spec)


def overrides_of(enabled: tuple[Enabled, ...]) -> tuple[Override, ...]:
    """Every enabled plugin's overrides; two plugins setting one argument differently is
    refused."""
    found: dict[str, Override] = {}
    for each in enabled:
        if each.plugin.overrides is None:
            continue
        for dest, value in each.plugin.overrides(each.config).items():
            why = ""
            if isinstance(value, Explained):
                value, why = value.value, value.why
            earlier = found.get(dest)
            if earlier is not None and earlier.value != value:
                raise PluginError(f"{PLUGINS_FLAG}: plugins {earlier.plugin!r} and "
                                  f"{each.name!r} need Megatron's {dest} set to "
                                  f"{earlier.value!r} and {value!r}; enable only one of them")
            found.setdefault(dest, Override(each.name, dest, value, why))
    return tuple(found.values())


def transform_spec(plugins: Iterable[Enabled], spec: Any) -> Any:
    """The enabled plugins' layer-spec transforms applied, in registry order, to a layer's
    `ModuleSpec`, to every layer of a block spec (`TransformerBlockSubmodules`, as
    Megatron's MoE models use), or to the layer inside every MTP layer of an MTP block
    spec. Returns a new spec; the one passed in is not changed."""
    transforms = [p.transform_layer_spec for p in plugins if p.transform_layer_spec is not None]
    if not transforms or spec is None:
        return spec

    def one_layer(layer_spec):
        for transform in transforms:
            layer_spec = transform(layer_spec)
        return layer_spec

    return _map_layer_specs(spec, one_layer)


def _map_layer_specs(spec: Any, one_layer: Callable[[Any], Any]) -> Any:
    import copy

    from megatron.core.transformer.multi_token_prediction import (
        MultiTokenPredictionBlockSubmodules,
        MultiTokenPredictionLayerSubmodules,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    if isinstance(spec, (TransformerBlockSubmodules, MultiTokenPredictionBlockSubmodules)):
        spec = copy.copy(spec)
        spec.layer_specs = [_map_layer_specs(s, one_layer) for s in spec.layer_specs]
        return spec
    if isinstance(spec, ModuleSpec) and isinstance(
            spec.submodules, (TransformerBlockSubmodules, MultiTokenPredictionBlockSubmodules,
                              MultiTokenPredictionLayerSubmodules)):
        spec = copy.copy(spec)
        spec.submodules = _map_layer_specs(spec.submodules, one_layer)
        return spec
    if isinstance(spec, MultiTokenPredictionLayerSubmodules):
        spec = copy.copy(spec)
        spec.mtp_model_layer = _map_layer_specs(spec.mtp_model_layer, one_layer)
        return spec
    if isinstance(spec, ModuleSpec):
        return one_layer(copy.deepcopy(spec))
    raise TypeError(f"not a layer or block spec: {type(spec).__name__}")
