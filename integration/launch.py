"""`megaseek launch SCRIPT [ARGS]`: run an unmodified Megatron launch script (such as
Megatron-LM's release `pretrain_gpt.py`) with megaseek's plugins.

Before the script runs, the launcher
- applies the upstream fixes this machine needs (`upstream.compat`; without CUDA
  `upstream.cpu`, and the CPU flags the user did not give: gloo, local transformer, no
  CUDA fusions); elsewhere Megatron's default `--transformer-impl transformer_engine`
  stays, and the plugins that do not compose with TE's modules refuse it at start-up
  (`integration.transformer_engine`);
- adds `--plugins` and the plugin flags to every parse of Megatron's arguments (the
  script's own `extra_args_provider` still runs), and enables the plugins right after
  the script's parse (`integration.hooks.enable`, as `megaseek pretrain` does).
Then it runs the script as `__main__`, with its folder first on `sys.path`, as
`python SCRIPT` would. Whether the script builds its model with its own model provider
or leaves it to `pretrain` (the release script), every GPTModel gets the plugins' specs.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import NoReturn

import integration  # noqa: F401  (makes megatron.training importable on Python 3.11)
from integration import hooks, presets
from integration.refusals import refuse
from plugins import PluginRegistry, default_registry
from upstream import cpu, shutdown
from upstream.patching import apply_fixes
from upstream.seams.arguments import plugin_arguments

USAGE = "usage: megaseek launch SCRIPT [MEGATRON AND PLUGIN ARGUMENTS]"


def main(argv: list[str] | None = None, registry: PluginRegistry | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        _refuse("give the SCRIPT to run", usage=True)
    if argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__}\nThe script's arguments: Megatron's and the plugins' "
              "(`megaseek pretrain --help` lists them), and --preset NAME.")
        return
    script = os.path.abspath(argv[0])
    if os.path.isdir(script):
        _refuse(f"{argv[0]} is a folder: give the Python script to run")
    if not os.path.isfile(script):
        _refuse(f"no such script: {argv[0]}")
    problem = _not_python(script)
    if problem:
        _refuse(f"{argv[0]} is not a Python script ({problem})")
    script_args = cpu.with_cpu_arguments(presets.expand(argv[1:]))
    registry = registry or default_registry()

    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    with hooks.megatron_run(registry) as run:
        if cpu.cuda_is_absent():
            apply_fixes(cpu.LAUNCH_SCRIPT_FIXES, run.patcher)
        plugin_arguments(registry.add_arguments,
                         lambda args: hooks.enable(run)).apply(run.patcher)
        sys.argv = [script, *script_args]
        sys.path.insert(0, os.path.dirname(script))
        runpy.run_path(script, run_name="__main__")
    shutdown.end_run()  # only where the script left a process group initialised: see upstream/shutdown.py


def _not_python(script: str) -> str | None:
    """Why `script` cannot be compiled as Python (before any flag is parsed or process group
    made: the script would fail only when run), or None."""
    try:
        with open(script, "rb") as stream:
            compile(stream.read(), script, "exec", dont_inherit=True)
    except SyntaxError as error:
        if error.lineno is None:  # not text at all (null bytes)
            return error.msg
        return f"{error.__class__.__name__} at line {error.lineno}: {error.msg}"
    except ValueError as error:  # null bytes, on Pythons that raise this instead
        return str(error)
    return None


def _refuse(message: str, usage: bool = False) -> NoReturn:
    """A command line the launcher cannot run, said as every megaseek refusal (exit status
    2), after the usage where it helps."""
    if usage:
        print(USAGE, file=sys.stderr)
    refuse(f"launch: {message}")


if __name__ == "__main__":
    main()
