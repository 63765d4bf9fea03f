"""Start-up checks of the checkpoint folders: `--save` must be a folder this process can
write in (or make), `--load` and `--save` must not name a file. Megatron finds out at the
first save (a traceback) or, for `--load FILE`, warns and trains from scratch."""

from __future__ import annotations

import argparse
import os
import tempfile

from plugins import PluginError


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def check(args: argparse.Namespace) -> None:
    for flag, path in (("--load", getattr(args, "load", None)),
                       ("--save", getattr(args, "save", None))):
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise PluginError(f"{flag} {path} is a file, not a checkpoint folder: give the "
                              "folder (the --save folder of the run that wrote it)")
    save = getattr(args, "save", None)
    if not save:
        return
    existing = _nearest_existing(save)
    if not os.path.isdir(existing):
        raise PluginError(f"--save {save}: {existing} is a file, so the folder cannot be "
                          "made; give --save a folder")
    try:  # a real write: permissions, a read-only mount, a quota
        handle, probe = tempfile.mkstemp(prefix=".megaseek-write-test-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise PluginError(f"--save {save}: cannot write in {existing} ({error.strerror}); "
                          "give --save a folder this user can write in") from None
