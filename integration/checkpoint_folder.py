"""What a checkpoint folder holds, read before Megatron reads it: the iteration folder its
load will open (`iteration_folder`), and, for `--load` at start-up, what the run may ask
of it (`check_load`).

Megatron finds these out late or not at all (megatron-core 0.19.2,
training/checkpointing.py): an iteration folder given as `--load`, a lost tracker file or
a `--load` path that does not exist is warned about (:1690) and the run trains from
scratch; a tracker file that is not a number stops the run with exit status 0 (:366); a
tracker naming a missing iteration, or an iteration folder without its `metadata.json`,
fails with a raw FileNotFoundError or NotImplementedError (:1612); a checkpoint without
optimizer state fails with `KeyError: 'optimizer'` once the model is built (:2555). Each
is refused here, naming the flag and what to give instead.

Where the optimizer state is loaded, the run's optimizer flags are compared with the
checkpoint's saved arguments: `--use-distributed-optimizer` added or dropped fails in
Megatron's load (`ShardedTensor.flattened_range is not supported`, or a missing key), and
the settings the optimizer state restores over the flags (Adam's betas and epsilon) would
have no effect: both are refused, naming `--no-load-optim`.

Megatron's auto-resume stays as documented: `--load D --save D` where D does not exist
yet, or a folder without checkpoints (or only a first save that did not finish), starts
from scratch.
"""

from __future__ import annotations

import argparse
import os
import re
import warnings

from plugins import PluginError
from upstream.checkpoint_files import missing_step, saved_iterations

TRACKER = "latest_checkpointed_iteration.txt"
_ITERATION_NAME = re.compile(r"^iter_(\d+)$")
# Megatron's optimizer state in a torch_dist checkpoint ("chained_N." with several groups)
_OPTIMIZER_KEY = re.compile(r"^(chained_\d+\.)?optimizer\.")


def iteration_folder(load: str, step: int | None, flag: str | None = "--load",
                     steps: bool = True) -> str | None:
    """The iteration folder Megatron's load reads from the checkpoint folder `load`
    (`--ckpt-step` `step`, or its tracker file's), None where `load` holds no checkpoint
    (an empty folder: a first run). Raises PluginError, naming `load` after `flag` (None:
    a positional argument), where the user meant a checkpoint Megatron cannot use; the
    way out names --ckpt-step where the command has it (`steps`)."""
    given = f"{flag} " if flag else ""
    named = given + load
    parent, name = os.path.split(os.path.normpath(load))
    if _is_checkpoint(load) and (_ITERATION_NAME.match(name) or name == "release"):
        found = _ITERATION_NAME.match(name)
        raise PluginError(
            f"{named} is an iteration folder of {parent}, not a checkpoint folder: give "
            f"{given}{parent}" + (f" (and --ckpt-step {int(found.group(1))} for this "
                                  "iteration)" if found and steps else ""))
    held = saved_iterations(load)
    tracker = os.path.join(load, TRACKER)
    if step is not None:
        directory = _iteration_path(load, step, release=False)
        if not os.path.isdir(directory):
            raise PluginError(missing_step(load, step))
        return _complete(directory, held, named, steps)
    if not os.path.isfile(tracker):
        # Complete iterations without the tracker: it was lost. (Incomplete ones alone are
        # a first save that did not finish: Megatron starts afresh, as it should.)
        complete = [i for i in held if _is_checkpoint(_iteration_path(load, i, False))]
        if complete:
            raise PluginError(
                f"{named} has {_listed(complete)} but no {TRACKER} (the file naming the "
                "latest checkpoint), so Megatron would train from scratch: "
                + (f"give --ckpt-step {complete[-1]} to load the latest, or " if steps else "")
                + f"write {complete[-1]} into {tracker}")
        return None
    iteration, release = _tracked(tracker, held, named, steps)
    directory = _iteration_path(load, iteration, release)
    if not os.path.isdir(directory):
        raise PluginError(
            f"{named}: {TRACKER} names " + ("'release'" if release else f"iteration {iteration}")
            + f", which is not in {load} ("
            + (f"it has {_listed(held)}): {_another(held[-1], tracker, steps)}" if held else
               "it has no iteration folder)"))
    return _complete(directory, held, named, steps)


def _another(iteration: int, tracker: str, steps: bool) -> str:
    """How to load `iteration` instead."""
    return (f"give --ckpt-step {iteration}" if steps else
            f"write {iteration} into {tracker}")


def check_load(args: argparse.Namespace) -> None:
    """`--load` at start-up: a path that does not exist is refused unless it is also
    `--save` (the auto-resume pattern); the iteration it names must be there and complete
    (`iteration_folder`); a checkpoint without optimizer state needs the run to say how to
    start it (`--no-load-optim` or `--finetune`, as Megatron's own message asks)."""
    load = getattr(args, "load", None)
    if not load:
        return
    if not os.path.exists(load):
        save = getattr(args, "save", None)
        if save and os.path.abspath(save) == os.path.abspath(load):
            return  # a run that resumes itself, started for the first time
        raise PluginError(f"--load {load}: no such folder; give the folder a run saved its "
                          "checkpoints in (its --save), or the same folder as --save for a "
                          "run that starts from scratch and resumes itself")
    directory = iteration_folder(load, getattr(args, "ckpt_step", None))
    if directory is not None:
        _check_format(args, load, directory)
    if directory is None or os.path.basename(directory) == "release":
        return  # nothing to load, or a release checkpoint: weights only, as Megatron reads it
    saved = _saved_arguments(directory) if "metadata.json" in os.listdir(directory) else None
    _say_mtp_left_behind(args, saved, load)
    if getattr(args, "no_load_optim", False) or getattr(args, "finetune", False):
        return
    keys = _sharded_keys(directory)
    if keys is None:
        return  # another format, or a damaged .metadata: Megatron's load says which
    if not any(_OPTIMIZER_KEY.match(key) for key in keys):
        raise PluginError(
            f"--load {load}: {directory} holds the model's weights only, no optimizer state "
            "(an ema-export output, or saved with --no-save-optim): give --no-load-optim to "
            "train on from its iteration with a new optimizer and learning-rate schedule, or "
            "--finetune to start at iteration 0")
    if saved is not None:
        _check_optimizer_flags(args, saved, load)


def _say_mtp_left_behind(args: argparse.Namespace, saved, load: str) -> None:
    """Rank 0 says once that MTP layers the checkpoint holds are not loaded: Megatron loads
    a checkpoint with unexpected keys without a word (its --dist-ckpt-strictness default),
    and the run's own checkpoints then lack them; a warning, since training on without
    MTP can be meant."""
    held = getattr(saved, "mtp_num_layers", None) or 0
    kept = getattr(args, "mtp_num_layers", None) or 0
    if held > kept and int(os.environ.get("RANK", "0")) == 0:
        print(f" megaseek: warning: --load {load} holds {held} MTP layer(s) (saved with "
              f"--mtp-num-layers {held}) and this run has --mtp-num-layers {kept}: the "
              f"weights of the MTP layers past {kept} are not loaded, and this run's "
              f"checkpoints will not have them", flush=True)


# The optimizer's settings that its saved state restores over the run's flags: torch's
# Optimizer.load_state_dict puts back each parameter group as saved (betas, eps,
# momentum), so a changed flag would have no effect. Megatron refuses a changed value of
# what it restores in the learning-rate schedule unless a flag says which wins
# (optimizer_param_scheduler.py:333); these have no such flag, so a change is refused,
# with the way to make it count: a new optimizer state. (--lr and --weight-decay are set
# into the groups at every step by the schedule, which checks them itself.)
# (muon and soap are not compared: which of their settings a load restores is not checked.)
_RESTORED = {"adam": ("adam_beta1", "adam_beta2", "adam_eps"), "sgd": ("sgd_momentum",),
             "lion": ("lion_beta1", "lion_beta2")}


def _check_optimizer_flags(args: argparse.Namespace, saved: argparse.Namespace,
                           load: str) -> None:
    """The run's optimizer flags against the checkpoint's saved ones, for a run that
    loads its optimizer state."""
    afresh = "or give --no-load-optim to start the optimizer state afresh"
    dist, saved_dist = (bool(getattr(a, "use_distributed_optimizer", False))
                        for a in (args, saved))
    if dist != saved_dist:
        said = "with" if saved_dist else "without"
        raise PluginError(
            f"--load {load}: the checkpoint's optimizer state was saved {said} "
            f"--use-distributed-optimizer and this run {'has' if dist else 'does not have'} "
            "it: Megatron 0.19.2 loads neither into the other (nor with "
            "--dist-ckpt-optim-fully-reshardable or --ckpt-fully-parallel-load): resume "
            f"{said} --use-distributed-optimizer, {afresh}")
    kind = getattr(args, "optimizer", None)
    if getattr(saved, "optimizer", kind) != kind:
        raise PluginError(f"--load {load}: the checkpoint's optimizer state is --optimizer "
                          f"{saved.optimizer}'s, this run has --optimizer {kind}: resume "
                          f"with --optimizer {saved.optimizer}, {afresh}")
    differ = [(name, getattr(saved, name), getattr(args, name, None))
              for name in _RESTORED.get(kind, ())
              if hasattr(saved, name) and getattr(saved, name) != getattr(args, name, None)]
    if differ:
        flags = "; ".join(f"--{name.replace('_', '-')} (checkpoint: {was}, this run: {now})"
                          for name, was, now in differ)
        raise PluginError(
            f"--load {load}: the checkpoint's optimizer state was saved with other settings, "
            f"which its load restores over this run's flags ({flags}): resume with the "
            f"checkpoint's values, {afresh} with this run's")


def _check_format(args: argparse.Namespace, load: str, directory: str) -> None:
    """Megatron reads a checkpoint in the format `--ckpt-format` names unless
    `--auto-detect-ckpt-format` is given (checkpointing.py:2111); the other format fails
    once the model is built, with a traceback (:1571 for torch_dist read as torch)."""
    if getattr(args, "auto_detect_ckpt_format", False):
        return
    names = os.listdir(directory)
    saved = ("torch_dist" if "metadata.json" in names else
             "torch" if any(n.startswith("mp_rank_") for n in names) else None)
    wanted = getattr(args, "ckpt_format", "torch_dist")
    if saved is None or saved == wanted or {saved, wanted} - {"torch", "torch_dist"}:
        return
    raise PluginError(
        f"--load {load}: {directory} is a {saved} checkpoint and this run reads "
        f"--ckpt-format {wanted}: give --ckpt-format {saved}, or --auto-detect-ckpt-format")


def _is_checkpoint(folder: str) -> bool:
    """An iteration folder's own files: a torch_dist, torch or torch_dcp checkpoint."""
    if not os.path.isdir(folder):
        return False
    names = os.listdir(folder)
    return ("metadata.json" in names or ".metadata" in names
            or any(n.startswith("mp_rank_0") for n in names))


def _iteration_path(load: str, iteration: int, release: bool) -> str:
    # Megatron's name (checkpointing.py get_checkpoint_name with return_base_dir)
    return os.path.join(load, "release" if release else f"iter_{iteration:07d}")


def _tracked(tracker: str, held: list[int], named: str, steps: bool) -> tuple[int, bool]:
    """The tracker's iteration (a number, or 'release'), read as Megatron reads it."""
    with open(tracker) as f:
        text = f.read().strip()
    if text == "release":
        return 0, True
    if text.isdigit():
        return int(text), False
    raise PluginError(
        f"{named}: {tracker} holds {text[:40]!r}, not an iteration number or 'release' "
        "(Megatron would stop without training)"
        + (f": {_another(held[-1], tracker, steps)} (it has {_listed(held)})" if held else ""))


def _complete(directory: str, held: list[int], named: str, steps: bool) -> str:
    """`directory`, if its checkpoint is complete enough for Megatron to tell its format."""
    if _is_checkpoint(directory):
        return directory
    tracker = os.path.join(os.path.dirname(directory), TRACKER)
    others = [i for i in held if _iteration_path(os.path.dirname(directory), i, False)
              != directory]
    raise PluginError(
        f"{named}: {directory} is not a complete checkpoint (no metadata.json, which a "
        "torch_dist save writes last, nor another format's files)"
        + (f": {_another(others[-1], tracker, steps)} to load another iteration (it has "
           f"{_listed(others)})" if others else ": restore it, or start afresh without "
           "--load"))


def _sharded_keys(directory: str) -> set[str] | None:
    """The keys of a torch_dist checkpoint (its .metadata only); None for other formats,
    or where it cannot be read (the load names what is damaged)."""
    from megatron.core.dist_checkpointing.core import check_is_distributed_checkpoint
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    try:
        if not check_is_distributed_checkpoint(directory):
            return None
        return set(load_sharded_metadata(directory))
    except _unreadable():
        return None


def _saved_arguments(directory: str) -> argparse.Namespace | None:
    """The arguments a torch_dist checkpoint was saved with; None where they cannot be
    read before the load: a damaged data file is named by the verified load
    (`upstream.checkpoint_files.verified_load`), which needs the ranks together."""
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    try:
        with warnings.catch_warnings():  # read before the ranks are together, by design
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            return load_common_state_dict(directory).get("args")
    except _unreadable():
        return None


def _unreadable() -> tuple[type[BaseException], ...]:
    from torch.distributed.checkpoint.api import CheckpointException

    return (CheckpointException, OSError, EOFError, RuntimeError, ValueError, KeyError)


def _listed(iterations: list[int]) -> str:
    return ", ".join(f"iter_{i:07d}" for i in iterations)
