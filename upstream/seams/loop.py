"""The training-loop seams: the schedule Megatron's loop calls, and callbacks between the
backward passes and Megatron's gradient checks, after each optimizer step, and when the
loop ends. Megatron's loop has no callbacks of its own; each seam replaces a name
training.py looks up at call time."""

from __future__ import annotations

from functools import wraps
from typing import Any, Callable

from upstream.megatron_modules import megatron_training
from upstream.patching import Fix, Patcher, source_has
from upstream.seams import SEAM, VERSION


def schedule(forward_backward: Callable[..., Any]) -> Fix:
    """Megatron's training and evaluation call `forward_backward` (with the arguments of
    Megatron's own forward-backward functions, schedules.py) for every step."""

    def apply(patcher: Patcher) -> None:
        training = megatron_training()

        @wraps(training.get_forward_backward_func)
        def get_forward_backward_func(*unused, **unused_kw):
            return forward_backward

        patcher.setattr(training, "get_forward_backward_func", get_forward_backward_func)

    return Fix(
        "seam:schedule",
        f"megatron/training/training.py:98 (import), :3614 train, :4198 evaluate ({VERSION})",
        "get_forward_backward_func (schedules.py:48) is a plain if/else with no registry; "
        "training looks the name up in its module at each call",
        lambda: source_has(megatron_training().train_step, "get_forward_backward_func(")
        or source_has(megatron_training().train, "get_forward_backward_func("),
        apply, SEAM)


def before_gradient_checks(callbacks: Callable[[], list[Callable[[int], None]]]) -> Fix:
    """Each of `callbacks()` runs with the iteration being computed (Megatron's count, as in
    `after_optimizer_step`) before Megatron's own end-of-step work on the gradients:
    `finalize_model_grads`, which every schedule calls once after its last backward (and
    which reduces them), and each DDP bucket group's inf/NaN check (`check_grads`, which
    with `--overlap-grad-reduce` can run inside the last backward). Both wait for the GPU
    already (the reduction, the check's norms), so a callback that reads a device value
    there adds no new wait to the step; one that raises fails the step before Megatron's
    checks, which do not know where a bad value came from. A callback may run more than
    once per step (once per bucket group, then at finalize)."""

    def apply(patcher: Patcher) -> None:
        from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup

        training = megatron_training()
        finalize, check_grads = training.finalize_model_grads, _ParamAndGradBucketGroup.check_grads

        def run_callbacks() -> None:
            from megatron.training import get_args

            iteration = get_args().curr_iteration + 1
            for callback in callbacks():
                callback(iteration)

        @wraps(finalize)
        def callbacks_then_finalize(*args, **kwargs):
            run_callbacks()
            return finalize(*args, **kwargs)

        @wraps(check_grads)
        def callbacks_then_check(self, *args, **kwargs):
            run_callbacks()
            return check_grads(self, *args, **kwargs)

        patcher.setattr(training, "finalize_model_grads", callbacks_then_finalize)
        patcher.setattr(_ParamAndGradBucketGroup, "check_grads", callbacks_then_check)

    def probe() -> bool:
        from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup

        return (source_has(megatron_training().train, "config.finalize_model_grads_func = "
                           "finalize_model_grads")
                and source_has(_ParamAndGradBucketGroup.start_grad_sync, "self.check_grads("))

    return Fix(
        "seam:before-gradient-checks",
        f"megatron/training/training.py:3550 (train sets config.finalize_model_grads_func "
        f"from its module's name), core/distributed/param_and_grad_buffer.py:650 "
        f"(start_grad_sync calls check_grads) ({VERSION})",
        "Megatron has no callback between the backward passes and its gradient checks; "
        "train looks finalize_model_grads up in its module, start_grad_sync calls "
        "check_grads as a method",
        probe, apply, SEAM)


def after_optimizer_step(callbacks_for: Callable[[list, Any], list[Callable[[int], None]]]) -> Fix:
    """`callbacks_for(model_chunks, optimizer)` when Megatron builds the optimizer; each
    callback then runs after every successful step with the iteration that step completes
    (Megatron's count: `args.curr_iteration` + 1, training.py:3811, so it continues
    across a resume)."""

    def apply(patcher: Patcher) -> None:
        training = megatron_training()
        build_optimizer = training.get_megatron_optimizer

        @wraps(build_optimizer)
        def get_megatron_optimizer(config, model_chunks, *args, **kwargs):
            optimizer = build_optimizer(config, model_chunks, *args, **kwargs)
            _run_after_step(optimizer, callbacks_for(model_chunks, optimizer))
            return optimizer

        patcher.setattr(training, "get_megatron_optimizer", get_megatron_optimizer)

    return Fix(
        "seam:after-optimizer-step",
        f"megatron/training/training.py:71 (import of get_megatron_optimizer), "
        f":2474 optimizer.step() in train_step ({VERSION})",
        "Megatron has no step callback; the optimizer it builds gets one wrapped around "
        "its step",
        lambda: source_has(megatron_training().train_step, "optimizer.step()"),
        apply, SEAM)


def _run_after_step(optimizer, callbacks: list[Callable[[int], None]]) -> None:
    if not callbacks:
        return
    step = optimizer.step

    @wraps(step)
    def step_then_callbacks(*args, **kwargs):
        result = step(*args, **kwargs)
        update_successful = result[0] if isinstance(result, tuple) else bool(result)
        if update_successful:
            from megatron.training import get_args

            iteration = get_args().curr_iteration + 1
            for callback in callbacks:
                callback(iteration)
        return result

    optimizer.step = step_then_callbacks


def after_training(callback: Callable[[], None]) -> Fix:
    """`callback()` once Megatron's `train()` has returned, or is leaving through its
    early-exit `sys.exit` (--exit-interval, --exit-duration-in-mins, the signal handler);
    not when it raised (its error is the one to see)."""

    def apply(patcher: Patcher) -> None:
        training = megatron_training()
        train = training.train

        @wraps(train)
        def train_then_callback(*args, **kwargs):
            try:
                result = train(*args, **kwargs)
            except SystemExit:
                callback()
                raise
            callback()
            return result

        patcher.setattr(training, "train", train_then_callback)

    return Fix(
        "seam:after-training",
        f"megatron/training/training.py:1423 pretrain calls train(), which returns at "
        f":4157 or leaves through sys.exit at :4155 ({VERSION})",
        "Megatron has no end-of-training callback; pretrain looks train up in its module "
        "at the call",
        lambda: source_has(megatron_training().pretrain, "= train("),
        apply, SEAM)
