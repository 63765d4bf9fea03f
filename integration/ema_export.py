"""`megaseek ema-export --load CKPT --save OUT`: the EMA of a checkpoint as an ordinary
Megatron checkpoint of the model (no optimizer, no RNG, no EMA state), which `--load`
accepts for evaluation, training on, or `--finetune`.

The export runs Megatron with the checkpoint's own arguments, minus the `ema` plugin, and
builds the model without an optimizer (`integration.checkpoint_tool`). Megatron's
`load_checkpoint` then reads each weight from its EMA key (`megaseek:ema.<the weight's
key>`, sharded like the weight), and Megatron's `save_checkpoint` writes the model as
`--no-save-optim --no-save-rng` would. Load it as Megatron loads those:
`--load OUT --no-load-optim --no-load-rng`, or `--finetune` (without them Megatron's
load still asks for the optimizer: megatron/training/checkpointing.py:2555-2573). Buffers
that the EMA does not follow (e.g. the router's expert bias) are the checkpoint's own.

Nothing of the input is lost: an output that is, holds or lies inside the input is
refused (`integration.checkpoint_tool` checks `output_folder` first), and an existing
output is replaced only with `--overwrite`, once the new export is complete (it is written
into a hidden sibling first, `staging_folder`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from plugins import PluginError
from plugins.config import flags
from plugins.ema.plugin import CHECKPOINT_PREFIX, EMA


def parse(argv: list[str],
          parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
          ) -> argparse.Namespace:
    """`parser_class`: how the command says a refusal (`integration.refusals.Parser`)."""
    parser = parser_class(
        prog="megaseek ema-export",
        description="Write the EMA weights of a checkpoint saved with --plugins ema as an "
                    "ordinary Megatron checkpoint (no optimizer state).")
    parser.add_argument("--load", required=True, metavar="CKPT",
                        help="the checkpoint folder (--save of the run), torch_dist format")
    parser.add_argument("--save", required=True, metavar="OUT", help="where to write it")
    parser.add_argument("--overwrite", action="store_true", default=False,
                        help="replace an existing OUT (once the new export is complete)")
    parser.add_argument("--ckpt-step", type=int, default=None, metavar="N",
                        help="the iteration to export (default: the latest)")
    return parser.parse_args(argv)


def output_folder(options: argparse.Namespace) -> tuple[str, bool]:
    """OUT, and whether an existing one may be replaced (checked before anything is read:
    never the input, inside it or around it)."""
    return options.save, options.overwrite


def check_checkpoint(options: argparse.Namespace, checkpoint_keys: set[str]) -> None:
    if not any(key.startswith(CHECKPOINT_PREFIX + ".") for key in checkpoint_keys):
        raise PluginError(f"ema-export needs a checkpoint saved by training with --plugins "
                          f"ema; {options.load} holds no EMA (no {CHECKPOINT_PREFIX}.* "
                          "weights)")


def _ema_dests() -> list[str]:
    """The argument names the `ema` plugin adds, as its config declares them."""
    return [declared.dest for _, declared in flags(EMA.config)]


def run_arguments(saved: argparse.Namespace, options: argparse.Namespace) -> argparse.Namespace:
    """The run's saved arguments for the export: without the `ema` plugin (the EMA becomes
    the weights), reading `--load` without its optimizer and RNG state, saving to `--save`
    without them, and writing no logs of its own."""
    args = copy.copy(saved)
    args.plugins = [name for name in saved.plugins if name != "ema"]
    for dest in _ema_dests():  # unset: the registry fills in the defaults
        if hasattr(args, dest):
            delattr(args, dest)
    args.load, args.ckpt_step = options.load, options.ckpt_step
    args.save = staging_folder(options.save)  # moved to OUT once complete (run)
    args.no_load_optim = args.no_load_rng = True
    args.no_save_optim = args.no_save_rng = True
    args.finetune = args.async_save = False
    args.tensorboard_dir = args.wandb_project = None
    return args


@contextlib.contextmanager
def ema_as_weights(model_chunks: list) -> Iterator[None]:
    """Inside the block each chunk's `sharded_state_dict()` names every trained weight by
    its EMA key, so that a checkpoint load fills the weights with the EMA."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    followed = {id(p) for chunk in model_chunks for p in chunk.parameters() if p.requires_grad}

    def ema_key(value: Any) -> Any:
        # ShardedTensor or ShardedTensorFactory (e.g. SwiGLU's fc1 at TP > 1), as saved
        # by make_sharded_optimizer_tensor in plugin.EMACheckpointState.
        if isinstance(value, ShardedBase) and id(getattr(value, "data", None)) in followed:
            return dataclasses.replace(value, key=f"{CHECKPOINT_PREFIX}.{value.key}")
        return value

    def renamed(build: Callable[..., dict]) -> Callable[..., dict]:
        return lambda *args, **kwargs: dict_list_map_inplace(ema_key, build(*args, **kwargs))

    # An instance attribute shadows the method, for this block. A chunk may have one of its
    # own already (a mirrored stage's copy marks its tensors as replicas: plugins.dualpipe.
    # placement._same_weights_as_first_copy), which the save after the block needs again.
    own = [vars(chunk).get("sharded_state_dict") for chunk in model_chunks]
    for chunk in model_chunks:
        chunk.sharded_state_dict = renamed(chunk.sharded_state_dict)
    try:
        yield
    finally:
        for chunk, kept in zip(model_chunks, own):
            if kept is None:
                del chunk.sharded_state_dict
            else:
                chunk.sharded_state_dict = kept


def export(model_chunks: list, load_checkpoint: Callable, save_checkpoint: Callable) -> int:
    """Megatron's load with the EMA in place of the weights, then Megatron's save (the
    arguments from `run_arguments`). Returns the exported iteration."""
    from megatron.core.utils import unwrap_model

    with ema_as_weights(unwrap_model(list(model_chunks))):  # the modules Megatron's load asks
        iteration, flops = load_checkpoint(model_chunks, None, None)
    save_checkpoint(iteration, model_chunks, None, None, flops)
    return iteration


_STAGED = ".ema-export-partial"


def staging_folder(out: str) -> str:
    """The hidden sibling of OUT the export writes into (the same on every rank)."""
    out_path = Path(out)
    return str(out_path.parent / f".{out_path.name}{_STAGED}")


def _destination(staging: str) -> Path:
    staged = Path(staging)
    return staged.parent / staged.name[1:-len(_STAGED)]


def _on_rank_0(action: Callable[[], None]) -> None:
    """`action()` on rank 0 between two barriers (the others wait for it)."""
    import torch

    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        action()
    torch.distributed.barrier()


def _clear(path: str | Path) -> None:
    """Removes a folder, a file or a link (not what the link names)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _publish(staging: str) -> None:
    """The complete export takes OUT's place; an OUT there before (--overwrite) goes only
    now."""
    out = _destination(staging)
    if os.path.lexists(out):
        old = out.parent / f".{out.name}.ema-export-old"
        _clear(old)
        out.rename(old)
        Path(staging).rename(out)
        _clear(old)
    else:
        Path(staging).rename(out)


def run(model_chunks: list) -> None:
    """The export on this rank, in the run `integration.checkpoint_tool` starts."""
    import functools

    from megatron.training import checkpointing, get_args, print_rank_0, training

    # Looked up now: the launch path wraps load_checkpoint (a mismatch names the flags).
    # Megatron's own saves drop the ranks from the saved arguments before comparing them
    # across ranks (training.py:963); so does this one.
    save = functools.partial(checkpointing.save_checkpoint,
                             preprocess_common_state_dict_fn=training.preprocess_common_state_dict)
    staging = get_args().save
    _on_rank_0(lambda: _clear(staging))  # what a failed export left there
    iteration = export(model_chunks, checkpointing.load_checkpoint, save)
    _on_rank_0(lambda: _publish(staging))
    print_rank_0(f"ema-export: the EMA weights of iteration {iteration} are saved as an "
                 "ordinary checkpoint (no optimizer state)")
