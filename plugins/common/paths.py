"""Whether a run can write where a flag points, asked at start-up (before any work) rather
than found out at the first write. Each answer is None (it can) or why not, for the
caller's error message. Nothing is created: a folder that does not exist yet is checked
through its nearest existing parent, with a temporary file that is removed at once (a
real write, so that it holds for root and on read-only file systems too)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def unwritable_directory(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be used as a directory to write files in (it, or a parent, is a
    file; its nearest existing folder refuses a new file), or None."""
    target = Path(path).absolute()
    existing = _nearest_existing(target)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    return _cannot_create_in(existing)


def unwritable_file(path: str | os.PathLike) -> str | None:
    """Why a file cannot be written at `path` (it is a directory, its folder does not exist
    or refuses a new file), or None."""
    target = Path(path).absolute()
    if target.is_dir():
        return f"{target} is a directory"
    if not target.parent.is_dir():
        existing = _nearest_existing(target.parent)
        return (f"{existing} is a file, not a folder" if not existing.is_dir()
                else f"the folder {target.parent} does not exist")
    if target.exists():
        return None if os.access(target, os.W_OK) else f"{target} is not writable"
    return _cannot_create_in(target.parent)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _cannot_create_in(directory: Path) -> str | None:
    try:
        with tempfile.TemporaryFile(dir=directory):
            return None
    except OSError as error:
        return f"cannot write in {directory} ({error.strerror or error})"
