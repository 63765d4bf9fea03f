"""megaseek's plugins and the one registry that turns them on.

A `Plugin` names itself, adds its own flags (through Megatron's `extra_args_provider`),
validates the parsed arguments, and offers hooks, each optional:
- `transform_layer_spec`: rewrites one transformer layer's `ModuleSpec` (applied to every
  layer of a block spec, MTP's included: `transform_spec`);
- `schedule`: a pipeline schedule (Megatron's forward-backward keyword interface);
- `placement`: which stages (layers, embedding, head and loss) each pipeline chunk of each
  rank builds;
- `before_gradient_checks`: a callback run once a training step's backward passes are
  done, before Megatron checks and reduces the gradients (where the step waits for the GPU
  anyway), with Megatron's iteration number; it may raise to fail the step;
- `on_optimizer_step`: a callback run after every successful optimizer step, with
  Megatron's iteration number;
- `on_training_end`: run once Megatron's training loop has ended (before its final
  checkpoint and evaluation), e.g. to finish background work and raise its failure;
- `checkpoint_state`: the plugin's own sharded state, saved and loaded with Megatron's
  checkpoint;
- `evaluation`: an extra pass of Megatron's evaluation (e.g. with other weights);
- `fixes`: the upstream changes the plugin needs for a run (`upstream.patching.Fix`).
It claims the *slots* it replaces (e.g. "self_attention", "schedule"); two enabled plugins
may not claim the same slot. It declares how it goes with Transformer Engine's modules
(`transformer_engine`): a plugin that does not compose with them refuses `--transformer-impl
transformer_engine` (Megatron's default) at start-up, as does one that declares nothing.

Nothing activates because it is installed: a plugin runs only when named in
`--plugins NAME [NAME ...]`, or, for a plugin that implements a Megatron flag Megatron
cannot honour by itself here (BF16 Adam moments without Transformer Engine), when that
flag is given (`enabled_by`). Megatron's own flags configure what Megatron already names;
a plugin's flags are only for what Megatron lacks, and giving one without enabling its
plugin is an error at start-up.

Plugins compose through specs, never by knowing about each other: transforms run in the
registry's order (the order of registration), whatever order `--plugins` names them in,
so the model is the same for every order. A plugin that maps the finished spec (fp8
turns every linear slot into its FP8 version) registers after those that add slots.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from plugins.common.errors import PluginError  # noqa: F401  (part of this API)

PLUGINS_FLAG = "--plugins"
TRANSFORMER_IMPL_FLAG = "--transformer-impl"


@dataclass(frozen=True)
class TransformerEngine:
    """How a plugin goes with Transformer Engine's spec (`--transformer-impl
    transformer_engine`, Megatron's default): stated once, read by the start-up check and
    by the README's table (`te_policy_table`)."""

    composes: bool
    # What happens to a model built from TE's spec with the plugin on; for a plugin that
    # does not compose, why (the start-up error says it).
    effect: str
    # What a Transformer Engine user gives up by turning the plugin on.
    gives_up: str


@dataclass(frozen=True)
class Plugin:
    name: str
    summary: str
    add_arguments: Callable[[argparse._ArgumentGroup], None] | None = None
    validate: Callable[[argparse.Namespace], None] | None = None
    # (layer_spec, args) -> layer_spec, for one transformer layer's ModuleSpec.
    transform_layer_spec: Callable[[Any, argparse.Namespace], Any] | None = None
    # args -> a Megatron forward-backward function (same keyword interface).
    schedule: Callable[[argparse.Namespace], Callable[..., Any]] | None = None
    # args -> upstream.seams.placement.Placement: the stages each rank's pipeline chunks build.
    placement: Callable[[argparse.Namespace], Any] | None = None
    # (args, model_chunks) -> callable(iteration), run in every training step after its
    # last backward and before Megatron's gradient checks and reduction (possibly more than
    # once in a step: it must be idempotent); raising fails the step.
    before_gradient_checks: Callable[[argparse.Namespace, list], Callable[[int], None]] | None = None
    # (args, model_chunks, optimizer) -> callable(iteration), run after every successful
    # optimizer step with the iteration that step completed (Megatron's count, so it
    # continues across a resume).
    on_optimizer_step: Callable[[argparse.Namespace, list, Any], Callable[[int], None]] | None = None
    # (args, model_chunks) -> None, once Megatron's training loop has returned or exited
    # (--exit-interval and the like), before pretrain's final checkpoint and evaluation.
    on_training_end: Callable[[argparse.Namespace, list], None] | None = None
    # (args, model_chunks) -> an object with `sharded_state_dict()` (Megatron
    # dist-checkpointing objects, saved under the plugin's name) and
    # `load_state_dict(state)` (what was loaded; None when the checkpoint has none).
    checkpoint_state: Callable[[argparse.Namespace, list], Any] | None = None
    # (args, model_chunks) -> (name, context manager factory), or None for no extra pass
    # this run: after each of Megatron's evaluations, it runs again inside the context,
    # its results printed under the name.
    evaluation: Callable[[argparse.Namespace, list], tuple[str, Callable[[], Any]]] | None = None
    # args -> the upstream fixes this run needs (each applied only if still needed).
    fixes: Callable[[argparse.Namespace], Iterable[Any]] | None = None
    # args -> bool: on without --plugins, because a Megatron flag that only this plugin
    # can honour was given (the flag is the opt-in).
    enabled_by: Callable[[argparse.Namespace], bool] | None = None
    # args -> None, or the message of the start-up error when Megatron flags were given
    # that cannot work without this plugin and it is not enabled (Megatron would ignore
    # them or fail late).
    needed_by: Callable[[argparse.Namespace], str | None] | None = None
    slots: frozenset[str] = frozenset()
    # Megatron flags (argparse dests) this plugin implements itself: another enabled
    # plugin's refusal of them (plugins.common.flags) does not apply while it is on.
    honours: frozenset[str] = frozenset()
    # How it goes with Transformer Engine's modules; None (not declared) refuses them.
    transformer_engine: TransformerEngine | None = None


def transformer_engine_refusal(plugin: Plugin, impl: str) -> str | None:
    """None where `plugin` works with `--transformer-impl impl`, else the start-up error."""
    if impl == "local":
        return None
    policy = plugin.transformer_engine
    if policy is not None and policy.composes:
        return None
    why = (policy.effect if policy is not None else
           "it does not declare that it works with Transformer Engine's modules")
    default = (" (Megatron's default where the flag is not given)"
               if impl == "transformer_engine" else "")
    return (f"{PLUGINS_FLAG} {plugin.name} does not work with {TRANSFORMER_IMPL_FLAG} {impl}"
            f"{default}: {why}; pass {TRANSFORMER_IMPL_FLAG} local")


def te_policy_table(plugins: Iterable[Plugin]) -> str:
    """The README's table of what each plugin does with Transformer Engine (Markdown)."""
    rows = ["| plugin | with `--transformer-impl transformer_engine` | what a TE user gives up |",
            "|---|---|---|"]
    for plugin in plugins:
        policy = plugin.transformer_engine
        if policy is None:
            rows.append(f"| `{plugin.name}` | refused (no policy declared) | the plugin |")
            continue
        verdict = "composes" if policy.composes else "refused at start-up"
        rows.append(f"| `{plugin.name}` | {verdict}: {policy.effect} | {policy.gives_up} |")
    return "\n".join(rows) + "\n"


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
        enabled plugin's validation, and returns the enabled plugins in registry order (the
        order their hooks run in, whatever the order on the command line)."""
        requested = list(getattr(args, "plugins", []) or [])
        unknown = [name for name in requested if name not in self._plugins]
        if unknown:
            raise PluginError(f"{PLUGINS_FLAG}: unknown plugin(s) {', '.join(unknown)}; "
                              f"available: {', '.join(self.names) or 'none'}")
        duplicates = sorted({n for n in requested if requested.count(n) > 1})
        if duplicates:
            raise PluginError(f"{PLUGINS_FLAG}: {', '.join(duplicates)} named more than once")
        chosen = [plugin for name, plugin in self._plugins.items()
                  if name in requested or (plugin.enabled_by is not None
                                           and plugin.enabled_by(args))]
        requested = [plugin.name for plugin in chosen]

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

        for plugin in self._plugins.values():
            if plugin.name not in requested and plugin.needed_by is not None:
                message = plugin.needed_by(args)
                if message:
                    raise PluginError(message)

        claimed: dict[str, str] = {}
        for plugin in chosen:
            for slot in sorted(plugin.slots):
                if slot in claimed:
                    raise PluginError(
                        f"{PLUGINS_FLAG}: plugins {claimed[slot]!r} and {plugin.name!r} both "
                        f"replace {slot!r}; enable only one of them")
                claimed[slot] = plugin.name

        impl = getattr(args, "transformer_impl", "local")
        for plugin in chosen:
            refused = transformer_engine_refusal(plugin, impl)
            if refused:
                raise PluginError(refused)

        args.megaseek_flags_honoured = sorted(set().union(*(p.honours for p in chosen)))
        for plugin in chosen:
            if plugin.validate is not None:
                plugin.validate(args)
        return chosen


def transform_spec(plugins: Iterable[Plugin], spec: Any, args: argparse.Namespace) -> Any:
    """The plugins' layer-spec transforms applied, in registry order, to a layer's
    `ModuleSpec`, to every layer of a block spec (`TransformerBlockSubmodules`, as
    Megatron's MoE models use), or to the layer inside every MTP layer of an MTP block
    spec. Returns a new spec; the one passed in is not changed."""
    transforms = [p.transform_layer_spec for p in plugins if p.transform_layer_spec is not None]
    if not transforms or spec is None:
        return spec

    def one_layer(layer_spec):
        for transform in transforms:
            layer_spec = transform(layer_spec, args)
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


def builtin_plugins() -> list[Plugin]:
    """The plugins megaseek ships, in the order their hooks run: plugins that put modules
    into the spec first, fp8 (which maps the finished spec's linears) last. Each plugin
    package adds itself here once it works."""
    from plugins.bf16_moments.plugin import BF16_MOMENTS
    from plugins.dualpipe.plugin import DUALPIPE
    from plugins.ema.plugin import EMA
    from plugins.fp8.plugin import FP8
    from plugins.mla.plugin import MLA
    from plugins.moe.plugin import MOE

    return [MLA, MOE, BF16_MOMENTS, EMA, FP8, DUALPIPE]


def default_registry() -> PluginRegistry:
    return PluginRegistry(builtin_plugins())
