"""The scheduler-mismatch seam: a resumed run whose learning-rate schedule differs from
the checkpoint's fails naming the value, both figures and the flags, instead of the
scheduler's AssertionError."""

from __future__ import annotations

from functools import wraps

from upstream.megatron_modules import megatron_module
from upstream.patching import Fix, Patcher, source_has
from upstream.seams import SEAM, VERSION
from upstream.seams.errors import CheckpointMismatch


# The learning-rate schedule's values a checkpoint keeps (OptimizerParamScheduler.
# load_state_dict's names): as said to the user, the unit of its figures and the flags it
# comes from. Megatron names its lengths "iterations" but keeps them in samples
# (training.py:1914: iterations x --global-batch-size), so they are said in samples.
_SCHEDULER_FLAGS = {
    "learning rate": ("learning rate", "", "--lr"),
    "minimum learning rate": ("minimum learning rate", "", "--min-lr"),
    "warmup iterations": ("warmup length", " samples", "--lr-warmup-iters x --global-batch-size, "
                          "or --lr-warmup-fraction, --lr-warmup-samples"),
    "total number of iterations": ("decay length", " samples", "--lr-decay-iters, or "
                                   "--train-iters where --lr-decay-iters is not given, x "
                                   "--global-batch-size; or --lr-decay-samples"),
    "learning rate decay style": ("learning rate decay style", "", "--lr-decay-style"),
    "start weight decay": ("start weight decay", "", "--start-weight-decay (or --weight-decay)"),
    "end weight decay": ("end weight decay", "", "--end-weight-decay (or --weight-decay)"),
    "total number of weight decay iterations": ("weight decay length", " samples",
                                                "--train-iters x --global-batch-size, or "
                                                "--train-samples"),
    "weight decay incr style": ("weight decay incr style", "", "--weight-decay-incr-style"),
}


def scheduler_mismatch_named() -> Fix:
    """A resumed run whose learning-rate schedule differs from the checkpoint's (a changed
    --train-iters, --lr, ...) fails naming the value, both figures, the flags it comes from
    and the two flags that settle it, instead of the scheduler's AssertionError."""

    def apply(patcher: Patcher) -> None:
        scheduler = megatron_module(
            "megatron.core.optimizer_param_scheduler").OptimizerParamScheduler
        check_and_set = scheduler._check_and_set

        @wraps(check_and_set)
        def check_or_name_the_flags(self, cls_value, sd_value, name):
            try:
                return check_and_set(self, cls_value, sd_value, name)
            except AssertionError:
                from megatron.training import get_args

                said, unit, flags = _SCHEDULER_FLAGS.get(name, (name, "", "the schedule's flags"))
                raise CheckpointMismatch(
                    f"--load {get_args().load}: the checkpoint's learning-rate schedule has "
                    f"{said} {sd_value}{unit}, this run {cls_value}{unit} (from {flags}): give "
                    f"--override-opt_param-scheduler to use this run's values, or "
                    f"--use-checkpoint-opt_param-scheduler to keep the checkpoint's") from None

        patcher.setattr(scheduler, "_check_and_set", check_or_name_the_flags)

    return Fix(
        "seam:scheduler-mismatch-named",
        f"megatron/core/optimizer_param_scheduler.py:333 (_check_and_set asserts each "
        f"scheduler value equals the checkpoint's) ({VERSION})",
        "a resumed run with another --train-iters (or --lr, warmup, decay style) fails at "
        "load with an AssertionError that names no flag",
        lambda: source_has(megatron_module("megatron.core.optimizer_param_scheduler")
                           .OptimizerParamScheduler._check_and_set, "assert cls_value == sd_value"),
        apply, SEAM)
