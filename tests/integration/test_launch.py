"""`megaseek launch` runs a script that makes Megatron-LM's release `pretrain_gpt.py` calls
(no model provider: Megatron builds and wraps the model itself; a block spec with MoE),
with megaseek's plugins, and every seam a plugin can use takes effect."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import paths
from tests.helpers.training_runs import TINY_GPT, losses, torchrun

pytestmark = pytest.mark.slow
SCRIPTS = paths.LAUNCH_SCRIPTS
RELEASE = str(SCRIPTS / "release" / "pretrain_gpt.py")
PROBED = str(SCRIPTS / "launch_with_probe_plugin.py")
DATA = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128"]
# Megatron pads the vocabulary to a multiple of 128 x TP (--make-vocab-size-divisible-by).
PADDED_VOCAB_AT_TP2 = 256
MLA_MOE = [
    "--plugins", "mla", "moe", "probe", "--multi-latent-attention", "--q-lora-rank", "32",
    "--kv-lora-rank", "16", "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8",
    "--v-head-dim", "16", "--rope-type", "rope", "--normalization", "RMSNorm", "--swiglu",
    "--disable-bias-linear",
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-router-score-function", "sigmoid",
    "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "1e-3",
    "--moe-ffn-hidden-size", "32", "--moe-shared-expert-intermediate-size", "32",
    "--moe-router-load-balancing-type", "none", "--moe-layer-freq", "([0]+[1]*1)",
    "--expert-model-parallel-size", "2",
]


def parameter_count(output: str) -> int:
    found = re.findall(r"number of parameters on .*?: (\d+)", output)
    assert found, "Megatron printed no parameter count"
    return int(found[0])


def events(trace: Path) -> Counter:
    return Counter(trace.read_text().splitlines())


def test_release_script_dense_tp2_with_every_seam(tmp_path):
    args = TINY_GPT + DATA + ["--tensor-model-parallel-size", "2", "--eval-interval", "2",
                              "--eval-iters", "1"]
    plain = torchrun(["-m", "integration.launch", RELEASE], args + ["--train-iters", "4"],
                     tmp_path, launcher="torchrun")  # as users launch it
    trace = tmp_path / "trace.txt"
    probed = torchrun([PROBED, RELEASE], args + [
        "--train-iters", "4", "--plugins", "probe", "--probe-drop-mlp",
        "--probe-trace", str(trace), "--save", str(tmp_path / "ckpt"), "--save-interval", "4"],
        tmp_path)

    assert sorted(losses(plain)) == sorted(losses(probed)) == [1, 2, 3, 4]
    # The spec transform reached the model Megatron built itself: no MLP, fewer parameters.
    assert parameter_count(probed) < parameter_count(plain)
    seen = events(trace)
    for rank in ("0", "1"):
        assert seen[f"{rank} spec SelfAttention IdentityOp"] == 1
        assert seen[f"{rank} schedule"] >= 4  # one per training step, plus evaluations
        assert [seen[f"{rank} step {i}"] for i in range(1, 5)] == [1, 1, 1, 1]
        assert seen[f"{rank} state {40 + int(rank)}"] == 1  # saved once, at iteration 4
        assert seen[f"{rank} evaluation pass"] >= 2  # at iterations 2 and 4 (and the end)
    # The extra pass ran the same evaluation with the output layer zeroed: uniform logits.
    zeroed = re.findall(r"validation loss \(probe\) at iteration \d+ .*?lm loss value: "
                        r"([0-9.E+-]+)", probed)
    assert zeroed and all(math.isclose(float(v), math.log(PADDED_VOCAB_AT_TP2), rel_tol=1e-5) for v in zeroed)

    # Resumed: the iteration handed to step callbacks continues from the checkpoint, and
    # the plugin gets its saved state back.
    trace.unlink()
    resumed = torchrun([PROBED, RELEASE], args + [
        "--train-iters", "6", "--plugins", "probe", "--probe-drop-mlp",
        "--probe-trace", str(trace), "--load", str(tmp_path / "ckpt"),
        "--override-opt_param-scheduler"], tmp_path)
    assert sorted(losses(resumed)) == [5, 6]
    seen = events(trace)
    for rank in ("0", "1"):
        assert seen[f"{rank} loaded {40 + int(rank)}"] == 1
        assert [seen[f"{rank} step {i}"] for i in (1, 5, 6)] == [0, 1, 1]


def test_release_script_mla_moe_ep2(tmp_path):
    trace = tmp_path / "trace.txt"
    output = torchrun([PROBED, RELEASE], TINY_GPT + DATA + MLA_MOE + [
        "--train-iters", "3", "--probe-trace", str(trace)], tmp_path)
    assert sorted(losses(output)) == [1, 2, 3]
    seen = events(trace)
    for rank in ("0", "1"):
        # Megatron's default MoE spec is a block spec: every layer passed through the
        # plugins, the first dense (--moe-layer-freq), the second DeepSeek's MoE.
        assert seen[f"{rank} spec MLASelfAttention MLP"] == 1
        assert seen[f"{rank} spec MLASelfAttention DeepSeekMoE"] == 1


def test_placement_seam_builds_stages_r_and_2p_minus_1_minus_r(tmp_path):
    output = torchrun([PROBED, str(SCRIPTS / "build_only.py")], TINY_GPT + DATA + [
        "--num-layers", "8", "--pipeline-model-parallel-size", "2",
        "--num-virtual-stages-per-pipeline-rank", "2", "--plugins", "vplace"], tmp_path)
    chunks = set(re.findall(r"^chunk .*$", output, re.MULTILINE))
    # 8 layers over 4 stages; rank 0 holds stages 0 and 3 (embedding, and head with the
    # loss), rank 1 stages 1 and 2.
    assert chunks == {
        "chunk 0 0 embedding=1 head=0 layers=1,2",
        "chunk 0 1 embedding=0 head=1 layers=7,8",
        "chunk 1 0 embedding=0 head=0 layers=3,4",
        "chunk 1 1 embedding=0 head=0 layers=5,6",
    }


def test_plugin_flag_without_plugin_fails_at_start(tmp_path):
    with pytest.raises(AssertionError, match=r"--probe-trace needs '--plugins probe'"):
        torchrun([PROBED, RELEASE], TINY_GPT + DATA + ["--train-iters", "3", "--probe-trace",
                                                       str(tmp_path / "t")], tmp_path)
