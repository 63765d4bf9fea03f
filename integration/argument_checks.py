"""megaseek's start-up checks on Megatron's own arguments: the inputs megatron-core 0.19.2
accepts and then fails on after start-up (a ZeroDivisionError, a TypeError in the
optimizer, a SIGFPE in a data worker, a RuntimeError at process-group set-up, a write
that fails mid-run), refused at start-up instead, naming the flag, whatever plugins are
on. `hooks.megatron_run` runs them on both launch paths; `megaseek describe` runs the
value checks on the flags it shares.

They live here rather than in `upstream/`: they change nothing in Megatron (no patch to
undo, nothing a newer Megatron would make obsolete by itself), they are megaseek's policy
on what it lets start. Each names where Megatron fails without it, and
tests/test_argument_checks.py asserts that Megatron's own validation still lets each
input through (the check is still needed).

Two passes, with Megatron's `validate_args` between them:
- `before_megatron(args, argv)`: values on their own, which Megatron's own checks would
  misread or crash on (a negative --mtp-num-layers reads as "MTP on");
- `after_megatron(args)`: what needs the machine, the world's layout or the file system.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Callable

from plugins import PluginError
from plugins.common.paths import unwritable_directory


@dataclass(frozen=True)
class AtLeast:
    """`--flag` (argparse dest `dest`) must be `least` or more (and finite where `finite`),
    when given; `unless(args)` exempts a run that does not use it."""

    dest: str
    least: float
    megatron_fails: str  # what Megatron does with less (megatron-core 0.19.2)
    finite: bool = False
    unless: Callable[[argparse.Namespace], bool] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")

    def problem(self, args: argparse.Namespace) -> str | None:
        value = getattr(args, self.dest, None)
        if value is None or (self.unless is not None and self.unless(args)):
            return None
        if not value >= self.least or (self.finite and not math.isfinite(value)):
            least = int(self.least) if float(self.least).is_integer() else self.least
            return (f"{self.flag} {value} must be {least} or more"
                    + (" (and finite)" if self.finite else ""))
        return None


def _skips_training(args) -> bool:
    return bool(getattr(args, "skip_train", False))


AT_LEAST = (
    AtLeast("num_layers", 1, "an empty decoder, built and then divided by "
                             "(ZeroDivisionError)"),
    AtLeast("seq_length", 1, "gpt_dataset.py:523 and its C++ sample index divide by it: "
                             "the data worker dies of SIGFPE with no message"),
    AtLeast("log_interval", 1, "training.py:2816 iteration % log_interval "
                               "(ZeroDivisionError)"),
    AtLeast("eval_interval", 1, "training.py:4481 train_iters // eval_interval "
                                "(ZeroDivisionError)"),
    AtLeast("train_iters", 1, "an empty run whose learning-rate schedule has no steps "
                              "(optimizer_param_scheduler.py:159)", unless=_skips_training),
    AtLeast("lr_decay_iters", 1, "optimizer_param_scheduler.py:159 asserts "
                                 "lr_decay_steps > 0"),
    AtLeast("mtp_num_layers", 0, "validate_args reads a negative count as MTP on and "
                                 "refuses the position embedding instead"),
    AtLeast("mtp_loss_scaling_factor", 0, "the MTP loss is added with this weight: a "
                                          "negative one is maximised, NaN poisons the "
                                          "loss", finite=True),
    AtLeast("clip_grad", 0, "clip_grads.py scales every gradient by clip_grad / norm: a "
                            "negative value flips them"),
)


def check_values(args: argparse.Namespace) -> None:
    """The `AT_LEAST` table, on whichever of its flags `args` has (describe has a few)."""
    for rule in AT_LEAST:
        problem = rule.problem(args)
        if problem:
            raise PluginError(problem)


def before_megatron(args: argparse.Namespace, argv: list[str]) -> None:
    """Checks on the parsed values alone, before Megatron's `validate_args`; `argv` is the
    command line (to tell a flag given from Megatron's default)."""
    check_values(args)
    _check_schedule(args)
    _check_mtp_loss_scaling(args, argv)


def after_megatron(args: argparse.Namespace) -> None:
    """Checks that need the machine, the world's layout or the file system."""
    _check_backend(args)
    _check_expert_layout(args)
    _check_spec(args)
    _check_writable_directory(args, "tensorboard_dir", "--tensorboard-dir")


def _check_schedule(args) -> None:
    """What training needs from the schedule flags, which Megatron reads only once the
    model and the optimizer are built. A run given no training length may not train (a
    launch script that only builds the model); `megaseek pretrain`, which always does,
    asks for one itself (`integration.pretrain`)."""
    if _skips_training(args) or (args.train_iters is None and args.train_samples is None):
        return
    if args.lr is None:
        # The optimizer's param groups get lr None: TypeError at the first step.
        raise PluginError("give --lr: the learning rate (the peak, after warm-up)")
    if args.eval_interval is None:
        # training.py:4481 divides --train-iters by it to size the validation set.
        raise PluginError(f"give --eval-interval N: Megatron evaluates --eval-iters "
                          f"{args.eval_iters} batches every N iterations (--eval-iters 0 "
                          "with any N evaluates nothing)")
    fraction = args.lr_warmup_fraction
    if fraction is not None and not 0.0 <= fraction < 1.0:
        raise PluginError(f"--lr-warmup-fraction {fraction} must be in [0, 1): the warm-up "
                          "is that part of the decay")
    if args.train_iters:
        decay, decay_flags = ((args.lr_decay_iters, "--lr-decay-iters")
                              if args.lr_decay_iters is not None
                              else (args.train_iters, "--train-iters, as --lr-decay-iters "
                                                      "is not given"))
        warmup, warmup_flag = args.lr_warmup_iters, "--lr-warmup-iters"
    else:
        decay, decay_flags = ((args.lr_decay_samples, "--lr-decay-samples")
                              if args.lr_decay_samples is not None
                              else (args.train_samples, "--train-samples, as "
                                                        "--lr-decay-samples is not given"))
        warmup, warmup_flag = args.lr_warmup_samples, "--lr-warmup-samples"
    if fraction is None and warmup >= decay:
        # optimizer_param_scheduler.py:160 asserts lr_warmup_steps < lr_decay_steps.
        raise PluginError(f"{warmup_flag} {warmup} must be below the decay's {decay} "
                          f"({decay_flags}): the learning rate warms up, then decays")


def _check_mtp_loss_scaling(args, argv: list[str]) -> None:
    from upstream.cpu import given

    if given(argv, "--mtp-loss-scaling-factor") and not args.mtp_num_layers:
        raise PluginError(f"--mtp-loss-scaling-factor {args.mtp_loss_scaling_factor} weighs "
                          "the MTP loss, and there is none: give --mtp-num-layers N (1 or "
                          "more), or drop --mtp-loss-scaling-factor")


def _check_backend(args) -> None:
    import torch

    if args.distributed_backend == "nccl" and not torch.cuda.is_available():
        # initialize.py:352 init_process_group(backend="nccl") fails without a GPU.
        raise PluginError("--distributed-backend nccl needs CUDA GPUs, and this machine has "
                          "none: give --distributed-backend gloo (or leave the flag out)")


def _check_expert_layout(args) -> None:
    ep = args.expert_model_parallel_size
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    pp, world = args.pipeline_model_parallel_size, args.world_size
    if world % (ep * etp * pp):
        # parallel_state.py:881 raises it when the process groups are made.
        raise PluginError(
            f"--expert-model-parallel-size {ep} does not fit the {world} ranks of this run: "
            f"expert parallelism x --expert-tensor-parallel-size {etp} x "
            f"--pipeline-model-parallel-size {pp} = {ep * etp * pp} must divide the world "
            f"size: give an --expert-model-parallel-size that divides {world // (etp * pp)}"
            if world >= etp * pp else
            f"--expert-model-parallel-size {ep}: the run has {world} ranks, fewer than "
            f"--pipeline-model-parallel-size {pp} x --expert-tensor-parallel-size {etp}")


def _check_spec(args) -> None:
    """`--spec MODULE FUNCTION` is imported when the model is built (Megatron's GPT builder,
    argument_utils.py:457, or megaseek's model provider); a wrong name fails there."""
    import importlib

    spec = args.spec
    if not spec or len(spec) != 2:
        return
    module_name, function = spec
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise PluginError(f"--spec {module_name} {function}: cannot import {module_name} "
                          f"({error})") from None
    if not hasattr(module, function):
        raise PluginError(f"--spec {module_name} {function}: {module_name} has no "
                          f"{function!r}")


def _check_writable_directory(args, dest: str, flag: str) -> None:
    path = getattr(args, dest, None)
    if path:
        problem = unwritable_directory(path)
        if problem:
            raise PluginError(f"{flag} {path}: {problem}")
