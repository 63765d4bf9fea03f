"""Run a tool on a checkpoint's model: Megatron started with the arguments the checkpoint
was saved with, on the layout it was saved at, its model built (with its plugins' specs)
but no optimizer and no data. `megaseek ema-export` is such a tool
(`integration.ema_export`).

A tool is a module with `parse(argv, parser_class)` (options with `load` and `ckpt_step`;
argparse's refusals said by `parser_class`),
`output_folder(options)` (the folder it writes and whether it may replace it: checked
first, `integration.output_dir`, so that it never writes over its input),
`check_checkpoint(options, keys)` (the checkpoint's sharded keys), `run_arguments(saved,
options)` (the saved arguments as the tool's run wants them) and `run(model_chunks)`.

The saved arguments are Megatron's validated ones, so they are used as they are rather
than parsed again; hence the tool runs on as many ranks as the run that saved the
checkpoint. Started without torchrun, it starts itself under torchrun with that many
ranks on this machine (as the demo does); started under torchrun, the world size must
match.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from types import ModuleType
from typing import Callable

import integration  # noqa: F401  (makes megatron.training importable on Python 3.11)
from integration import checkpoint_folder, hooks
from integration.output_dir import OutputFolderError, check_output_folder
from integration.refusals import Parser
from plugins import PluginError, PluginRegistry, default_registry
from upstream import checkpoint_files, shutdown


def checkpoint_directory(load: str, step: int | None, flag: str | None = "--load",
                         steps: bool = True) -> str:
    """The iteration folder `--load` (and `--ckpt-step`) names, as Megatron finds it
    (`integration.checkpoint_folder`); a refusal names it after `flag` (None: a positional
    argument), as the user gave it, and --ckpt-step where the command has it (`steps`)."""
    directory = checkpoint_folder.iteration_folder(load, step, flag, steps) \
        if os.path.isdir(load) else None
    if directory is None:
        named = f"{flag} {load}" if flag else load
        raise PluginError(f"{named}: no checkpoint there (no {checkpoint_folder.TRACKER})")
    return directory


def check_format(directory: str) -> None:
    """The tools read Megatron's torch_dist checkpoints only."""
    from megatron.core.dist_checkpointing.core import check_is_distributed_checkpoint

    if not check_is_distributed_checkpoint(directory):
        raise PluginError(f"{directory}: not a torch_dist checkpoint (--ckpt-format torch_dist)")


def verify(directory: str, steps: bool = True) -> None:
    """The checkpoint's data files against its checksum manifest, in this process (as
    `--load` verifies them: `upstream.checkpoint_files`), before anything reads them: a
    damaged file is named, and --ckpt-step where the command has it (`steps`). A
    checkpoint without a manifest is read unverified, as `--load` reads it."""
    if os.environ.get(_VERIFIED) == os.path.abspath(directory):
        return  # verified by the process that started this one under torchrun
    way_out = ("Give an earlier checkpoint (--ckpt-step N)" if steps else
               "Name an earlier iteration in its latest_checkpointed_iteration.txt")
    try:
        checkpoint_files.verify_checkpoint(directory, f"{way_out} or restore the file")
    except checkpoint_files.CheckpointCorrupt as error:
        raise PluginError(str(error)) from None


_VERIFIED = "MEGASEEK_TOOL_VERIFIED_CHECKPOINT"


def saved_arguments(directory: str) -> argparse.Namespace:
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    check_format(directory)
    saved = load_common_state_dict(directory).get("args")
    if saved is None:
        raise PluginError(f"{directory}: the checkpoint holds no saved arguments")
    return saved


def checkpoint_keys(directory: str) -> set[str]:
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    return set(load_sharded_metadata(directory))


def relaunched(world_size: int, command: list[str], verified: str | None = None) -> bool:
    """Under torchrun: checks the world size and returns False (go on). Otherwise runs this
    program again (`-m integration.cli`, the `megaseek` script, or a script that passes its
    own registry) with `command` under torchrun on `world_size` ranks, and returns True
    once it has succeeded; `verified`: the checkpoint folder this process has verified
    (the ranks do not verify it again before they read it)."""
    if "WORLD_SIZE" in os.environ:
        if int(os.environ["WORLD_SIZE"]) != world_size:
            raise PluginError(f"the checkpoint was saved by {world_size} ranks; start "
                              f"`megaseek {command[0]}` on {world_size} ranks (or without "
                              f"torchrun), not {os.environ['WORLD_SIZE']}")
        return False
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = ["-m", spec.name] if spec is not None else [sys.argv[0]]
    marked = {_VERIFIED: os.path.abspath(verified)} if verified else {}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(world_size), *program, *command],
                          env={**os.environ, **marked})
    if done.returncode != 0:
        raise SystemExit(done.returncode)
    return True


def on_checkpoint_model(args: argparse.Namespace, tool: Callable[[list], None],
                        registry: PluginRegistry | None = None) -> None:
    """On this rank: Megatron initialised with `args` (a checkpoint's saved arguments, as
    the tool wants them), the model built, `tool(model_chunks)`, the run ended."""
    registry = registry or default_registry()
    with hooks.megatron_run(registry) as run:
        from megatron.core.enums import ModelType
        from megatron.training.global_vars import set_global_variables
        from megatron.training.initialize import initialize_megatron
        from megatron.training.training import get_model

        from integration import gpt

        args.rank, args.local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        # The weights are read into Megatron's local modules, whatever the run trained
        # with: its local GPT spec saves under Transformer Engine's keys (gpt_layer_specs.py
        # sharded_state_dict_keys_map), and the tools run where TE may not be installed.
        args.transformer_impl = "local"
        set_global_variables(args, build_tokenizer=False)
        run.make_plan(args, checked=False)  # its run was checked when it started
        hooks.enable(run, model_only=True)  # the checkpoint's model only
        initialize_megatron(allow_no_cuda=True)  # on GPU this only skips an assertion
        tool(get_model(gpt.model_provider, ModelType.encoder_or_decoder, wrap_with_ddp=False))
    shutdown.end_run()


def main(argv: list[str], command: str, tool: ModuleType,
         registry: PluginRegistry | None = None) -> None:
    """`megaseek COMMAND ARGV`."""
    options = tool.parse(argv, Parser)
    out, overwrite = tool.output_folder(options)
    try:
        check_output_folder(out, overwrite=overwrite, inputs=[options.load])
    except OutputFolderError as error:
        hooks.exit_refused(PluginError(f"{command} --save {error}"))
    try:
        directory = checkpoint_directory(options.load, options.ckpt_step)
        check_format(directory)
        verify(directory)
        # what the tool needs first: a checkpoint without it (one that `megaseek convert`
        # wrote holds no saved arguments either) is refused for what the tool needs
        tool.check_checkpoint(options, checkpoint_keys(directory))
        saved = saved_arguments(directory)
        if relaunched(saved.world_size, [command, *argv], verified=directory):
            return
    except PluginError as error:
        hooks.exit_refused(error)
    on_checkpoint_model(tool.run_arguments(saved, options), tool.run, registry)
