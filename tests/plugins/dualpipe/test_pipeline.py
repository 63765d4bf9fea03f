"""DualPipeV and DualPipe through Megatron's own training loop, against one process
without a pipeline and against Megatron's 1F1B, on the same weights and data.

Every comparison starts from one checkpoint (Megatron draws initial weights per pipeline rank,
so two placements would otherwise start apart): in the dense test the one-process oracle saves
it on its way, in the MLA+MoE test Megatron's 1F1B at PP=2. Dropout is off: its masks
come from per-rank generators, which differ between placements. The distributed
optimizer saves fully reshardable state, so a checkpoint moves between placements.

Tolerances: under DualPipeV every stage adds the same micro-batches' gradients in the
same order as one process does, so gradients are bit-equal; DualPipe adds each
direction's half, then the two halves (another order of the same fp32 sum). Losses after
a step differ by a few fp32 ulps: Megatron sums the squared gradient norm per rank, then
over ranks, and that rounding reaches the weights through gradient clipping.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import torch

from plugins.dualpipe.program import Pipeline
from tests.helpers import paths
from tests.helpers.training_runs import (TINY_GPT, checkpoint_tensors, final_validation_loss,
                                         logged_when_resumed, losses, mla_moe_ep2, mtp_losses,
                                         pretrain, torchrun)

pytestmark = pytest.mark.slow

PIPELINE = ["--num-layers", "4", "--pipeline-model-parallel-size", "2",
            "--untie-embeddings-and-output-weights", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--use-distributed-optimizer",
            "--dist-ckpt-optim-fully-reshardable"]
# Multi-token prediction (DeepSeek-V3's one MTP layer) with the loss: on the last pipeline
# rank under 1F1B, on rank 0 under DualPipeV (beside the embedding, in another chunk), on
# both end ranks under DualPipe; in the MLA + MoE test its loss is compared with 1F1B's. That
# test keeps Megatron's DDP: with MTP the plugin refuses the distributed optimizer's fully
# reshardable checkpoints, which save the embedding's optimizer state wrongly when one rank
# holds two embedding copies (tests/plugins/dualpipe/test_refusals.py).
MTP = ["--position-embedding-type", "rope", "--mtp-num-layers", "1",
       "--mtp-loss-scaling-factor", "0.3"]

DUALPIPEV = ["--plugins", "dualpipe", "--pipeline-schedule", "dualpipev"]
DUALPIPE = ["--plugins", "dualpipe", "--pipeline-schedule", "dualpipe"]
SCRIPTS = paths.LAUNCH_SCRIPTS
RELEASE = str(SCRIPTS / "release" / "pretrain_gpt.py")
PROBED = str(SCRIPTS / "launch_with_probe_plugin.py")
DATA = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128"]
CLOSE = dict(rel=2e-6, abs=0)  # a few fp32 ulps (see the module docstring)


def _gradients(save_dir, pipeline: Pipeline | None) -> dict[str, torch.Tensor]:
    """Iteration 3's gradients that Megatron saved (--save-wgrads-interval; one file per
    pipeline rank, one entry per model chunk, layers numbered within the chunk) under
    global layer numbers. Copies of a stage (DualPipe) must agree bit for bit."""
    layers_per_stage = 4 // (pipeline.stages if pipeline else 1)
    merged: dict[str, torch.Tensor] = {}
    for path in sorted((save_dir / "wgrads" / "iter_0000003").glob("*.pth")):
        rank = int(path.stem.split("_")[3]) if pipeline else 0
        for chunk_name, grads in torch.load(path).items():
            chunk = int(chunk_name.removeprefix("model_chunk"))
            first = pipeline.place(rank, chunk)[1] * layers_per_stage if pipeline else 0
            for name, grad in grads.items():  # MTP's layers are numbered by depth
                name = re.sub(r"(?<!mtp\.)layers\.(\d+)\.",
                              lambda m: f"layers.{first + int(m[1])}.", name)
                assert name not in merged or torch.equal(merged[name], grad), name
                merged[name] = grad
    assert merged, f"no gradients saved under {save_dir}"
    return merged


def _resumed(load, step: int, until: int, extra: list[str], tmp_path, pipeline=PIPELINE,
             **kwargs) -> str:
    return pretrain(pipeline + extra + ["--load", str(load), "--ckpt-step", str(step),
                                        "--train-iters", str(until)], tmp_path, **kwargs)


def test_dualpipev_and_dualpipe_train_as_one_process_resume_exactly_and_load_anywhere(
        tmp_path):
    """From the iteration-2 checkpoint of one process without a pipeline (saved at PP=1,
    loaded at PP=2): DualPipeV (with the W split) and DualPipe train iterations 3-6 as that
    process does; their gradients equal its; DualPipeV resumes bit-exactly (without the W
    split); DualPipe's checkpoint evaluates at PP=1; DualPipeV's recorded timeline is its
    program's. (Loading a checkpoint that 1F1B saved at PP=2 is the MLA+MoE test's start.)"""
    v_ckpt, v_again, dual_ckpt = (tmp_path / name for name in ("v", "v-again", "dual"))
    grads = ["--save-wgrads-interval", "3"]  # iteration 3's reduced gradients, per rank

    # The oracle: iterations 1-6 in one process, without a pipeline. The checkpoint it saves
    # at iteration 2 is every pipelined run's start; it goes on from the state it saved (a
    # run resumed from there computes the same: weights, optimizer, scheduler and data
    # position are restored, and dropout is off; only Megatron's log differs, see
    # logged_when_resumed). One start-up fewer than a separate run saving the start.
    oracle = start = tmp_path / "one-process"
    one_process = pretrain(PIPELINE + grads + [
        "--pipeline-model-parallel-size", "1", "--train-iters", "6", "--save", str(oracle),
        "--save-interval", "2"], tmp_path, ranks=1)
    after_start = logged_when_resumed(one_process, 2)

    # DualPipeV with the W split (--delay-wgrad-compute): weight gradients deferred to
    # the schedule's W cells.
    v = _resumed(start, 2, 6, DUALPIPEV + grads + [
        "--delay-wgrad-compute", "--save", str(v_ckpt), "--save-interval", "2",
        "--pipeline-timeline", str(tmp_path / "timeline")], tmp_path)
    dual = _resumed(start, 2, 6, DUALPIPE + grads + ["--save", str(dual_ckpt),
                                                     "--save-interval", "6"], tmp_path)

    # Every parameter's gradient of iteration 3 against one process without a pipeline.
    expected = _gradients(oracle, None)
    v_grads = _gradients(v_ckpt, Pipeline("dualpipev", 2, 4))
    assert v_grads.keys() == expected.keys()
    assert [name for name in expected if not torch.equal(v_grads[name], expected[name])] == []
    dual_grads = _gradients(dual_ckpt, Pipeline("dualpipe", 2, 4))
    assert dual_grads.keys() == expected.keys()
    for name in expected:  # the two halves summed: another rounding of the same sum
        torch.testing.assert_close(dual_grads[name], expected[name], rtol=1e-5, atol=1e-8,
                                   msg=name)
    for run in (v, dual):
        assert sorted(losses(run)) == [3, 4, 5, 6]
        for iteration, loss in after_start.items():
            assert losses(run)[iteration] == pytest.approx(loss, **CLOSE), iteration
        assert final_validation_loss(run) == pytest.approx(final_validation_loss(one_process),
                                                           **CLOSE)

    # Save at 4, resume under DualPipeV without the W split: the same weights and
    # optimizer state at 6, bit for bit.
    _resumed(v_ckpt, 4, 6, DUALPIPEV + ["--save", str(v_again), "--save-interval", "2"], tmp_path)
    saved, resumed = checkpoint_tensors(v_ckpt, 6), checkpoint_tensors(v_again, 6)
    assert saved.keys() == resumed.keys()
    assert [k for k in saved if not torch.equal(saved[k], resumed[k])] == []

    # DualPipe holds each stage on two ranks and its checkpoint once, every layer under
    # its global number: without a pipeline (PP=1, DP=2) it evaluates to the same loss.
    evaluated = pretrain(PIPELINE + ["--pipeline-model-parallel-size", "1", "--load",
                                     str(dual_ckpt), "--ckpt-step", "6", "--train-iters", "6",
                                     "--skip-train"], tmp_path)
    assert final_validation_loss(evaluated) == pytest.approx(final_validation_loss(dual), **CLOSE)

    # The recorded cells are the program's (the reader checks them cell by cell) and
    # the measured bubble is printed beside the formula's.
    report = subprocess.run([sys.executable, "-m", "integration.cli", "schedule", "--from-run",
                             str(tmp_path / "timeline"), "--json"], capture_output=True,
                            text=True, check=True).stdout
    measured = json.loads(report)
    assert (measured["schedule"], measured["pp"], measured["microbatches"]) == ("dualpipev", 2, 4)
    recorded = (tmp_path / "timeline" / "timeline-rank0.jsonl").read_text()
    assert '"op": "W"' in recorded and '"split": true' in recorded
    assert len(measured["bubble"]) == 2 and all(b >= 0 for b in measured["bubble"])


# DeepSeek's MoE in layers 2-4, experts over 2 data-parallel ranks.
PIPELINE_DDP = [flag for flag in PIPELINE if flag not in ("--use-distributed-optimizer",
                                                          "--dist-ckpt-optim-fully-reshardable")]
MLA_MOE_EP2 = mla_moe_ep2("([0]+[1]*3)") + MTP + ["--micro-batch-size", "1",
                                                  "--global-batch-size", "8"]


def test_mla_moe_with_expert_parallelism_trains_as_1f1b_on_4_ranks(tmp_path):
    """PP=2 x DP=2 with EP=2: 4 stages in a V (DualPipeV; also with the F&B overlap of
    the MoE all-to-all) or 2 stages from both ends (DualPipe, whose two copies of a stage
    also sum their expert loads for the bias update; with the W split, MLA's and the
    experts' weight gradients deferred), 4 micro-batches per step (the fewest either
    allows on 2 pipeline ranks)."""
    start = tmp_path / "start"
    # One 1F1B run both saves the iteration-2 checkpoint every schedule starts from and is
    # the oracle for iterations 3 and 4: it goes on from the state it saved (a run resumed
    # from that checkpoint computes the same: Megatron restores the weights, optimizer,
    # scheduler, expert bias and data position, and dropout is off; only Megatron's log
    # differs, see logged_when_resumed). One 4-rank start-up fewer than saving and
    # resuming in two runs.
    straight = pretrain(PIPELINE_DDP + MLA_MOE_EP2 + ["--train-iters", "4", "--save",
                                                      str(start), "--save-interval", "2"],
                        tmp_path, ranks=4)
    one_f_one_b = logged_when_resumed(straight, 2)
    mtp_1f1b = logged_when_resumed(straight, 2, mtp_losses)
    runs = {}
    for schedule, extra in (("dualpipev", []), ("dualpipe", ["--delay-wgrad-compute"]),
                            ("dualpipev", ["--overlap-moe-expert-parallel-comm"])):
        dual = runs[(schedule, *extra)] = _resumed(start, 2, 4, MLA_MOE_EP2 + extra + [
            "--plugins", "mla", "moe", "dualpipe", "--pipeline-schedule", schedule],
            tmp_path, pipeline=PIPELINE_DDP, ranks=4)
        assert sorted(losses(dual)) == [3, 4]
        for iteration, loss in one_f_one_b.items():
            assert losses(dual)[iteration] == pytest.approx(loss, **CLOSE), (schedule, iteration)
        for iteration, loss in mtp_1f1b.items():  # MTP's layer is an MLA + MoE layer
            assert mtp_losses(dual)[iteration] == pytest.approx(loss, **CLOSE), (schedule,
                                                                                 iteration)
        assert final_validation_loss(dual) == pytest.approx(
            final_validation_loss(straight), **CLOSE), schedule
    # The F&B overlap runs each cell's forward and backward at once (two threads, chunk 1
    # on its own expert-parallel communicators): the same computations, so the same bits.
    sequential, overlapped = runs[("dualpipev",)], runs[("dualpipev",
                                                         "--overlap-moe-expert-parallel-comm")]
    assert losses(overlapped) == losses(sequential)
    assert mtp_losses(overlapped) == mtp_losses(sequential)
    assert final_validation_loss(overlapped) == final_validation_loss(sequential)


def test_a_rank_that_dies_mid_step_ends_the_run_with_an_error_naming_the_wait(tmp_path):
    """Through Megatron-LM's release pretrain_gpt.py (the launcher), rank 1 dies in the
    middle of a step (at its 9th transformer-layer call); rank 0, waiting for its
    messages, fails at once naming what it waited for; nothing hangs
    (`--distributed-timeout-minutes 1`, and the run is given 120 s in all). Rank 0 gets
    30 s to end on its own: torchrun would terminate it as soon as rank 1 is seen dead,
    which on a loaded machine can come before rank 0 has reported (seen in CI)."""
    started = time.monotonic()
    with pytest.raises(AssertionError) as failed:
        torchrun([PROBED, RELEASE], TINY_GPT + DATA + PIPELINE + DUALPIPEV[:1] + [
            "dualpipe", "crash", "--pipeline-schedule", "dualpipev", "--crash-rank", "1",
            "--crash-at-layer-call", "9", "--train-iters", "4",
            "--distributed-timeout-minutes", "1"], tmp_path, timeout=120, grace=30)
    assert time.monotonic() - started < 120
    output = str(failed.value)
    assert re.search(r"dualpipev: pipeline rank 0 waited for the (activation|input gradient) "
                     r"of stage \d+ .*from pipeline rank 1", output), output[-3000:]
    assert "rank 1 exited 17" in output


def test_megatron_lm_release_script_trains_under_dualpipev(tmp_path):
    """Its get_batch asks for the rank's first/last-stage batch fields; DualPipeV's rank 0
    holds both ends (the placement seam answers for it)."""
    output = torchrun([PROBED, RELEASE], TINY_GPT + DATA + PIPELINE + DUALPIPEV + [
        "--train-iters", "3"], tmp_path)
    assert sorted(losses(output)) == [1, 2, 3]
    assert final_validation_loss(output) > 0
