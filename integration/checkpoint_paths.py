"""Start-up checks of the checkpoint folders: `--save` must be a folder this process can
write in (or make), `--load` and `--save` must not name a file. Megatron finds out at the
first save (a traceback) or, for `--load FILE`, warns and trains from scratch. Whether
`--save` can be written is tried, not read from permission bits (`plugins.common.paths`).
What the `--load` folder holds, and what the run may ask of it: `integration.checkpoint_folder`."""

from __future__ import annotations

import argparse
import os

from integration import checkpoint_folder
from plugins import PluginError
from plugins.common.paths import unwritable_directory


def check(args: argparse.Namespace) -> None:
    for flag, path in (("--load", getattr(args, "load", None)),
                       ("--save", getattr(args, "save", None))):
        if path and os.path.exists(path) and not os.path.isdir(path):
            which = ("the --save folder of the run that wrote it" if flag == "--load" else
                     "a folder to write the checkpoints in, new or existing")
            raise PluginError(f"{flag} {path} is a file, not a checkpoint folder: give "
                              f"{which}")
    checkpoint_folder.check_load(args)
    save = getattr(args, "save", None)
    if not save:
        return
    problem = unwritable_directory(save)
    if problem:
        raise PluginError(f"--save {save}: {problem}; give --save a folder this user can "
                          "write in")
