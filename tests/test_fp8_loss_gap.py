"""DeepSeek-V3's headline FP8 claim at small scale: FP8 training stays within 0.25%
relative loss of higher-precision training.

Measured when recorded (smoothed over the last 50 iterations): FP8 0.46% *below* FP32
(seed 1234; 0.39% below with seed 4321). The direction was the same for both seeds at
this tiny scale; the test therefore bounds the degradation by 0.25% and the size of any
difference by 1%.

The same tiny GPT, seed and data, trained for 300 iterations on 2 gloo ranks with the
emulated FP8 backend and without it (FP32). Dropout is off so that the two runs differ
only by FP8 quantization. The curves are also kept as golden files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training_runs import losses, torchrun

pytestmark = pytest.mark.slow
GOLDEN = Path(__file__).parent / "golden"
MODEL = [
    "--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "256",
    "--num-attention-heads", "4", "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "300",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "20",
    "--attention-dropout", "0", "--hidden-dropout", "0", "--seed", "1234",
    "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "8",
]
FP8 = ["--plugins", "fp8", "--fp8-format", "e4m3", "--fp8-recipe", "blockwise",
       "--fp8-backend", "emulated"]


def smoothed_final(curve: list[float], window: int = 50) -> float:
    return sum(curve[-window:]) / window


def golden(name: str) -> list[float]:
    lines = (GOLDEN / name).read_text().splitlines()
    return [float(v) for v in lines if not v.startswith("#")]


def window_means(curve: list[float], window: int = 25) -> list[float]:
    return [sum(curve[i:i + window]) / window for i in range(0, len(curve), window)]


def test_fp8_loss_within_a_quarter_percent_of_fp32(tmp_path):
    run = lambda extra: losses(torchrun(["-m", "integration.pretrain"], MODEL + extra, tmp_path))
    fp32, fp8 = run([]), run(FP8)
    fp32, fp8 = [fp32[i] for i in sorted(fp32)], [fp8[i] for i in sorted(fp8)]
    assert len(fp32) == len(fp8) == 300
    assert fp8 != fp32, "the FP8 run computed exactly what FP32 did: FP8 was not applied"
    gap = (smoothed_final(fp8) - smoothed_final(fp32)) / smoothed_final(fp32)
    assert gap < 0.0025, f"FP8 loss {gap:.3%} above FP32 (DeepSeek-V3: below 0.25%)"
    assert abs(gap) < 0.01, f"FP8 and FP32 losses differ by {gap:.3%}"
    assert fp32[-1] < fp32[0] - 2.0  # both actually trained
    # Against the golden curves: 25-iteration means within 0.5% (another CPU's BLAS may
    # sum in another order, and training amplifies such differences slowly).
    for name, curve in (("loss_fp32.txt", fp32), ("loss_fp8_emulated.txt", fp8)):
        for ours, recorded in zip(window_means(curve), window_means(golden(name))):
            assert abs(ours - recorded) / recorded < 0.005, name
