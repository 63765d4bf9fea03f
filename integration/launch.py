"""`megaseek launch SCRIPT [ARGS]`: run an unmodified Megatron launch script (such as
Megatron-LM's `pretrain_gpt.py`) with megaseek's plugins.

Before the script runs, the launcher
- applies `integration.compat` and, without CUDA, `integration.cpu` (and adds the CPU
  flags the user did not give: gloo, local transformer, no CUDA fusions);
- adds `--plugins` and the plugin flags to Megatron's argument parser (the script's own
  `extra_args_provider` still runs), and validates them right after parsing;
- attaches the enabled plugins: their layer-spec transforms to every `GPTModel` the
  script builds, their schedule and optimizer-step hooks to Megatron's training loop.
Then it runs the script as `__main__`, with its folder first on `sys.path`, as
`python SCRIPT` would.
"""

from __future__ import annotations

import os
import runpy
import sys
from functools import wraps

import integration  # noqa: F401  (makes megatron.training importable on Python 3.11)
from integration import compat, cpu
from integration.patching import Patcher
from plugins import PluginRegistry, default_registry


def _install_plugin_arguments(registry: PluginRegistry, patcher: Patcher) -> None:
    """Every parse of Megatron's arguments knows the plugin flags; the one that
    `parse_and_validate_args` makes (the script's) also enables and attaches the plugins.
    (megatron.training parses a second time for its own probes, e.g. ft_integration.py:78.)"""
    import megatron.training.arguments as arguments

    from integration import hooks

    parse_args = arguments.parse_args
    parse_and_validate_args = arguments.parse_and_validate_args

    @wraps(parse_args)
    def parse_args_with_plugin_flags(extra_args_provider=None, ignore_unknown_args=False):
        def provide(parser):
            parser = registry.add_arguments(parser)
            return extra_args_provider(parser) if extra_args_provider else parser

        return parse_args(provide, ignore_unknown_args)

    @wraps(parse_and_validate_args)
    def parse_validate_and_enable(*args, **kwargs):
        parsed = parse_and_validate_args(*args, **kwargs)
        plugins = registry.enabled(parsed)
        hooks.attach(plugins, parsed, patcher)
        _transform_gpt_layer_specs(hooks.layer_spec_hooks(plugins), parsed, patcher)
        return parsed

    patcher.setattr(arguments, "parse_args", parse_args_with_plugin_flags)
    patcher.setattr(arguments, "parse_and_validate_args", parse_validate_and_enable)


def _transform_gpt_layer_specs(transforms, args, patcher: Patcher) -> None:
    """The script builds its own GPTModel; its layer spec passes through the plugins."""
    if not transforms:
        return
    from megatron.core.models.gpt import GPTModel

    init = GPTModel.__init__

    @wraps(init)
    def init_with_plugin_specs(self, config, transformer_layer_spec, *rest, **kwargs):
        for transform in transforms:
            transformer_layer_spec = transform(transformer_layer_spec, args)
        init(self, config, transformer_layer_spec, *rest, **kwargs)

    patcher.setattr(GPTModel, "__init__", init_with_plugin_specs)


def main(argv: list[str] | None = None, registry: PluginRegistry | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: megaseek launch SCRIPT [MEGATRON AND PLUGIN ARGUMENTS]")
    script, script_args = os.path.abspath(argv[0]), cpu.with_cpu_arguments(argv[1:])
    if not os.path.isfile(script):
        raise SystemExit(f"megaseek launch: no such script: {argv[0]}")

    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    patcher = Patcher()
    compat.install()
    cpu.install()
    _install_plugin_arguments(registry or default_registry(), patcher)

    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(script))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        patcher.undo()


if __name__ == "__main__":
    main()
