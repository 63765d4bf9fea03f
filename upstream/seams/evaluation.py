"""The evaluation seam: extra passes of Megatron's evaluation (e.g. with the EMA's weights)
on the batches the first pass read, printed and logged under their own name."""

from __future__ import annotations

import contextlib
from functools import wraps
from typing import Any, Callable, Iterable

from upstream.megatron_modules import megatron_training
from upstream.patching import Fix, Patcher, source_has
from upstream.seams import SEAM, VERSION


def evaluation_passes(passes: Callable[[], Iterable[tuple[str, Callable[[], Any]]]]) -> Fix:
    """After each of Megatron's evaluations, every `(name, context)` of `passes()` evaluates again
    inside `context()`, on the same batches, its results printed on Megatron's line with the
    name after the loss: `validation loss (NAME) at iteration N | ...`, and written to
    TensorBoard and W&B under Megatron's tags with ` (NAME)` added (`lm loss validation
    (NAME)`), beside the raw weights' values rather than over them. The passes read no
    data: the validation position that a checkpoint saves is the first evaluation's."""
    def apply(patcher: Patcher) -> None:
        training = megatron_training()
        evaluate_and_print = training.evaluate_and_print_results
        print_rank_last = training.print_rank_last
        tensorboard_writer = training.get_tensorboard_writer
        wandb_writer = training.get_wandb_writer

        def labelled(name):
            def print_labelled(message):
                print_rank_last(message.replace(" loss at ", f" loss ({name}) at ", 1))

            return print_labelled

        def labelled_writer(get_writer, name):
            return lambda: _LabelledWriter.around(get_writer(), name)

        @wraps(evaluate_and_print)
        def with_extra_passes(prefix, forward_step_func, data_iterator, *args, **kwargs):
            from megatron.training import get_args

            recorded = _Recorded.wrap(data_iterator)
            result = evaluate_and_print(prefix, forward_step_func, recorded, *args, **kwargs)
            run_args = get_args()
            for name, context in passes():
                # Megatron's evaluate() counts the samples it reads (training.py:4294); the
                # count is saved and places the validation data on a resume. A pass reads
                # no new samples, so it leaves the count as the first evaluation left it.
                consumed = run_args.consumed_valid_samples
                with _restored(run_args, "consumed_valid_samples", consumed), context(), \
                        patcher.scoped(training, "print_rank_last", labelled(name)), \
                        patcher.scoped(training, "get_tensorboard_writer",
                                       labelled_writer(tensorboard_writer, name)), \
                        patcher.scoped(training, "get_wandb_writer",
                                       labelled_writer(wandb_writer, name)):
                    evaluate_and_print(prefix, forward_step_func, _Recorded.replay(recorded),
                                       *args, **kwargs)
            return result

        patcher.setattr(training, "evaluate_and_print_results", with_extra_passes)

    return Fix(
        "seam:evaluation-passes",
        f"megatron/training/training.py:4342 evaluate_and_print_results (prints with "
        f"print_rank_last, writes with get_tensorboard_writer and get_wandb_writer at "
        f":4359-4363), called at :4040, :1483, :1494; evaluate() adds to "
        f"args.consumed_valid_samples at :4294 ({VERSION})",
        "Megatron evaluates one set of weights; a plugin's pass runs the same evaluation "
        "again on the batches the first one read",
        lambda: source_has(megatron_training().evaluate_and_print_results, "evaluate(",
                           "print_rank_last(", "get_tensorboard_writer()", "get_wandb_writer()")
        and source_has(megatron_training().evaluate, "args.consumed_valid_samples +="),
        apply, SEAM)


@contextlib.contextmanager
def _restored(owner, name: str, value):
    """`owner.name` is `value` again when the block ends."""
    try:
        yield
    finally:
        setattr(owner, name, value)


class _LabelledWriter:
    """A TensorBoard writer (`add_scalar`) or W&B run (`log`) whose values go under their tag
    with ` (NAME)` added; everything else passes through."""

    def __init__(self, writer, name: str) -> None:
        self._writer, self._suffix = writer, f" ({name})"

    @classmethod
    def around(cls, writer, name: str):
        return None if writer is None else cls(writer, name)

    def add_scalar(self, tag, *args, **kwargs):
        return self._writer.add_scalar(tag + self._suffix, *args, **kwargs)

    def log(self, values: dict, *args, **kwargs):
        return self._writer.log({k + self._suffix: v for k, v in values.items()}, *args, **kwargs)

    def __getattr__(self, attribute):
        return getattr(self._writer, attribute)


class _Recorded:
    """An iterator that keeps what it yields, so that a second pass reads the same items."""

    def __init__(self, iterator) -> None:
        self.iterator, self.items = iterator, []

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.iterator)
        self.items.append(item)
        return item

    @classmethod
    def wrap(cls, data_iterator):
        if data_iterator is None:
            return None
        if isinstance(data_iterator, list):
            return [cls.wrap(d) for d in data_iterator]
        return cls(data_iterator)

    @staticmethod
    def replay(recorded):
        if recorded is None:
            return None
        if isinstance(recorded, list):
            return [_Recorded.replay(r) for r in recorded]
        return iter(list(recorded.items))
