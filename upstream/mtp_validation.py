"""MTP's loss in Megatron's validation results (megatron-core 0.19.2).

Megatron's evaluation runs the MTP layers (their loss is part of the model's forward) but
reports the main loss only: `process_mtp_loss` records an MTP layer's loss for logging
only when training (`is_training=self.training`), and `evaluate` collects only the loss
function's records. `MTP_VALIDATION_LOSS` records it in evaluation as in training (the
same per-micro-batch, per-token mean, in Megatron's tracker, which training's records
are kept apart from meanwhile) and adds each depth's mean over the evaluated micro-batches
to evaluate's results under training's name, `mtp_1 loss`, ...: Megatron prints it on
the validation line (`mtp_1 loss value: ...`) and writes it under its validation tags.

The MTP layers may sit on any pipeline rank (rank 0 under DualPipeV, both end ranks under
DualPipe, each copy running half the micro-batches): the records and their counts are
summed over the pipeline and data-parallel ranks, onto the last pipeline stage whose
results Megatron prints.
"""

from __future__ import annotations

import contextlib
import inspect
from functools import wraps

import torch

from upstream.megatron_modules import megatron_module, megatron_training
from upstream.patching import Fix, Patcher, Scope, source_has
from upstream.seams import VERSION

_TRACKED = ("loss_values", "correct_values", "total_values")


def _mtp_validation_loss(patcher: Patcher) -> None:
    training = megatron_training()
    gpt_model = megatron_module("megatron.core.models.gpt.gpt_model")
    evaluate = training.evaluate
    evaluate_signature = inspect.signature(evaluate)
    process_mtp_loss = gpt_model.process_mtp_loss

    @wraps(evaluate)
    def evaluate_with_mtp_loss(*args, **kwargs):
        from megatron.core import parallel_state
        from megatron.training import get_args

        depth = get_args().mtp_num_layers
        if not depth:
            return evaluate(*args, **kwargs)
        model = evaluate_signature.bind(*args, **kwargs).arguments["model"]
        device = next(model[0].parameters()).device
        micro_batches = []  # one entry per MTP forward this rank ran

        def recorded_as_in_training(*a, **k):
            k["is_training"] = True
            micro_batches.append(1)
            return process_mtp_loss(*a, **k)

        with _training_records_kept(), patcher.scoped(gpt_model, "process_mtp_loss",
                                                      recorded_as_in_training):
            results = evaluate(*args, **kwargs)
            losses = _tracked_losses(depth, device)
        total_loss_dict, _, timelimit = results
        # Sums, then one division: the mean over every evaluated micro-batch, wherever it ran.
        summed = torch.cat([losses, torch.tensor([float(len(micro_batches))], device=device)])
        torch.distributed.all_reduce(summed, group=parallel_state.get_pipeline_model_parallel_group())
        torch.distributed.all_reduce(
            summed, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        if total_loss_dict and not timelimit:  # the last pipeline stage: Megatron prints these
            for layer, loss in enumerate(summed[:-1] / summed[-1].clamp(min=1)):
                total_loss_dict[f"mtp_{layer + 1} loss"] = loss
        return results

    patcher.setattr(training, "evaluate", evaluate_with_mtp_loss)


def _tracked_losses(depth: int, device: torch.device) -> torch.Tensor:
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    if "loss_values" not in tracker:  # no MTP layer on this rank
        return torch.zeros(depth, device=device)
    return tracker["loss_values"].detach().to(device, torch.float).clone()


@contextlib.contextmanager
def _training_records_kept():
    """Inside the block Megatron's MTP tracker starts from zero; at its end it holds
    training's records again, as they were: an evaluation never adds to, or clears, what
    training logs."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    kept = {key: tracker[key].clone() for key in _TRACKED if key in tracker}
    groups = {key: tracker.get(key) for key in ("reduce_group", "avg_group")}
    for key in kept:
        tracker[key].zero_()
    try:
        yield
    finally:
        for key in _TRACKED:
            if key in kept:
                tracker[key].copy_(kept[key])
            elif key in tracker:  # first created by this evaluation
                tracker[key].zero_()
        tracker.update(groups)


MTP_VALIDATION_LOSS = Fix(
    "mtp-validation-loss",
    f"megatron/core/transformer/multi_token_prediction.py:859 process_mtp_loss records only "
    f"`if is_training`; models/gpt/gpt_model.py:701 passes is_training=self.training; "
    f"training/training.py:4160 evaluate collects the loss function's records only "
    f"({VERSION})",
    "Megatron's validation line has no MTP loss: an MTP model's validation is reported by "
    "its main loss alone, though evaluation computes the MTP layers' loss",
    lambda: source_has(megatron_module("megatron.core.transformer.multi_token_prediction")
                       .process_mtp_loss, "if is_training:", "save_metrics_to_tracker(")
    and source_has(megatron_module("megatron.core.models.gpt.gpt_model").GPTModel,
                   "process_mtp_loss(", "is_training=self.training")
    and source_has(megatron_training().evaluate, "total_loss_dict"),
    _mtp_validation_loss,
    Scope("every run (it reports with --mtp-num-layers)", lambda args: True))
