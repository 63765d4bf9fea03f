"""A Hugging Face DeepSeek-V3 folder (with its MTP layer) converted by `megaseek convert
hf-to-megatron` loads through Megatron's loop at other layouts: TP=2 x EP=2, and PP=2
under DualPipeV (MTP on rank 0). Megatron reshards the converted torch_dist checkpoint as it
loads; every layout computes the same first-step losses as one rank (within fp32 rounding:
TP and EP split the sums), and training goes on from it; the trained checkpoint exported by
`megatron-to-hf` and converted again holds the trained weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import paths
from tests.integration.hf.test_convert import tiny_hf, with_mtp
from tests.helpers.training_runs import final_validation_loss, losses, mtp_losses, torchrun

pytestmark = pytest.mark.slow
REPO = paths.REPO
LAYOUTS = {
    "tp2-ep2": ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                "--expert-tensor-parallel-size", "1"],
    "dualpipev-pp2": ["--pipeline-model-parallel-size", "2", "--plugins", "mla", "moe",
                      "dualpipe", "--pipeline-schedule", "dualpipev"],
}


def test_converted_checkpoint_loads_at_any_layout_and_trains(tmp_path):
    tiny_hf(tmp_path / "plain", num_hidden_layers=5, first_k_dense_replace=1)
    with_mtp(tmp_path / "plain", tmp_path / "hf")  # 4 decoder layers + the MTP layer
    converted = tmp_path / "megatron"
    done = subprocess.run([sys.executable, "-m", "integration.cli", "convert", "hf-to-megatron",
                           str(tmp_path / "hf"), str(converted)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    model = (converted / "megatron_flags.txt").read_text().split()

    # Step 1 at learning rate 0 (and no bias update): the losses of the converted weights.
    evaluate = model + [
        "--plugins", "mla", "moe", "--load", str(converted), "--finetune", "--no-load-optim",
        "--no-load-rng", "--mock-data", "--tokenizer-type", "NullTokenizer",
        "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "4",
        "--train-iters", "1", "--lr", "0", "--moe-router-bias-update-rate", "0",
        "--log-interval", "1", "--eval-interval", "1", "--eval-iters", "2", "--seed", "1"]
    one_rank = torchrun(["-m", "integration.pretrain"], evaluate, tmp_path, ranks=1)
    expected = (losses(one_rank)[1], _mtp(one_rank), final_validation_loss(one_rank))
    assert 2.0 < expected[0] < 8.0 and 2.0 < expected[1] < 8.0

    # DualPipeV at PP=2 (MTP on rank 0): the same first step and validation.
    v = torchrun(["-m", "integration.pretrain"], evaluate + LAYOUTS["dualpipev-pp2"], tmp_path)
    assert (losses(v)[1], _mtp(v), final_validation_loss(v)) == pytest.approx(expected,
                                                                              rel=1e-5)
    # TP=2 x EP=2: the same first step (logged before its update), then training goes on.
    saved = tmp_path / "trained"
    trained = torchrun(["-m", "integration.pretrain"], evaluate + LAYOUTS["tp2-ep2"] + [
        "--train-iters", "6", "--lr", "3e-3", "--eval-interval", "6", "--save", str(saved),
        "--save-interval", "6"], tmp_path)
    assert (losses(trained)[1], _mtp(trained)) == pytest.approx(expected[:2], rel=1e-5)
    assert losses(trained)[6] < losses(trained)[1] - 0.05

    # Published back: the training run's checkpoint (saved at TP=2 x EP=2, its arguments
    # giving the architecture) exported to Hugging Face and converted again holds the
    # trained weights, every one of them.
    for direction, source, out in (("megatron-to-hf", saved, tmp_path / "published"),
                                   ("hf-to-megatron", tmp_path / "published", tmp_path / "back")):
        done = subprocess.run([sys.executable, "-m", "integration.cli", "convert", direction,
                               str(source), str(out)], cwd=REPO, capture_output=True, text=True,
                               timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    weights = _tensors(saved / "iter_0000006", tmp_path / "trained.pt")
    back = _tensors(tmp_path / "back" / "release", tmp_path / "back.pt")
    assert back and set(back) <= set(weights)
    assert any(name.startswith("mtp.") for name in back)
    for name, tensor in back.items():
        assert torch.equal(tensor, weights[name]), name


def _tensors(checkpoint: Path, flat: Path) -> dict:
    """A torch_dist checkpoint's tensors by key (the model's and, for a training run's, its
    optimizer's)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, flat)
    state = torch.load(flat, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _mtp(output: str) -> float:
    found = mtp_losses(output)
    assert found, "no MTP loss logged"
    return found[min(found)]
