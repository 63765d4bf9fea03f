"""DeepSeek-V3's headline FP8 claim at small scale: FP8 training stays within 0.25%
relative loss of higher-precision training.

Two tiny models, each trained for a whole cosine schedule (GPT 200 iterations, DeepSeek-V3
150) on 2 gloo ranks with the same seed and data, with the emulated FP8 backend and
without it (FP32); dropout is off so that the runs differ only by FP8 quantization. The
curves are kept as golden files. FP8's loss (smoothed over the last 50 iterations)
against FP32's, seed 1234:
- a dense GPT: 0.68% *below* FP32's at 200 iterations (0.70% before Wgrad's x^T was
  quantized from x itself rather than from its FP8 copy; 0.46% below at 300; 0.39% below at
  300 with seed 4321);
- DeepSeek-V3-style (MLA with q/kv LoRA, first layer dense, then an MoE layer with 8
  experts in 4 groups, top-2 from 2 groups, a shared expert, EP=2): FP8 runs every linear
  (MLA's down-projections, the kv one with a ragged 144-row output, the experts) and
  dispatches in FP8; 0.16% below FP32 at 150 iterations (0.04% with x^T from x's FP8
  copy; then 0.16% below at 200, 0.38% at 300; 0.10% below at 300 with seed 4321), at
  lr 5e-4. At lr 1e-3 the runs were chaotic:
  with seed 4321 the FP32 run hit a gradient norm of 85 at iteration 43, the two runs
  separated there and FP8 ended 2.5% lower (0.68% lower with seed 1234), which says
  nothing about FP8's precision.
The direction was the same for every model and seed at this scale; the tests bound
FP8's degradation by 0.25% and the size of any difference by 1%.

Why these lengths (the test ran 300 iterations until 2026-11-25, 200 since, and
DeepSeek-V3's 150 since 2026-11-26, for the suite's time): the gap is still measured at
the end of a full schedule (the cosine decay reaches --min-lr at the last iteration) and
over the last 50 iterations, by which the FP32 loss has fallen from 5.91 to 2.62 (GPT;
2.51 at 300) and from 5.94 to 2.73 (DeepSeek-V3 at 150; 2.63 at 200, 2.33 at 300).
Measured margins: GPT -0.68% at 200 against the bounds +0.25% and +-1%, DeepSeek-V3
-0.16% at 150. The GPT's gap is widest, about -1.2%, around iteration 100, in
mid-schedule, which is why its schedule is not cut shorter: at 150 iterations it ends at
-0.84%, near the 1% bound.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.training_runs import losses, torchrun

pytestmark = pytest.mark.slow
GOLDEN = Path(__file__).parent / "golden"
MODEL = [
    "--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "256",
    "--num-attention-heads", "4", "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "2", "--global-batch-size", "8",
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


DEEPSEEK_V3 = [
    "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear",
    "--position-embedding-type", "rope",
    "--multi-latent-attention", "--q-lora-rank", "128", "--kv-lora-rank", "128",
    "--qk-head-dim", "32", "--qk-pos-emb-head-dim", "16", "--v-head-dim", "32",
    "--num-experts", "8", "--moe-router-topk", "2", "--moe-router-num-groups", "4",
    "--moe-router-group-topk", "2", "--moe-router-score-function", "sigmoid",
    "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "1e-3",
    "--moe-router-topk-scaling-factor", "2.5", "--moe-ffn-hidden-size", "128",
    "--moe-shared-expert-intermediate-size", "128", "--moe-router-load-balancing-type", "none",
    "--moe-layer-freq", "([0]+[1]*1)", "--expert-model-parallel-size", "2",
    "--lr", "5e-4", "--min-lr", "5e-5",  # 1e-3 is chaotic for this model (see above)
]
# model: (flags, iterations, FP32 run's plugins, FP8 run's, golden files)
MODELS = {
    "gpt": (MODEL, 200, [], FP8, "loss_fp32.txt", "loss_fp8_emulated.txt"),
    "deepseek-v3": (MODEL + DEEPSEEK_V3, 150, ["--plugins", "mla", "moe"],
                    ["--plugins", "mla", "moe", "fp8", "--moe-fp8-dispatch", *FP8[2:]],
                    "loss_dsv3_fp32.txt", "loss_dsv3_fp8_emulated.txt"),
}


def curves(model: str, tmp_path) -> tuple[list[float], list[float]]:
    """The FP32 and the FP8 run's loss per iteration."""
    args, iterations, fp32_plugins, fp8_plugins, _, _ = MODELS[model]
    args = args + ["--train-iters", str(iterations)]
    run = lambda extra: losses(torchrun(["-m", "integration.pretrain"], args + extra, tmp_path))
    fp32, fp8 = run(fp32_plugins), run(fp8_plugins)
    return [fp32[i] for i in sorted(fp32)], [fp8[i] for i in sorted(fp8)]


@pytest.mark.parametrize("model", MODELS)
def test_fp8_loss_within_a_quarter_percent_of_fp32(model, tmp_path):
    _, iterations, _, _, fp32_golden, fp8_golden = MODELS[model]
    fp32, fp8 = curves(model, tmp_path)
    assert len(fp32) == len(fp8) == iterations
    assert fp8 != fp32, "the FP8 run computed exactly what FP32 did: FP8 was not applied"
    gap = (smoothed_final(fp8) - smoothed_final(fp32)) / smoothed_final(fp32)
    assert gap < 0.0025, f"FP8 loss {gap:.3%} above FP32 (DeepSeek-V3: below 0.25%)"
    assert abs(gap) < 0.01, f"FP8 and FP32 losses differ by {gap:.3%}"
    assert fp32[-1] < fp32[0] - 2.0  # both actually trained
    # Against the golden curves: 25-iteration means within 0.5% (another CPU's BLAS may
    # sum in another order, and training amplifies such differences slowly).
    for name, curve in ((fp32_golden, fp32), (fp8_golden, fp8)):
        for ours, recorded in zip(window_means(curve), window_means(golden(name))):
            assert abs(ours - recorded) / recorded < 0.005, name
