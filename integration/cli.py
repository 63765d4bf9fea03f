"""The `megaseek` command.

    megaseek pretrain [MEGATRON ARGS] [--plugins ...]   one rank of GPT pretraining (run
                                                        it under torchrun)
    megaseek launch SCRIPT [ARGS]                       a Megatron launch script with plugins
    megaseek demo                                       the README's demo (4 ranks on CPU)
    megaseek fixes                                      the upstream fixes and whether the
                                                        installed megatron-core needs them
    megaseek ema-export --load CKPT --save OUT          the EMA weights of a checkpoint (saved
                                                        with --plugins ema) as an ordinary
                                                        checkpoint, for --load or --finetune
    megaseek schedule --schedule S --pp P ...           a pipeline schedule simulated (or a
                                                        run's --from-run DIR): bubble, picture
    megaseek describe --preset NAME [LAYOUT ...]        a model's parameters, per-rank memory
                                                        and FLOPs per token, by arithmetic
    megaseek convert hf-to-megatron HF_DIR OUT          a Hugging Face DeepSeek-V3 folder as a
    megaseek convert megatron-to-hf CKPT OUT            Megatron checkpoint, and back
    megaseek docs [--write]                             the tables in docs/ that restate code:
                                                        which are stale (--write: regenerate)

docs/cli.md says more about each.
"""

from __future__ import annotations

import sys


def list_fixes(argv: list[str]) -> None:
    """Every upstream change (`upstream.registry.all_fixes`), grouped by scope: its
    upstream file:line, its reason, and whether the installed megatron-core still needs it."""
    import importlib.metadata
    import textwrap
    import warnings

    import integration  # noqa: F401
    from upstream.registry import all_fixes

    with warnings.catch_warnings():  # megatron's import-time notes about TE and Apex
        warnings.simplefilter("ignore")
        fixes = all_fixes()
        needed = {fix.name: fix.still_needed() for fix in fixes}
    for scope in dict.fromkeys(fix.scope.label for fix in fixes):
        print(f"# {scope}")
        for fix in (f for f in fixes if f.scope.label == scope):
            state = "needed" if needed[fix.name] else "NOT NEEDED (remove it)"
            print(f"{fix.name:58} {state}\n    {fix.upstream}")
            print(textwrap.fill(fix.reason, 92, initial_indent="    ", subsequent_indent="    "))
        print()
    version = importlib.metadata.version("megatron-core")
    print(f"{len(fixes)} upstream changes; {sum(needed.values())} still needed by the installed "
          f"megatron-core {version}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "pretrain":
        from integration.pretrain import main as run
    elif command == "launch":
        from integration.launch import main as run
    elif command == "demo":
        from integration.demo import main as run
    elif command == "fixes":
        run = list_fixes
    elif command == "ema-export":
        from integration import checkpoint_tool, ema_export

        def run(rest: list[str]) -> None:
            checkpoint_tool.main(rest, command, ema_export)
    elif command == "schedule":
        from integration.schedule import main as run
    elif command == "convert":
        from integration.hf.cli import main as run
    elif command == "describe":
        from integration.describe import main as run
    elif command == "docs":
        from integration.docs import main as run
    elif command in ("", "-h", "--help", "help"):
        print(__doc__)
        return
    else:
        print(f"megaseek: error: unknown command {command!r}; the commands are pretrain, "
              f"launch, demo, fixes, ema-export, schedule, describe, convert, docs\n{__doc__}",
              file=sys.stderr)
        raise SystemExit(2)
    run(rest)


if __name__ == "__main__":
    main()
