"""The `megaseek` command.

    megaseek pretrain [MEGATRON ARGS] [--plugins ...]   one rank of GPT pretraining (run
                                                        it under torchrun)
    megaseek launch SCRIPT [ARGS]                       a Megatron launch script with plugins
    megaseek demo                                       the README's demo (2 ranks on CPU)
    megaseek fixes                                      the upstream fixes and whether the
                                                        installed megatron-core needs them
"""

from __future__ import annotations

import sys


def list_fixes(argv: list[str]) -> None:
    import integration  # noqa: F401
    from integration import compat, cpu

    for scope, fixes in (("every machine", compat.FIXES), ("CPU only", cpu.FIXES)):
        print(f"# {scope}")
        for fix in fixes:
            state = "needed" if fix.still_needed() else "NOT NEEDED (remove it)"
            print(f"{fix.name:58} {state}\n    {fix.upstream}\n    {fix.reason}")


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
    else:
        raise SystemExit(__doc__)
    run(rest)


if __name__ == "__main__":
    main()
