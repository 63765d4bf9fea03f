"""Enable the plugins on Megatron's parsed arguments: the one function both launch paths
(`megaseek pretrain` and `megaseek launch SCRIPT`) call.

`enable(registry, args, patcher)` checks the plugin flags, applies the upstream fixes the
enabled plugins need, and attaches their hooks to Megatron through the seams of
`upstream.seams` (a module each); every change goes through `patcher`, so the caller
undoes them all when the run ends. Nothing here knows any plugin by name.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import NoReturn

from plugins import Plugin, PluginError, PluginRegistry, transform_spec
from upstream import checkpoint_files, compat, cpu, wgrad
from upstream.patching import Patcher, apply_fixes
from upstream.seams.arguments import argument_errors_refused, checks_before_argument_dump
from upstream.seams.checkpoint_mismatch import checkpoint_mismatch_named
from upstream.seams.checkpoint_state import checkpoint_state
from upstream.seams.errors import CheckpointMismatch, MegatronRefused
from upstream.seams.evaluation import evaluation_passes
from upstream.seams.loop import (after_optimizer_step, after_training, before_gradient_checks,
                                 schedule)
from upstream.seams.model import model_specs
from upstream.seams.placement import pipeline_placement
from upstream.seams.scheduler_mismatch import scheduler_mismatch_named


@contextlib.contextmanager
def megatron_run(registry: PluginRegistry):
    """The frame of one run, for both entry points. Inside the block:
    - the fixes this machine needs are in place (`upstream.compat`; `upstream.cpu` without
      CUDA), and the yielded Patcher takes the run's own changes; all are undone at its end;
    - the plugins' start-up checks run before Megatron prints its argument dump;
    - megaseek's checks of Megatron's own flags (`integration.argument_checks`) run around
      Megatron's validation, the plugins' after it;
    - a checkpoint that does not fit the model, or whose learning-rate schedule differs
      from the run's, fails naming the flags;
    - checkpoints are saved with a checksum manifest and verified before a load; a save
      that fails names the OS error and leaves no partial folder (`upstream.checkpoint_files`);
    - a command line Megatron's parser refuses, or a configuration the plugins (or
      Megatron's own checks) refuse, ends the run as argparse does: one line,
      `megaseek: error: ...`, on rank 0 only, and exit status 2 on every rank."""
    # Megatron checks --delay-wgrad-compute before any plugin is enabled: its narrowed
    # check goes in first (upstream.wgrad).
    installed = [compat.install(), cpu.install(),
                 apply_fixes([wgrad.DELAY_WGRAD_ARGUMENTS], Patcher())]
    patcher = Patcher()
    try:
        argument_errors_refused().apply(patcher)
        checks_before_argument_dump(lambda args: _start_up_checks(registry, args),
                                    _checks_before_megatron).apply(patcher)
        checkpoint_mismatch_named().apply(patcher)
        scheduler_mismatch_named().apply(patcher)
        write_failures: list = []  # this process's failed checkpoint writes
        for fix in (checkpoint_files.checksums_as_written(write_failures),
                    checkpoint_files.manifest_after_async_save(),
                    checkpoint_files.verified_load(),
                    checkpoint_files.failed_save_named(write_failures)):
            fix.apply(patcher)
        yield patcher
    except (PluginError, MegatronRefused, CheckpointMismatch,
            checkpoint_files.CheckpointCorrupt) as error:
        exit_refused(error)
    except checkpoint_files.CheckpointSaveFailed as error:
        exit_refused(error, status=1)  # not a refusal: the run failed
    except FailedOnThisRank as error:  # only this rank knows: it says so, at once
        print(f"megaseek: error: rank {os.environ.get('RANK', '0')}: {error}",
              file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        patcher.undo()
        for fixes in reversed(installed):
            if fixes is not None:
                fixes.undo()


class FailedOnThisRank(RuntimeError):
    """A run that fails on what one rank alone has seen (a micro-batch of its data): that
    rank says it, in one line naming itself, and exits 1; torchrun then ends the others."""


# Seconds the other ranks wait before they exit on a refused configuration: torchrun ends
# the job at the first rank's exit, so a rank 1 that exited before rank 0 had printed took
# the one error line with it (seen under load in CI, 2026-11-26).
RANK0_FIRST_S = 10.0


def exit_refused(error: Exception, status: int = 2) -> NoReturn:
    """Ends a rank whose configuration is refused as argparse does: `megaseek: error: ...`
    on rank 0 only, exit `status` (2, argparse's) on every rank, rank 0 first (the others
    wait, and torchrun ends them as soon as rank 0 has exited)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"megaseek: error: {error}", file=sys.stderr, flush=True)
    else:
        time.sleep(RANK0_FIRST_S)
    raise SystemExit(status) from None


def _checks_before_megatron(args: argparse.Namespace) -> None:
    """megaseek's checks of Megatron's flags whose values Megatron's own validation would
    misread or crash on (`integration.argument_checks`); Megatron parsed `sys.argv`."""
    from integration import argument_checks

    argument_checks.before_megatron(args, sys.argv[1:])


def _start_up_checks(registry: PluginRegistry, args: argparse.Namespace) -> None:
    """Transformer Engine where the flag asks for it, megaseek's checks of Megatron's flags
    that need the machine or the layout, the plugins' checks, then those of what megaseek
    builds itself (MTP's placement) and of the checkpoint folders."""
    from integration import argument_checks, checkpoint_paths, mtp, transformer_engine

    transformer_engine.check_installed(args)
    argument_checks.after_megatron(args)
    registry.enabled(args)
    mtp.check_placement(args)
    checkpoint_paths.check(args)


class _ModelChunks:
    """The model chunks Megatron builds, known once it builds the optimizer for them."""

    def __init__(self) -> None:
        self.chunks: list | None = None

    def get(self) -> list:
        if self.chunks is None:
            raise RuntimeError("plugin state was asked for before Megatron built the model")
        return self.chunks


def enable(registry: PluginRegistry, args: argparse.Namespace, patcher: Patcher,
           model_only: bool = False) -> list[Plugin]:
    """Enables and attaches the plugins `args` names; returns them in registry order. With
    `model_only` (a tool that builds a checkpoint's model without training it) only what
    shapes the model attaches: fixes, specs, schedule and placement; no step, end of
    training, checkpoint state or evaluation hooks."""
    plugins = registry.enabled(args)
    for plugin in plugins:
        if plugin.fixes is not None:
            apply_fixes(plugin.fixes(args), patcher)

    def apply(seam) -> None:
        seam.apply(patcher)

    apply(model_specs(lambda spec: transform_spec(plugins, spec, args)))

    schedules = [p for p in plugins if p.schedule is not None]
    if len(schedules) > 1:  # slots normally catch this; a schedule hook without the slot too
        raise PluginError("--plugins: " + " and ".join(p.name for p in schedules)
                          + " both provide a pipeline schedule; enable only one")
    if schedules:
        apply(schedule(schedules[0].schedule(args)))

    placements = [p for p in plugins if p.placement is not None]
    if len(placements) > 1:
        raise PluginError("--plugins: " + " and ".join(p.name for p in placements)
                          + " both place the pipeline stages; enable only one")
    if placements:
        placement = placements[0].placement(args)
        placement.check()
        apply(pipeline_placement(placement))
    if model_only:
        return plugins

    chunks = _ModelChunks()
    step_hooks = [p for p in plugins if p.on_optimizer_step is not None]

    def callbacks_for(model_chunks, optimizer):
        chunks.chunks = model_chunks
        return [p.on_optimizer_step(args, model_chunks, optimizer) for p in step_hooks]

    apply(after_optimizer_step(callbacks_for))

    checking = [p for p in plugins if p.before_gradient_checks is not None]
    if checking:
        checks: list = []

        def gradient_checks() -> list:
            if not checks:
                checks.extend(p.before_gradient_checks(args, chunks.get()) for p in checking)
            return checks

        apply(before_gradient_checks(gradient_checks))

    ending = [p for p in plugins if p.on_training_end is not None]
    if ending:
        def training_ended() -> None:
            for plugin in ending:
                plugin.on_training_end(args, chunks.get())

        apply(after_training(training_ended))

    stateful = [p for p in plugins if p.checkpoint_state is not None]
    if stateful:
        states: dict = {}

        def plugin_states() -> dict:
            if not states:
                states.update({p.name: p.checkpoint_state(args, chunks.get()) for p in stateful})
            return states

        apply(checkpoint_state(plugin_states))

    evaluating = [p for p in plugins if p.evaluation is not None]
    if evaluating:
        passes: list | None = None

        def plugin_passes() -> list:
            nonlocal passes
            if passes is None:  # a hook answers None when the run asks for no extra pass
                passes = [found for found in (p.evaluation(args, chunks.get())
                                              for p in evaluating) if found is not None]
            return passes

        apply(evaluation_passes(plugin_passes))
    return plugins
