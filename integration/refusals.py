"""How the `megaseek` commands that run in one process refuse a command line: one line,
`megaseek: error: MESSAGE`, exit status 2, as argparse does and as a run refuses on rank 0
(`integration.hooks.exit_refused`), so that every command's refusals read alike."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def refuse(message: object) -> NoReturn:
    print(f"megaseek: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse, with its refusals (a missing argument, a bad value, an unknown flag) said
    as every megaseek refusal: one line, without the usage (which --help prints)."""

    def error(self, message: str) -> NoReturn:
        refuse(message)
