"""The frame of a run with the plugins, for both launch paths (`megaseek pretrain` and
`megaseek launch SCRIPT`).

`megatron_run(registry)` makes the run's plan (`plugins.RunPlan`) once, when Megatron
validates its arguments, just before: the enabled plugins, their configs, and the Megatron
arguments they set (applied and said in the start-up log, so that Megatron validates what
will run). `enable(run)` then applies the upstream fixes the plan's plugins need and
attaches their hooks to Megatron through the seams of `upstream.seams` (a module each);
every change goes through the run's Patcher, so that all are undone when the run ends.
Nothing here knows any plugin by name.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from typing import Callable, NoReturn

from plugins import Enabled, PluginError, PluginRegistry, RunPlan
from upstream import checkpoint_files, compat, cpu, mtp_training_log, mtp_validation, wgrad
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


class MegatronRun:
    """One run inside `megatron_run`: the Patcher that takes its changes, and its plan,
    made once from Megatron's parsed arguments."""

    def __init__(self, registry: PluginRegistry, patcher: Patcher) -> None:
        self.registry, self.patcher = registry, patcher
        self._plan: RunPlan | None = None
        self._planned_args: argparse.Namespace | None = None

    @property
    def plan(self) -> RunPlan:
        if self._plan is None:
            raise RuntimeError("the run has no plan yet: it is made when Megatron validates "
                               "its arguments (parse_and_validate_args)")
        return self._plan

    def make_plan(self, args: argparse.Namespace, checked: bool = True) -> RunPlan:
        """The plan of `args`, made once per run; its overrides set on `args` and said on
        rank 0. `checked=False`: the saved arguments of a checkpoint (see
        `PluginRegistry.plan`)."""
        if self._plan is not None:
            if args is not self._planned_args:
                raise RuntimeError("a run is planned once: Megatron's arguments were "
                                   "validated a second time, with other arguments")
            return self._plan
        plan = self.registry.plan(args, checked=checked)
        said = plan.enabled_by_their_flags(args) + plan.apply_overrides(args)
        if checked and said and int(os.environ.get("RANK", "0")) == 0:
            print("\n".join(said), flush=True)
        self._plan, self._planned_args = plan, args
        return plan


@contextlib.contextmanager
def megatron_run(registry: PluginRegistry):
    """The frame of one run, for both entry points; yields its `MegatronRun`. Inside the
    block:
    - the fixes this machine needs are in place (`upstream.compat`; `upstream.cpu` without
      CUDA), and the run's Patcher takes the run's own changes; all are undone at its end;
    - the run's plan is made (the plugins' start-up checks included) before Megatron
      validates its arguments, with the plugins' overrides applied;
    - megaseek's checks of Megatron's own flags (`integration.argument_checks`) run around
      Megatron's validation;
    - a checkpoint that does not fit the model, or whose learning-rate schedule differs
      from the run's, fails naming the flags;
    - checkpoints are saved with a checksum manifest and verified before a load; a save
      that fails names the OS error and leaves no partial folder (`upstream.checkpoint_files`);
    - evaluation reports the MTP layers' loss beside the main loss (`upstream.mtp_validation`);
      training logs it over the iterations it logs the main loss over, skipped ones left
      out (`upstream.mtp_training_log`);
    - a command line Megatron's parser refuses, or a configuration the plugins (or
      Megatron's own checks) refuse, ends the run as argparse does: one line,
      `megaseek: error: ...`, on rank 0 only, and exit status 2 on every rank."""
    # Megatron checks --delay-wgrad-compute before any plugin is enabled: its narrowed
    # check goes in first (upstream.wgrad).
    installed = [compat.install(), cpu.install(),
                 apply_fixes([wgrad.DELAY_WGRAD_ARGUMENTS], Patcher())]
    patcher = Patcher()
    run = MegatronRun(registry, patcher)

    def before_megatron(args: argparse.Namespace) -> None:
        _checks_before_megatron(args)
        run.make_plan(args)

    try:
        argument_errors_refused().apply(patcher)
        checks_before_argument_dump(_start_up_checks, before_megatron).apply(patcher)
        checkpoint_mismatch_named().apply(patcher)
        scheduler_mismatch_named().apply(patcher)
        mtp_validation.MTP_VALIDATION_LOSS.apply(patcher)
        mtp_training_log.MTP_LOSS_OF_SKIPPED_ITERATIONS.apply(patcher)
        write_failures: list = []  # this process's failed checkpoint writes
        for fix in (checkpoint_files.checksums_as_written(write_failures),
                    checkpoint_files.manifest_after_async_save(),
                    checkpoint_files.verified_load(),
                    checkpoint_files.failed_save_named(write_failures)):
            fix.apply(patcher)
        yield run
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
        # torchrun's SIGTERM ends the wait as a normal exit, so that atexit still shuts
        # down what the run started (Megatron's checkpoint writer keeps a multiprocessing
        # Manager, filesystem_async.py:53-66, which the signal's default would orphan).
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm(status))
        try:
            time.sleep(RANK0_FIRST_S)
        finally:
            signal.signal(signal.SIGTERM, previous)
    raise SystemExit(status) from None


def _exit_on_sigterm(status: int) -> Callable[..., NoReturn]:
    def handler(*unused) -> NoReturn:
        raise SystemExit(status)
    return handler


def _checks_before_megatron(args: argparse.Namespace) -> None:
    """megaseek's checks of Megatron's flags whose values Megatron's own validation would
    misread or crash on (`integration.argument_checks`); Megatron parsed `sys.argv`."""
    from integration import argument_checks

    argument_checks.before_megatron(args, sys.argv[1:])


def _start_up_checks(args: argparse.Namespace) -> None:
    """Once Megatron has validated its arguments: Transformer Engine where the flag asks for
    it, megaseek's checks of Megatron's flags that need the machine or the layout, then
    those of what megaseek builds itself (MTP's placement) and of the checkpoint folders."""
    from integration import argument_checks, checkpoint_paths, mtp, transformer_engine

    transformer_engine.check_installed(args)
    argument_checks.after_megatron(args)
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


def enable(run: MegatronRun, model_only: bool = False) -> RunPlan:
    """Attaches the run plan's plugins to Megatron; returns the plan. With `model_only` (a
    tool that builds a checkpoint's model without training it) only what shapes the model
    attaches: fixes, specs, schedule and placement; no step, end of training, checkpoint
    state or evaluation hooks."""
    plan, patcher = run.plan, run.patcher
    for plugin in plan.plugins:
        if plugin.fixes is not None:
            apply_fixes(plugin.fixes(), patcher)

    def apply(seam) -> None:
        seam.apply(patcher)

    apply(model_specs(plan.transform_spec))
    scheduling = _the_one(plan.plugins, "schedule", "provide a pipeline schedule")
    if scheduling is not None:
        apply(schedule(scheduling.schedule()))
    placing = _the_one(plan.plugins, "placement", "place the pipeline stages")
    if placing is not None:
        stages = placing.placement()
        stages.check()
        apply(pipeline_placement(stages))
    if not model_only:
        _attach_run_hooks([plugin.run_hooks() for plugin in plan.plugins], apply)
    return plan


def _the_one(plugins: tuple[Enabled, ...], hook: str, what: str) -> Enabled | None:
    """The plugin providing `hook`; two are refused (slots normally catch this first)."""
    providing = [p for p in plugins if getattr(p, hook) is not None]
    if len(providing) > 1:
        raise PluginError("--plugins: " + " and ".join(p.name for p in providing)
                          + f" both {what}; enable only one")
    return providing[0] if providing else None


def _attach_run_hooks(hooks: list, apply: Callable) -> None:
    """The run-time hooks, called with the model chunks Megatron builds (known once it
    builds the optimizer for them)."""
    chunks = _ModelChunks()
    step_hooks = [h for h in hooks if h.on_optimizer_step is not None]

    def callbacks_for(model_chunks, optimizer):
        chunks.chunks = model_chunks
        return [h.on_optimizer_step(model_chunks, optimizer) for h in step_hooks]

    apply(after_optimizer_step(callbacks_for))

    checking = [h for h in hooks if h.before_gradient_checks is not None]
    if checking:
        checks: list = []

        def gradient_checks() -> list:
            if not checks:
                checks.extend(h.before_gradient_checks(chunks.get()) for h in checking)
            return checks

        apply(before_gradient_checks(gradient_checks))

    ending = [h for h in hooks if h.on_training_end is not None]
    if ending:
        def training_ended() -> None:
            for h in ending:
                h.on_training_end(chunks.get())

        apply(after_training(training_ended))

    stateful = [h for h in hooks if h.checkpoint_state is not None]
    if stateful:
        states: dict = {}

        def plugin_states() -> dict:
            if not states:
                states.update({h.name: h.checkpoint_state(chunks.get()) for h in stateful})
            return states

        apply(checkpoint_state(plugin_states))

    evaluating = [h for h in hooks if h.evaluation is not None]
    if evaluating:
        passes: list | None = None

        def plugin_passes() -> list:
            nonlocal passes
            if passes is None:  # a hook answers None when the run asks for no extra pass
                passes = [found for found in (h.evaluation(chunks.get()) for h in evaluating)
                          if found is not None]
            return passes

        apply(evaluation_passes(plugin_passes))
