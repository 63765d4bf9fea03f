"""The folder a command writes its output into, checked before the command does any work.

    check_output_folder(out, overwrite=options.overwrite, inputs=[options.source])

refuses, naming `out`: an output that is, contains or lies inside one of the command's
inputs (writing it would change or, with --overwrite, delete what the command reads); an
output that exists as anything but a folder (--overwrite replaces a previous output, never
a file); an output folder that exists, unless `overwrite`; an output whose parent cannot be written (a file
where a folder is needed, no permission, a read-only disk). Whether the parent can be
written is tried, not guessed from permission bits (which do not bind root):
`plugins.common.paths`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from plugins.common.paths import unwritable_directory


class OutputFolderError(ValueError):
    """An output folder the command cannot write as asked, naming it and what to change."""


def check_output_folder(out: str | Path, *, overwrite: bool, inputs: Iterable[str | Path] = (),
                        overwrite_flag: str = "--overwrite") -> None:
    """Raises OutputFolderError naming `out` when the command cannot write it (see above);
    `overwrite_flag` is what the message tells the user to pass."""
    out = Path(out)
    try:
        _check(out, overwrite, inputs, overwrite_flag)
    except OSError as e:  # a folder on the way that cannot be looked into
        raise OutputFolderError(f"{out}: cannot be checked ({e.strerror or e}: "
                                f"{e.filename})") from None


def _check(out: Path, overwrite: bool, inputs: Iterable[str | Path],
           overwrite_flag: str) -> None:
    target = out.resolve()
    for source in inputs:
        source_path = Path(source).resolve()
        if target == source_path:
            raise OutputFolderError(f"{out}: is the input {source}; write to another folder")
        if source_path in target.parents:
            raise OutputFolderError(f"{out}: is inside the input {source}; write to a folder "
                                    "outside it")
        if target in source_path.parents:
            raise OutputFolderError(f"{out}: contains the input {source}; write to a folder "
                                    "that does not")
    if out.exists() or out.is_symlink():
        if not out.is_dir():  # the output is a folder: replacing a file would lose the file
            raise OutputFolderError(f"{out} is not a folder; {overwrite_flag} replaces a "
                                    "previous output (a folder), never a file: write to "
                                    "another path")
        if not overwrite:
            raise OutputFolderError(f"{out} exists; pass {overwrite_flag} to replace it")
    _check_writable_parent(out, target.parent)


def _check_writable_parent(out: Path, parent: Path) -> None:
    """The output is written beside itself and renamed into place: its parent (or the
    nearest existing folder above it, where the missing ones are made) must take new
    files."""
    problem = unwritable_directory(parent)
    if problem:
        raise OutputFolderError(f"{out}: {problem}")
