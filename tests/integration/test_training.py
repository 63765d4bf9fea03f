"""A tiny dense GPT trained through Megatron's own `pretrain()` on 2 ranks: gloo on the
CPU, or NCCL with a GPU each under MEGASEEK_TEST_BACKEND=nccl (`make test-gpu`)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import backend
from tests.helpers.training_runs import checkpoint_tensors, final_validation_loss, losses, pretrain

pytestmark = pytest.mark.slow
MLA_FLAGS = ["--plugins", "mla", "--multi-latent-attention", "--normalization", "RMSNorm",
             "--position-embedding-type", "rope", "--q-lora-rank", "32", "--kv-lora-rank", "16",
             "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16"]


@pytest.mark.parametrize("layout", [
    # Data parallelism and dense TP=2 train in many other runs (resume, EMA, launch).
    ["--pipeline-model-parallel-size", "2"],
    ["--tensor-model-parallel-size", "2", *MLA_FLAGS,
     "--recompute-granularity", "selective", "--recompute-modules", "layernorm", "mla_up_proj"],
], ids=["pp2", "tp2-mla-recompute"])
def test_loss_falls(layout, tmp_path):
    curve = losses(pretrain(layout + ["--train-iters", "30"], tmp_path))
    assert sorted(curve) == list(range(1, 31))
    first, last = sum(curve[i] for i in (1, 2, 3)) / 3, sum(curve[i] for i in (28, 29, 30)) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("optimizer", [[], ["--use-distributed-optimizer"]], ids=["ddp", "distopt"])
def test_resume_is_bit_exact(optimizer, tmp_path):
    """12 iterations straight vs 6 + resume from the iteration-6 checkpoint: the final
    weights and optimizer state, and the final validation loss, are identical (on the CPU;
    on GPUs within the tolerance below). Dropout is on (Megatron's default 0.1), so the
    RNG state must resume exactly too: a wrong mask moves weights by about the learning
    rate, far outside either tolerance."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = optimizer + ["--train-iters", "12", "--save-interval", "6"]
    out_a = pretrain(common + ["--save", str(straight)], tmp_path)
    out_b = pretrain(common + ["--save", str(resumed), "--load", str(straight), "--ckpt-step", "6"],
                     tmp_path)

    tol = backend.tolerance(gpu=(1e-4, 1e-9), why="CUDA's embedding backward and NCCL's "
                            "reductions add in a run-dependent order: two runs of the same "
                            "steps differ in the last bits, which Adam carries on")
    a, b = checkpoint_tensors(straight, 12), checkpoint_tensors(resumed, 12)
    assert a.keys() == b.keys()
    assert any("exp_avg" in k for k in a) or optimizer == [], "optimizer state not in checkpoint"
    differing = [k for k in a if not (torch.equal(a[k], b[k]) or a[k].is_floating_point()
                                      and torch.allclose(b[k], a[k], **tol))]
    assert not differing, f"resumed run differs in {differing[:5]}"
    assert final_validation_loss(out_b) == pytest.approx(final_validation_loss(out_a),
                                                         rel=tol["rtol"], abs=0)
    # Megatron logs iterations 7..12 in both runs.
    assert set(range(7, 13)) <= losses(out_b).keys()


def test_mla_checkpoint_loads_at_another_tp_size(tmp_path):
    """Saved at TP=2, loaded at TP=1 (DP=2): Megatron's distributed checkpoint reshards
    the MLA weights (heads split, down-projections replicated) and evaluation agrees."""
    common = MLA_FLAGS + ["--make-vocab-size-divisible-by", "256",  # same padded vocab
                          "--train-iters", "4"]
    saved = pretrain(common + ["--tensor-model-parallel-size", "2", "--save", str(tmp_path / "ck"),
                               "--save-interval", "4"], tmp_path)
    loaded = pretrain(common + ["--load", str(tmp_path / "ck"), "--no-load-optim",
                                "--no-load-rng"], tmp_path)
    assert "loading distributed checkpoint" in loaded
    assert not losses(loaded), "the loaded run should start at iteration 4 and not train"
    # fp32 on CPU; TP changes only summation order.
    tol = backend.tolerance(cpu=(0, 1e-5), gpu=(0, 1e-4),
                            why="cuBLAS picks its kernel by shape and TP halves the shapes")
    assert final_validation_loss(loaded) == pytest.approx(final_validation_loss(saved),
                                                          abs=tol["atol"])
