"""Uneven stages under DualPipeV and DualPipe (Megatron's --pipeline-model-parallel-layout
and --decoder-first/last-pipeline-num-layers, cut by the placement) through Megatron's own
training loop, against one process without a pipeline on the same weights and data.

As in test_pipeline.py: every comparison starts from the iteration-2 checkpoint of the
one-process oracle, which goes on from the state it saved (`logged_when_resumed`);
dropout is off; losses after a step agree to a few fp32 ulps (the gradient norm's sum
over ranks, through clipping). Seven layers, so no cut is even; the models carry one MTP
layer, whose loss is compared too. The checkpoints hold every layer under its global
number, so one saved under a layout loads under Megatron's 1F1B (its own split) and in
one process.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.training_runs import (checkpoint_tensors, final_validation_loss,
                                         logged_when_resumed, losses, mla_moe_ep2, mtp_losses,
                                         pretrain)

pytestmark = pytest.mark.slow

SEVEN = ["--num-layers", "7", "--untie-embeddings-and-output-weights", "--hidden-dropout",
         "0", "--attention-dropout", "0", "--position-embedding-type", "rope",
         "--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "0.3", "--micro-batch-size",
         "1"]
# DeepSeek's MLA and MoE (layers 1-6), experts on every rank (EP=1: 2 ranks suffice).
MLA_MOE = SEVEN + mla_moe_ep2("([0]+[1]*6)") + ["--expert-model-parallel-size", "1",
                                               "--global-batch-size", "4"]
DENSE = SEVEN + ["--global-batch-size", "8"]
CLOSE = dict(rel=2e-6, abs=0)  # a few fp32 ulps (see the module docstring)


def _oracle(model: list[str], tmp_path, until: int) -> tuple:
    """One process without a pipeline: iterations 1..`until`, its iteration-2 checkpoint
    the start of every pipelined run. (checkpoint folder, its output)"""
    start = tmp_path / "one-process"
    output = pretrain(model + ["--train-iters", str(until), "--save", str(start),
                               "--save-interval", "2"], tmp_path, ranks=1)
    return start, output


def _trains_as(run: str, oracle: str, start: int = 2) -> None:
    """Main and MTP losses of every logged iteration after `start` (the checkpoint it was
    resumed from), and the final validation loss, as the one-process oracle's."""
    for parse in (losses, mtp_losses):
        expected = logged_when_resumed(oracle, start, parse)
        assert sorted(parse(run)) == sorted(expected), parse.__name__
        for iteration, loss in expected.items():
            assert parse(run)[iteration] == pytest.approx(loss, **CLOSE), (parse.__name__,
                                                                           iteration)
    assert final_validation_loss(run) == pytest.approx(final_validation_loss(oracle), **CLOSE)


def _said_once(output: str, lines: list[str]) -> None:
    """The start-up lines that say the stages, printed once (rank 0), in order."""
    said = "\n".join(lines)
    assert output.count(said) == 1, output[-4000:]


def test_dualpipev_trains_mla_moe_with_a_layout_as_one_process_resumes_and_loads_anywhere(
        tmp_path):
    """7 MLA + MoE layers and MTP cut `Et|ttt|tt|tmL` into DualPipeV's 4 stages on 2 ranks
    (rank 0: stages 0 and 3, rank 1: stages 1 and 2): trains as one process, resumes
    bit-exactly, and its checkpoint evaluates as it did under Megatron's 1F1B (PP=2, its
    even split counting the embedding as a layer: 4 + 4) and in one process."""
    start, one_process = _oracle(MLA_MOE, tmp_path, 6)
    dualpipev = ["--plugins", "mla", "moe", "dualpipe", "--pipeline-schedule", "dualpipev",
                 "--pipeline-model-parallel-size", "2"]
    layout = ["--pipeline-model-parallel-layout", "Et|ttt|tt|tmL"]
    saved, resumed = tmp_path / "v", tmp_path / "v-again"
    v = pretrain(MLA_MOE + dualpipev + layout + [
        "--load", str(start), "--ckpt-step", "2", "--train-iters", "6", "--save", str(saved),
        "--save-interval", "2"], tmp_path)
    _said_once(v, ["megaseek: --pipeline-schedule dualpipev places its stages "
                   "(--pipeline-model-parallel-layout Et|ttt|tt|tmL):",
                   "megaseek:   rank 0 holds stage 0 (E t0) and stage 3 (t6 m L)",
                   "megaseek:   rank 1 holds stage 1 (t1-t3) and stage 2 (t4 t5)"])
    _trains_as(v, one_process)

    # Saved at 4, resumed: the same weights and optimizer state at 6, bit for bit.
    pretrain(MLA_MOE + dualpipev + layout + [
        "--load", str(saved), "--ckpt-step", "4", "--train-iters", "6", "--save", str(resumed),
        "--save-interval", "2"], tmp_path)
    at_6, again = checkpoint_tensors(saved, 6), checkpoint_tensors(resumed, 6)
    assert at_6.keys() == again.keys()
    assert [name for name in at_6 if not torch.equal(at_6[name], again[name])] == []

    # Placement-independent: every layer under its global number, so the iteration-6
    # checkpoint evaluates (the same batches as the run's last evaluation) to the same loss
    # under Megatron's own 1F1B and split, and without a pipeline.
    evaluate = ["--load", str(saved), "--ckpt-step", "6", "--train-iters", "6", "--skip-train"]
    one_f_one_b = pretrain(MLA_MOE + evaluate + [
        "--plugins", "mla", "moe", "--pipeline-model-parallel-size", "2",
        "--account-for-embedding-in-pipeline-split"], tmp_path)
    in_one_process = pretrain(MLA_MOE + evaluate, tmp_path, ranks=1)
    for evaluated in (one_f_one_b, in_one_process):
        assert final_validation_loss(evaluated) == pytest.approx(final_validation_loss(v),
                                                                 **CLOSE)


def test_dualpipe_with_embedding_and_loss_stages_alone_and_dualpipev_with_first_last_layers(
        tmp_path):
    """A dense 7-layer model with MTP, against one process:
    - DualPipe at PP=4 with `E|ttt|tttt|mL` from the oracle's iteration 2: the first stage
      only embeds, the last only runs MTP and the loss (its final norm sits with layer 6,
      as Megatron places it with MTP), every stage held by two ranks;
    - DualPipeV at PP=2 with --decoder-first-pipeline-num-layers 1 and
      --decoder-last-pipeline-num-layers 2 (Megatron's uneven split: Et|tt|tt|ttmL), from
      DualPipe's iteration-4 checkpoint (saved once, by the first copy of each stage)."""
    start, one_process = _oracle(DENSE, tmp_path, 6)
    dualpipe_saved = tmp_path / "dualpipe"
    dualpipe = pretrain(DENSE + [
        "--load", str(start), "--ckpt-step", "2", "--train-iters", "6", "--save",
        str(dualpipe_saved), "--save-interval", "4",
        "--plugins", "dualpipe", "--pipeline-schedule", "dualpipe",
        "--pipeline-model-parallel-size", "4", "--pipeline-model-parallel-layout",
        "E|ttt|tttt|mL"], tmp_path, ranks=4)
    _said_once(dualpipe, [
        "megaseek: --pipeline-schedule dualpipe places its stages "
        "(--pipeline-model-parallel-layout E|ttt|tttt|mL):",
        "megaseek:   rank 0 holds stage 0 (E) of the micro-batches from rank 0 and stage 3 "
        "(m L) of those from rank 3",
        "megaseek:   rank 1 holds stage 1 (t0-t2) of the micro-batches from rank 0 and stage "
        "2 (t3-t6) of those from rank 3",
        "megaseek:   rank 2 holds stage 2 (t3-t6) of the micro-batches from rank 0 and stage "
        "1 (t0-t2) of those from rank 3",
        "megaseek:   rank 3 holds stage 3 (m L) of the micro-batches from rank 0 and stage 0 "
        "(E) of those from rank 3"])
    _trains_as(dualpipe, one_process)

    dualpipev = pretrain(DENSE + [
        "--load", str(dualpipe_saved), "--ckpt-step", "4", "--train-iters", "6",
        "--plugins", "dualpipe", "--pipeline-schedule", "dualpipev",
        "--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1",
        "--decoder-last-pipeline-num-layers", "2"], tmp_path)
    _said_once(dualpipev, [
        "megaseek: --pipeline-schedule dualpipev places its stages "
        "(--decoder-first-pipeline-num-layers 1 --decoder-last-pipeline-num-layers 2: "
        "Et|tt|tt|ttmL):",
        "megaseek:   rank 0 holds stage 0 (E t0) and stage 3 (t5 t6 m L)",
        "megaseek:   rank 1 holds stage 1 (t1 t2) and stage 2 (t3 t4)"])
    _trains_as(dualpipev, one_process, start=4)
