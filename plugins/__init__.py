"""megaseek's plugins, the one registry that turns them on, and the run plan it makes.

A `Plugin` names itself and declares, each optional:
- `config`: a frozen dataclass, its configuration for a run. Its `plugins.config.flag`
  fields are the plugin's own flags (option, type, default, help: declared once; the
  registry adds them to Megatron's parser), its `plugins.config.megatron` fields the
  Megatron arguments its hooks read;
- `check(config, args)`: its start-up checks, with Megatron's parsed arguments read only;
- `overrides(config)`: Megatron arguments it needs set (e.g. dualpipe's two model chunks
  per rank), set and said in the start-up log before Megatron validates its arguments;
- hooks, each given the plugin's config (never `args`) and the objects it acts on:
  - `transform_layer_spec(config, spec)`: rewrites one transformer layer's `ModuleSpec`
    (applied to every layer of a block spec, MTP's included: `transform_spec`);
  - `schedule(config)`: a pipeline schedule (Megatron's forward-backward keyword
    interface);
  - `placement(config)`: which stages (layers, embedding, head and loss) each pipeline
    chunk of each rank builds;
  - `fixes(config)`: the upstream changes the plugin needs for the run
    (`upstream.patching.Fix`, each returned where its scope holds for the config);
  - run-time hooks, given the model chunks Megatron built: `before_gradient_checks`
    (once a step's backward passes are done, before Megatron checks and reduces the
    gradients; it may raise to fail the step), `on_optimizer_step` (after every
    successful optimizer step, with Megatron's iteration), `on_training_end` (once
    Megatron's training loop has ended), `checkpoint_state` (the plugin's own sharded
    state, saved and loaded with Megatron's checkpoint), `evaluation` (an extra pass of
    Megatron's evaluation, e.g. with other weights). A plugin whose run-time hooks share
    what one of them builds (the EMA) declares `run_state(config)`: the object made once
    per run that those hooks receive instead of the config.
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

`PluginRegistry.plan(args)` resolves a parsed command line once, before Megatron validates
it, into a frozen `RunPlan`: the enabled plugins (`Enabled`: the plugin, its config, its
hooks bound to it) in registry order, and their overrides.

Plugins compose through specs, never by knowing about each other: transforms run in the
registry's order (the order of registration), whatever order `--plugins` names them in,
so the model is the same for every order. A plugin that maps the finished spec (fp8
turns every linear slot into its FP8 version) registers after those that add slots.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from plugins.config import add_flags, flags, read
from plugins.common.errors import PluginError  # noqa: F401  (part of this API)
from plugins.plan import (  # noqa: F401  (part of this API)
    PLUGINS_FLAG,
    Enabled,
    Override,
    RunHooks,
    RunPlan,
    StartUpArguments,
    overrides_of,
    transform_spec,
)

TRANSFORMER_IMPL_FLAG = "--transformer-impl"


@dataclass(frozen=True)
class TransformerEngine:
    """How a plugin goes with Transformer Engine's spec (`--transformer-impl
    transformer_engine`, Megatron's default): stated once, read by the start-up check and
    by the table in docs/launch.md (`te_policy_table`)."""

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
    # The plugin's configuration: a frozen dataclass whose `plugins.config.flag` fields are
    # its own flags and whose `plugins.config.megatron` fields hold the Megatron arguments
    # its hooks read. Every hook below receives the instance made for the run (`config`).
    config: type | None = None
    # (config, args) -> None: the start-up checks, when the run plan is made (before
    # Megatron validates its arguments); `args` is Megatron's parsed arguments, read only.
    # Raises PluginError naming the flag to change.
    check: Callable[[Any, Any], None] | None = None
    # config -> {Megatron argument (argparse dest): value}: what the plugin needs Megatron
    # to run with (e.g. two model chunks per rank), applied and said in the start-up log
    # before Megatron validates its arguments.
    overrides: Callable[[Any], dict[str, Any]] | None = None
    # config -> the object every run-time hook below receives instead of the config, made
    # once per run: for hooks that share what one of them builds (the EMA).
    run_state: Callable[[Any], Any] | None = None
    # (config, layer_spec) -> layer_spec, for one transformer layer's ModuleSpec.
    transform_layer_spec: Callable[[Any, Any], Any] | None = None
    # config -> a Megatron forward-backward function (same keyword interface).
    schedule: Callable[[Any], Callable[..., Any]] | None = None
    # config -> upstream.seams.placement.Placement: the stages each rank's pipeline
    # chunks build.
    placement: Callable[[Any], Any] | None = None
    # (config, model_chunks) -> callable(iteration), run in every training step after its
    # last backward and before Megatron's gradient checks and reduction (possibly more than
    # once in a step: it must be idempotent); raising fails the step.
    before_gradient_checks: Callable[[Any, list], Callable[[int], None]] | None = None
    # (config, model_chunks, optimizer) -> callable(iteration), run after every successful
    # optimizer step with the iteration that step completed (Megatron's count, so it
    # continues across a resume).
    on_optimizer_step: Callable[[Any, list, Any], Callable[[int], None]] | None = None
    # (config, model_chunks) -> None, once Megatron's training loop has returned or exited
    # (--exit-interval and the like), before pretrain's final checkpoint and evaluation.
    on_training_end: Callable[[Any, list], None] | None = None
    # (config, model_chunks) -> an object with `sharded_state_dict()` (Megatron
    # dist-checkpointing objects, saved under the plugin's name) and
    # `load_state_dict(state)` (what was loaded; None when the checkpoint has none).
    checkpoint_state: Callable[[Any, list], Any] | None = None
    # (config, model_chunks) -> (name, context manager factory), or None for no extra pass
    # this run: after each of Megatron's evaluations, it runs again inside the context,
    # its results printed under the name.
    evaluation: Callable[[Any, list], tuple[str, Callable[[], Any]] | None] | None = None
    # config -> the upstream fixes this run needs (each applied only if still needed).
    fixes: Callable[[Any], Iterable[Any]] | None = None
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
    """The table of what each plugin does with Transformer Engine (Markdown), generated into
    docs/launch.md."""
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


class PluginRegistry:
    def __init__(self, plugins: Iterable[Plugin] = ()) -> None:
        self._plugins: dict[str, Plugin] = {}
        self._flags: dict[str, tuple[str, str]] = {}  # argparse dest -> (plugin, option)
        for plugin in plugins:
            self.register(plugin)

    def register(self, plugin: Plugin) -> None:
        if plugin.name in self._plugins:
            raise PluginError(f"plugin {plugin.name!r} is registered twice")
        own = {field.name: declared.option for field, declared in flags(plugin.config)}
        for dest, option in own.items():
            if dest in self._flags:
                other = self._flags[dest][0]
                raise PluginError(f"plugins {other!r} and {plugin.name!r} both define {option}")
        self._plugins[plugin.name] = plugin
        self._flags.update({dest: (plugin.name, option) for dest, option in own.items()})

    @property
    def names(self) -> list[str]:
        return sorted(self._plugins)

    def add_arguments(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Megatron `extra_args_provider`: `--plugins` plus every registered plugin's flags."""
        group = parser.add_argument_group("megaseek plugins")
        group.add_argument(PLUGINS_FLAG, nargs="+", default=[], metavar="NAME",
                           help=f"plugins to enable; available: {', '.join(self.names) or 'none'}")
        for plugin in self._plugins.values():
            if not any(flags(plugin.config)):
                continue
            try:
                add_flags(plugin.config,
                          parser.add_argument_group(f"megaseek plugin {plugin.name}"))
            except argparse.ArgumentError as clash:
                raise PluginError(f"plugin {plugin.name!r} adds a flag that Megatron or another "
                                  f"plugin already defines: {clash}") from clash
        return parser

    def plan(self, args: argparse.Namespace, checked: bool = True) -> RunPlan:
        """The run plan of parsed arguments `args` (read only): checks `--plugins` and the
        plugin flags, builds each enabled plugin's config and runs its start-up check.
        `checked=False` is for the saved arguments of a checkpoint, whose run was checked
        when it started: only what shapes the model is resolved."""
        read_only = StartUpArguments(args, frozenset())
        chosen = self._chosen(read_only)
        names = {plugin.name for plugin in chosen}
        if checked:
            self._check_flags_have_their_plugin(args, chosen)
        for plugin in self._plugins.values():
            if plugin.name not in names and plugin.needed_by is not None:
                message = plugin.needed_by(read_only)
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

        honoured = frozenset().union(*(p.honours for p in chosen))
        enabled = tuple(Enabled(plugin, None if plugin.config is None
                                else read(plugin.config, args)) for plugin in chosen)
        if checked:
            view = StartUpArguments(args, honoured)
            for each in enabled:
                if each.plugin.check is not None:
                    each.plugin.check(each.config, view)
        return RunPlan(enabled, overrides_of(enabled))

    def _chosen(self, args: argparse.Namespace) -> list[Plugin]:
        """The enabled plugins, in registry order."""
        requested = list(getattr(args, "plugins", []) or [])
        unknown = [name for name in requested if name not in self._plugins]
        if unknown:
            raise PluginError(f"{PLUGINS_FLAG}: unknown plugin(s) {', '.join(unknown)}; "
                              f"available: {', '.join(self.names) or 'none'}")
        duplicates = sorted({n for n in requested if requested.count(n) > 1})
        if duplicates:
            raise PluginError(f"{PLUGINS_FLAG}: {', '.join(duplicates)} named more than once")
        return [plugin for name, plugin in self._plugins.items()
                if name in requested or (plugin.enabled_by is not None
                                         and plugin.enabled_by(args))]

    def _check_flags_have_their_plugin(self, args: argparse.Namespace,
                                       chosen: list[Plugin]) -> None:
        names = {plugin.name for plugin in chosen}
        orphans = [f"{option} needs '{PLUGINS_FLAG} {owner}'"
                   for dest, (owner, option) in self._flags.items()
                   if owner not in names and hasattr(args, dest)]
        if orphans:
            raise PluginError("plugin flags given without their plugin: " + "; ".join(orphans))


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
