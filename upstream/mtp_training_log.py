"""MTP's training loss logged over the iterations the main loss is (megatron-core 0.19.2).

`training_log` adds an iteration's loss-function records (`lm loss`) into its interval
sums only when the optimizer advanced (`if not skipped_iter`), and divides each sum by the
number of advanced iterations; but it has `MTPLossLoggingHelper.track_mtp_metrics` add
the MTP layers' loss (`mtp_1 loss`, ...) into the same sums on every iteration, skipped
ones included (an fp16 loss-scale overflow). Measured (a tiny GPT with one MTP layer,
`--fp16 --log-interval 4`, iteration 8 of 5-8 skipped): `lm loss` 5.613, the mean of
iterations 5-7; `mtp_1 loss` 7.732, the sum over 5-8 divided by 3, where the mean over 5-7
is 5.851. At `--log-interval 1` a skipped iteration printed an MTP loss beside no main
loss. Without a skipped iteration both are the mean over the interval.

`MTP_LOSS_OF_SKIPPED_ITERATIONS` leaves a skipped iteration's MTP loss out of the interval
sums, as Megatron leaves its main loss out; the rest of `track_mtp_metrics` runs as
before (the tracker cleared for the next iteration; TensorBoard and W&B get the
iteration's value, as they get the main loss's).
"""

from __future__ import annotations

import inspect
from functools import wraps

from upstream.megatron_modules import megatron_module, megatron_training
from upstream.patching import Fix, Patcher, Scope, source_has
from upstream.seams import VERSION

# training_log's call, unguarded by skipped_iter (training.py:2798-2802)
_UNGUARDED_CALL = ("    if args.mtp_num_layers is not None:\n"
                   "        mtp_loss_scale = 1 / get_num_microbatches()\n"
                   "        MTPLossLoggingHelper.track_mtp_metrics(\n"
                   "            mtp_loss_scale, iteration, writer, wandb_writer, total_loss_dict\n")


def _helper():
    return megatron_module("megatron.core.transformer.multi_token_prediction").MTPLossLoggingHelper


def _mtp_loss_of_advanced_iterations(patcher: Patcher) -> None:
    training = megatron_training()
    training_log = training.training_log
    signature = inspect.signature(training_log)
    helper = _helper()
    track = helper.track_mtp_metrics

    def tracked_outside_the_sums(loss_scale, iteration, writer, wandb_writer=None,
                                 total_loss_dict=None):
        return track(loss_scale, iteration, writer, wandb_writer, None)

    @wraps(training_log)
    def training_log_without_skipped_mtp_loss(*args, **kwargs):
        if not signature.bind(*args, **kwargs).arguments["skipped_iter"]:
            return training_log(*args, **kwargs)
        with patcher.scoped(helper, "track_mtp_metrics",
                            staticmethod(tracked_outside_the_sums)):
            return training_log(*args, **kwargs)

    patcher.setattr(training, "training_log", training_log_without_skipped_mtp_loss)


MTP_LOSS_OF_SKIPPED_ITERATIONS = Fix(
    "mtp-loss-of-skipped-iterations",
    f"megatron/training/training.py:2798-2802 training_log calls track_mtp_metrics with "
    f"total_loss_dict whatever skipped_iter, where training.py:2611 adds the main losses "
    f"only `if not skipped_iter` and training.py:2879 divides every sum by the advanced "
    f"iterations; core/transformer/multi_token_prediction.py:468 adds to total_loss_dict "
    f"({VERSION})",
    "the logged MTP loss of an interval with an iteration the loss scaler skipped is the sum "
    "over every iteration divided by the advanced ones (the main loss: the mean over the "
    "advanced ones); a skipped iteration alone logs an MTP loss and no main loss",
    lambda: source_has(megatron_training().training_log, _UNGUARDED_CALL)
    and source_has(_helper().track_mtp_metrics, "total_loss_dict[loss_name] = (",
                   "total_loss_dict.get(loss_name, torch.zeros_like(loss)) + loss"),
    _mtp_loss_of_advanced_iterations,
    Scope("every run (it logs with --mtp-num-layers)", lambda args: True))
