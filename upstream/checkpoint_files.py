"""The files of a `torch_dist` checkpoint: checksummed as they are written, verified before
they are loaded, and no partial iteration folder left by a failed save (megatron-core 0.19.2).

- `checksums_as_written`: every data file (`__R_I.distcp`) a save writes is hashed as its
  bytes go to the file (CRC-32: no second read), and its entry, `{"file", "bytes",
  "crc32"}`, is written to `iter_N/megaseek-checksums/<file>.json` once the file is
  complete. The manifest is one entry a file: the writers (threads, ranks) never share one.
- `manifest_after_async_save`: an async save (`--async-save`) writes its files in
  Megatron's worker process, out of the seams' reach; its finalization (every rank, once
  all writes are done, before the tracker file names the checkpoint) writes each rank's
  entries from its finished files: one read of the files, in the training process.
- `verified_load`: before Megatron loads a checkpoint, its data files are checked against
  the manifest, split over the ranks; a corrupt, truncated, missing or unlisted file is
  named and the load refused (`CheckpointCorrupt`). A checkpoint without a manifest (saved
  by plain Megatron) loads, and rank 0 says once that it was not verified.
- `failed_save_named`: a save whose files could not be written ends the run with the OS
  error and the file it hit (`CheckpointSaveFailed`), where Megatron reports a worker
  failure without either, and removes the partial `iter_N` folder; the tracker file still
  names the last complete checkpoint, which `--load` reads.

Megatron's own `--verify-integrity` (dist_checkpointing/validation.py:536-611) is opt-in,
reads every file again after the save (SHA-256, rank 0 alone), and refuses a checkpoint
without its manifest; these seams cost no read at save and accept plain checkpoints.
The small files rank 0 writes beside the data (`.metadata`, `common.pt`, `metadata.json`)
are not in the manifest: they are parsed whole at load and fail loudly when damaged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import zlib
from functools import wraps
from typing import Any, Iterator

from upstream.megatron_modules import megatron_checkpointing, megatron_module, megatron_training
from upstream.patching import Fix, Patcher, source_has
from upstream.seams import SEAM, VERSION
from upstream.seams.errors import CheckpointMismatch

MANIFEST = "megaseek-checksums"  # the folder of entries inside iter_N
DATA_SUFFIX = ".distcp"
_WRITER = "megatron.core.dist_checkpointing.strategies.filesystem_async"



class CheckpointCorrupt(ValueError):
    """A checkpoint's file does not match the checksum written with it."""


class CheckpointSaveFailed(RuntimeError):
    """A checkpoint's files could not be written (the OS error and the file it hit)."""


# --- the manifest ------------------------------------------------------------------------------

def _entry_path(data_file: str) -> str:
    folder, name = os.path.split(data_file)
    return os.path.join(folder, MANIFEST, name + ".json")


def write_entry(data_file: str, size: int, crc32: int) -> None:
    """The manifest entry of a complete data file (replaced atomically)."""
    entry = _entry_path(data_file)
    os.makedirs(os.path.dirname(entry), exist_ok=True)
    partial = f"{entry}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(partial, "w") as f:
        json.dump({"file": os.path.basename(data_file), "bytes": size,
                   "crc32": f"{crc32:08x}"}, f)
    os.replace(partial, entry)


def file_crc32(path: str, chunk: int = 8 << 20) -> tuple[int, int]:
    """(bytes, CRC-32) of a file, read in chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc, size = zlib.crc32(block, crc), size + len(block)
    return size, crc


def has_manifest(directory: str) -> bool:
    return os.path.isdir(os.path.join(directory, MANIFEST))


def data_files(directory: str) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(DATA_SUFFIX))


def check_files(directory: str, names: list[str]) -> list[str]:
    """What is wrong with each of `names` (data files of `directory`) against its manifest
    entry: one line a bad file, nothing for a good one."""
    problems = []
    for name in names:
        path = os.path.join(directory, name)
        entry_path = _entry_path(path)
        try:
            with open(entry_path) as f:
                entry = json.load(f)
            saved_bytes, saved_crc = int(entry["bytes"]), str(entry["crc32"])
        except (OSError, ValueError, KeyError, TypeError):
            problems.append(f"{path}: not in the checksum manifest ({MANIFEST}/): the save "
                            "that wrote it did not finish")
            continue
        try:
            size, crc = file_crc32(path)
        except OSError as error:
            problems.append(f"{path}: unreadable ({error.strerror})")
            continue
        if size != saved_bytes:
            problems.append(f"{path}: {size} bytes, {saved_bytes} when it was saved "
                            "(truncated or appended to)")
        elif f"{crc:08x}" != saved_crc:
            problems.append(f"{path}: its bytes changed since it was saved (CRC-32 "
                            f"{crc:08x}, saved {saved_crc})")
    return problems


def listed_but_missing(directory: str) -> list[str]:
    """Files the manifest lists that are not in `directory`."""
    listed = {n[:-len(".json")] for n in os.listdir(os.path.join(directory, MANIFEST))
              if n.endswith(DATA_SUFFIX + ".json")}
    return [f"{os.path.join(directory, name)}: missing (the manifest lists it)"
            for name in sorted(listed - set(data_files(directory)))]


def verify_checkpoint(directory: str,
                      way_out: str = "Load an earlier checkpoint (--ckpt-step N) or restore "
                                     "the file") -> bool:
    """Checks the data files of a checkpoint folder, a share on each rank (a collective on
    the default group). Raises CheckpointCorrupt naming the first bad file (and how many),
    then `way_out`; returns False where the folder has no manifest."""
    import torch.distributed as dist

    if not has_manifest(directory):
        return False
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    names = data_files(directory)
    problems = check_files(directory, names[rank::world])
    if rank == 0:
        problems += listed_but_missing(directory)
    if distributed:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, problems)
        problems = [p for rank_problems in gathered for p in rank_problems]
    if problems:
        more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
        raise CheckpointCorrupt(f"checkpoint {directory} is damaged: {problems[0]}{more}; "
                                f"the load is refused. {way_out}")
    return True


# --- hashing as the writer writes ---------------------------------------------------------------

class _HashedFile:
    """A data file opened for writing, its bytes hashed as they are written. On a clean
    close its manifest entry is written; a failed write is kept (with the path) and raised
    at the close in place of what the serializer made of it (torch.save reports a short
    write as `unexpected pos`)."""

    def __init__(self, raw, path: str, failures: list) -> None:
        self._raw, self._path, self._failures = raw, path, failures
        self._crc, self._size, self._sequential = 0, 0, True
        self._failed: OSError | None = None

    def write(self, data) -> int:
        try:
            written = self._raw.write(data)
        except OSError as error:
            self._failed = error if error.filename else OSError(
                error.errno, error.strerror, self._path)
            raise
        view = memoryview(data).cast("B")
        if written is not None and written < len(view):
            view = view[:written]
        self._crc = zlib.crc32(view, self._crc)
        self._size += len(view)
        return written

    def seek(self, *args):
        self._sequential = False  # a writer that goes back: hashed from the file at the close
        return self._raw.seek(*args)

    def __getattr__(self, name: str):
        return getattr(self._raw, name)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace) -> bool:
        try:
            self._raw.close()
        except OSError as closing:  # the buffered tail did not fit
            self._failed = self._failed or OSError(closing.errno, closing.strerror, self._path)
        if self._failed is not None:
            self._failures.append(self._failed)
            raise self._failed from error
        if kind is None:
            size, crc = (self._size, self._crc) if self._sequential else file_crc32(self._path)
            write_entry(self._path, size, crc)
        return False


def checksums_as_written(failures: list) -> Fix:
    """Megatron's torch_dist writer opens each data file with `open(file_name, "wb")`
    (filesystem_async.py:400); in that module `open` gives a `_HashedFile`. Failed writes
    go to `failures` (this process's, for `failed_save_named`)."""

    def apply(patcher: Patcher) -> None:
        import builtins

        writer = megatron_module(_WRITER)
        builtin_open = builtins.open

        def open_hashed(file, mode="r", *args, **kwargs):
            opened = builtin_open(file, mode, *args, **kwargs)
            if mode == "wb" and str(file).endswith(DATA_SUFFIX):
                return _HashedFile(opened, str(file), failures)
            return opened

        patcher.setattr(writer, "open", open_hashed)

    return Fix(
        "seam:checksums-as-written",
        f"megatron/core/dist_checkpointing/strategies/filesystem_async.py:364 "
        f"FileSystemWriterAsync.write_preloaded_data (`open_file = open`, :400 "
        f"`open_file(file_name, \"wb\")`) ({VERSION})",
        "Megatron writes no checksums (its --verify-integrity reads every file again after "
        "the save); the writer's own file stream hashes the bytes as they are written",
        lambda: source_has(megatron_module(_WRITER).FileSystemWriterAsync.write_preloaded_data,
                           "open_file = open", 'open_file(file_name, "wb")'),
        apply, SEAM)


@contextlib.contextmanager
def checksummed_saves() -> Iterator[None]:
    """Inside the block, torch_dist saves write the checksum manifest: for what saves
    outside a run (`megatron_run` applies the seam for runs), e.g. a benchmark."""
    patcher = Patcher()
    checksums_as_written([]).apply(patcher)
    try:
        yield
    finally:
        patcher.undo()


# --- the manifest of an async save ----------------------------------------------------------------

_RANK_FILE = re.compile(r"__(\d+)_\d+" + re.escape(DATA_SUFFIX) + "$")  # the writer's names (:495)


def write_manifest_from_files(directory: str, rank: int) -> list[str]:
    """Writes the manifest entries of the data files rank `rank` wrote into `directory`
    (`[prefix]__RANK_N.distcp`) that have none, each hashed from the finished file: for
    the writes no seam saw, those of an async save's worker process. Returns their names."""
    written = []
    for name in data_files(directory):
        found = _RANK_FILE.search(name)
        path = os.path.join(directory, name)
        if found and int(found.group(1)) == rank and not os.path.isfile(_entry_path(path)):
            write_entry(path, *file_crc32(path))
            written.append(name)
    return written


def manifest_after_async_save() -> Fix:
    """An async torch_dist save (`--async-save`) writes its files in Megatron's worker
    process (a forkserver child with the persistent worker), where `checksums_as_written`
    is not applied: the save's finalization (on every rank, once every rank's writes are
    done) writes each rank's entries from its finished files, before Megatron's own
    finalization names the checkpoint in the tracker file."""

    def apply(patcher: Patcher) -> None:
        package = megatron_module("megatron.core.dist_checkpointing")
        save = package.save

        @wraps(save)
        def save_then_manifest(sharded_state_dict, checkpoint_dir, *args, **kwargs):
            request = save(sharded_state_dict, checkpoint_dir, *args, **kwargs)
            if request is not None and hasattr(request, "add_finalize_fn"):
                request.add_finalize_fn(lambda: _manifest_of_this_rank(str(checkpoint_dir)))
            return request

        patcher.setattr(package, "save", save_then_manifest)

    return Fix(
        "seam:manifest-after-async-save",
        f"megatron/core/dist_checkpointing/serialization.py:349 save (returns the async "
        f"request, async_utils.py:124 add_finalize_fn), training/checkpointing.py:827 (the "
        f"save), :1073 (the tracker's finalize fn, added after) ({VERSION})",
        "an async save's files are written in Megatron's worker process, which no seam of "
        "this process hashes: they had no manifest and their loads were not verified",
        lambda: source_has(megatron_module("megatron.core.dist_checkpointing.serialization")
                           .save, "async_sharded_save") and
        source_has(megatron_checkpointing().save_checkpoint,
                   "async_save_request.add_finalize_fn(iter_finalize_fn)"),
        apply, SEAM)


def _manifest_of_this_rank(directory: str) -> None:
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    write_manifest_from_files(directory, dist.get_rank() if distributed else 0)
    if distributed:  # every rank's entries exist before rank 0 updates the tracker
        dist.barrier()


# --- verifying before a load ---------------------------------------------------------------------

def checkpoint_to_load(args, load_arg: str = "load") -> str | None:
    """The iteration folder Megatron's load_checkpoint will read (`--ckpt-step` or the
    tracker's), or None where there is none."""
    checkpointing = megatron_checkpointing()
    load_dir = getattr(args, load_arg, None)
    if not load_dir:
        return None
    tracker = checkpointing.get_checkpoint_tracker_filename(load_dir)
    if getattr(args, "ckpt_step", None) is not None:
        iteration, release = args.ckpt_step, False
    elif os.path.isfile(tracker):
        iteration, release = checkpointing.read_metadata(tracker)
    else:
        return None
    directory = checkpointing.get_checkpoint_name(load_dir, iteration, release,
                                                  return_base_dir=True)
    return directory if os.path.isdir(directory) else None


def _refuse_a_missing_step(args, load_arg: str) -> None:
    """--ckpt-step N names an iteration the --load folder has no checkpoint of: said with
    the ones it has, rather than Megatron's FileNotFoundError of the folder."""
    load_dir, step = getattr(args, load_arg, None), getattr(args, "ckpt_step", None)
    if not load_dir or step is None or not os.path.isdir(load_dir):
        return
    if os.path.isdir(megatron_checkpointing().get_checkpoint_name(load_dir, step, False,
                                                          return_base_dir=True)):
        return
    raise CheckpointMismatch(missing_step(load_dir, step))


def saved_iterations(folder: str) -> list[int]:
    """The iterations a checkpoint folder holds (its `iter_N` folders), in order."""
    prefix = "iter_"
    return sorted(int(name[len(prefix):]) for name in os.listdir(folder)
                  if name.startswith(prefix) and name[len(prefix):].isdigit()
                  and os.path.isdir(os.path.join(folder, name)))


def missing_step(folder: str, step: int) -> str:
    """What to say of `--ckpt-step STEP` where `folder` has no checkpoint of it."""
    held = saved_iterations(folder)
    return (f"--ckpt-step {step}: no checkpoint of iteration {step} in {folder} ("
            + (f"it has {', '.join(map(str, held))})" if held else "it has none)"))


def verified_load() -> Fix:
    """Before `load_checkpoint` reads a torch_dist checkpoint, its files are checked
    (`verify_checkpoint`); without a manifest, rank 0 says once that they were not."""

    def apply(patcher: Patcher) -> None:
        checkpointing = megatron_checkpointing()
        load_checkpoint = checkpointing.load_checkpoint
        told: set[str] = set()  # folders said to be unverified (once each, per run)

        @wraps(load_checkpoint)
        def verify_then_load(*args, **kwargs):
            import torch.distributed as dist
            from megatron.core.dist_checkpointing.core import check_is_distributed_checkpoint
            from megatron.training import get_args

            load_arg = kwargs.get("load_arg", args[3] if len(args) > 3 else "load")
            _refuse_a_missing_step(get_args(), load_arg)
            directory = checkpoint_to_load(get_args(), load_arg)
            if directory is not None and check_is_distributed_checkpoint(directory):
                verified = verify_checkpoint(directory)
                first = not dist.is_initialized() or dist.get_rank() == 0
                if not verified and first and directory not in told:
                    told.add(directory)
                    print(f" megaseek: {directory} has no checksum manifest (saved "
                          "without megaseek's checksums): its files are not verified",
                          flush=True)
            return load_checkpoint(*args, **kwargs)

        patcher.setattr(checkpointing, "load_checkpoint", verify_then_load)
        training = megatron_training()
        if getattr(training, "load_checkpoint", None) is load_checkpoint:
            patcher.setattr(training, "load_checkpoint", verify_then_load)

    return Fix(
        "seam:verified-load",
        f"megatron/training/checkpointing.py:2066 load_checkpoint (load_dir from "
        f"args.<load_arg> :2093, iteration from the tracker or --ckpt-step) ({VERSION})",
        "Megatron loads a damaged file silently (4 KiB of random bytes in a .distcp loaded "
        "and trained on until a NaN gradient norm); the files are checked first",
        lambda: source_has(megatron_checkpointing().load_checkpoint,
                           "load_dir = getattr(args, load_arg)"),
        apply, SEAM)


# --- a save that fails --------------------------------------------------------------------------

def failed_save_named(failures: list) -> Fix:
    """A save whose file writes failed (torch's CheckpointException, raised on every rank)
    raises CheckpointSaveFailed naming the OS error and the file, after rank 0 has removed
    the partial iteration folder. `failures`: the OSErrors `checksums_as_written` kept."""

    def apply(patcher: Patcher) -> None:
        checkpointing = megatron_checkpointing()
        save_checkpoint = checkpointing.save_checkpoint

        @wraps(save_checkpoint)
        def save_or_name_the_failure(iteration, *args, **kwargs):
            from torch.distributed.checkpoint.api import CheckpointException

            failures.clear()
            try:
                return save_checkpoint(iteration, *args, **kwargs)
            except CheckpointException as error:
                raise _save_failure(iteration, failures) from error

        patcher.setattr(checkpointing, "save_checkpoint", save_or_name_the_failure)
        training = megatron_training()
        if getattr(training, "save_checkpoint", None) is save_checkpoint:
            patcher.setattr(training, "save_checkpoint", save_or_name_the_failure)

    return Fix(
        "seam:failed-save-named",
        "megatron/core/dist_checkpointing/strategies/filesystem_async.py:284-332 (a "
        "worker's exception becomes `RuntimeError(<class 'OSError'>)`), "
        "state_dict_saver.py:258 (CheckpointException on every rank), "
        f"training/checkpointing.py:552 save_checkpoint ({VERSION})",
        "a full disk fails the save with `Worker failure ... <class 'OSError'>` or "
        "`unexpected pos 704 vs 598` on another rank, and leaves the partial iter_N "
        "folder; the error names the OS error and the file, and the folder is removed",
        lambda: source_has(megatron_module(_WRITER).FileSystemWriterAsync
                           .write_preloaded_data_multithread,
                           "An error is caught while starting worker"),
        apply, SEAM)


def _save_failure(iteration: int, failures: list) -> CheckpointSaveFailed:
    import torch.distributed as dist
    from megatron.training import get_args

    checkpointing = megatron_checkpointing()
    args = get_args()
    mine = [f"{f.strerror} [errno {f.errno}]: {f.filename}" for f in failures]
    gathered: list[Any] = [mine]
    if dist.is_initialized():  # every rank raised: every rank gathers
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
    errors = [e for rank_errors in gathered for e in rank_errors] or [
        "the writer failed without an OS error (see the traceback above)"]
    partial = checkpointing.get_checkpoint_name(args.save, iteration, return_base_dir=True)
    tracker = checkpointing.get_checkpoint_tracker_filename(args.save)
    last = checkpointing.read_metadata(tracker)[0] if os.path.isfile(tracker) else None
    if (not dist.is_initialized() or dist.get_rank() == 0) and os.path.isdir(partial) \
            and last != iteration:
        shutil.rmtree(partial, ignore_errors=True)
    kept = (f"--load {args.save} reads the last complete one, iteration {last}"
            if last is not None else "there is no complete checkpoint there")
    return CheckpointSaveFailed(
        f"--save {args.save}: saving iteration {iteration} failed: {errors[0]}"
        + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
        + f"; the partial {os.path.basename(partial)} was removed; {kept}")
