"""Every flag MLA's attention meets is honoured or refused at start-up by name (with the
reason); nothing is ignored quietly.

Driven through Megatron's argument parsing and the plugins' validation on one process, as
the launch path does (`tests.helpers.plugin_args`). The recomputation the plugin makes work
(MLA's own, with FP8 too) is checked for gradients in `tests/plugins/test_recompute.py`,
MLA under context parallelism in `tests/plugins/mla/test_attention.py`; the FP8 flags in
`tests/plugins/fp8/test_refusals.py`.
"""

from __future__ import annotations

import argparse

import pytest

import integration  # noqa: F401  (megatron.training on Python 3.11)
from plugins import PluginError
from plugins.mla.plugin import IGNORED_ROPE_FLAGS
from tests.helpers.plugin_args import enabled as parse_enabled

BASE = ["--num-layers", "2", "--hidden-size", "256", "--ffn-hidden-size", "512",
        "--num-attention-heads", "4", "--seq-length", "64", "--max-position-embeddings", "64",
        "--micro-batch-size", "2", "--transformer-impl", "local",
        "--no-gradient-accumulation-fusion"]
FP8 = ["--fp8-format", "e4m3", "--fp8-recipe", "blockwise"]
MLA = ["--plugins", "mla", "--multi-latent-attention", "--kv-lora-rank", "128",
       "--qk-head-dim", "32", "--qk-pos-emb-head-dim", "16", "--v-head-dim", "64"]
ROPE = ["--rope-type", "rope", "--no-rope-fusion"]
YARN = ["--rope-type", "yarn", "--rotary-scaling-factor", "4",
        "--yarn-original-max-position-embeddings", "16"]

# A value other than Megatron's default for each flag of the mla plugin's IGNORED_ROPE_FLAGS.
ROPE_KNOBS = {
    "--rotary-interleaved": ["--rotary-interleaved"],
    "--rotary-percent": ["--rotary-percent", "0.5"],
    "--rotary-seq-len-interpolation-factor": ["--rotary-seq-len-interpolation-factor", "2"],
    "--use-rope-scaling": ["--use-rope-scaling"],
    "--rope-scaling-factor": ["--rope-scaling-factor", "16"],
    "--no-rope-freq": ["--no-rope-freq", "4"],
    "--reset-position-ids": ["--reset-position-ids"],
    "--no-yarn-correction-range-round-to-int": ["--no-yarn-correction-range-round-to-int"],
}
YARN_KNOBS = [["--rotary-scaling-factor", "4"], ["--yarn-original-max-position-embeddings", "16"],
              ["--yarn-beta-fast", "16"], ["--yarn-beta-slow", "2"], ["--mscale", "0.7"],
              ["--mscale-all-dim", "0.7"]]

# (command line after BASE, texts the error must contain: the flag first)
REFUSALS = {
    # Megatron's layernorm recomputation needs Transformer Engine outside MLA's layers.
    "layernorm-recompute-without-mla": (["--recompute-granularity", "selective",
                                         "--recompute-modules", "layernorm"],
                                        ["--recompute-modules layernorm", "--plugins mla"]),
    "layernorm-recompute-fp8-without-mla": ([*FP8, "--plugins", "fp8",
                                             "--recompute-granularity", "selective",
                                             "--recompute-modules", "layernorm", "mlp"],
                                            ["--recompute-modules layernorm", "--plugins mla"]),
    # MLA's sizes.
    "v-head-dim-0": ([*MLA, "--v-head-dim", "0"], ["--v-head-dim 0"]),
    "qk-head-dim-0": ([*MLA, "--qk-head-dim", "0"], ["--qk-head-dim 0"]),
    "heads-not-divisible-by-tp": ([*MLA, "--tensor-model-parallel-size", "3"],
                                  ["--num-attention-heads 4", "--tensor-model-parallel-size 3"]),
    # YaRN's parameters.
    "yarn-factor-0": ([*MLA, "--rotary-scaling-factor", "0"], ["--rotary-scaling-factor 0"]),
    "yarn-factor-negative": ([*MLA, "--rotary-scaling-factor", "-4"],
                             ["--rotary-scaling-factor -4"]),
    "yarn-factor-below-1": ([*MLA, "--rotary-scaling-factor", "0.5",
                             "--yarn-original-max-position-embeddings", "16"],
                            ["--rotary-scaling-factor 0.5 must be 1 or more"]),
    "yarn-beta-fast-below-slow": ([*MLA, *YARN, "--yarn-beta-fast", "1", "--yarn-beta-slow",
                                   "2"], ["--yarn-beta-fast 1", "--yarn-beta-slow 2"]),
    "yarn-beta-slow-0": ([*MLA, *YARN, "--yarn-beta-slow", "0"], ["--yarn-beta-slow 0"]),
    "yarn-original-length-0": ([*MLA, "--rope-type", "yarn", "--rotary-scaling-factor", "4",
                                "--yarn-original-max-position-embeddings", "0"],
                               ["--yarn-original-max-position-embeddings 0"]),
    "yarn-without-original-length": ([*MLA, "--rope-type", "yarn", "--rotary-scaling-factor",
                                      "4"], ["--yarn-original-max-position-embeddings"]),
    # YaRN flags with plain RoPE, which does not read them.
    **{f"rope-with-{argv[0][2:]}": ([*MLA, *ROPE, *argv], [" ".join(argv), "--rope-type rope"])
       for argv in YARN_KNOBS},
    "rope-with-rope-fusion": ([*MLA, "--rope-type", "rope"], ["--no-rope-fusion"]),
    # RoPE flags MLA's RoPE does not read.
    **{f"mla-{flag[2:]}": ([*MLA, *argv], [" ".join(argv), "not supported"])
       for flag, argv in ROPE_KNOBS.items()},
    # Context parallelism: MLA all-gathers the latents (CP itself is supported).
    "cp-a2a": ([*MLA, "--context-parallel-size", "2", "--cp-comm-type", "a2a"],
               ["--cp-comm-type a2a", "allgather"]),
    "cp-hybrid": ([*MLA, "--context-parallel-size", "2", "--hybrid-context-parallel"],
                  ["--hybrid-context-parallel"]),
    # Transformer Engine's attention kernels: MLA's attention is the plugin's own.
    **{f"mla-attention-backend-{backend}": ([*MLA, "--attention-backend", backend],
                                            [f"--plugins mla: --attention-backend {backend} "
                                             "is not supported", "mla plugin computes"])
       for backend in ("flash", "fused", "unfused", "local")},
}


ACCEPTED = {  # configurations the plugin honours: no error
    "mla-fp8-recompute": [*MLA, *FP8, "--plugins", "mla", "fp8", "--recompute-granularity",
                          "selective", "--recompute-modules", "layernorm", "mla_up_proj", "mlp"],
    "mla-yarn": [*MLA, *YARN, "--yarn-beta-fast", "32", "--yarn-beta-slow", "1", "--mscale",
                 "0.707", "--mscale-all-dim", "0.707"],
    "mla-yarn-round-to-int": [*MLA, "--yarn-correction-range-round-to-int"],
    "mla-rope": [*MLA, *ROPE],
    "mla-cp2": [*MLA, "--context-parallel-size", "2"],
    "mla-cp2-allgather": [*MLA, "--context-parallel-size", "2", "--cp-comm-type", "allgather"],
    "mla-attention-backend-auto": [*MLA, "--attention-backend", "auto"],  # Megatron's default
}


def enabled(argv, monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # Megatron's TP > 1 requirement
    return parse_enabled(BASE + argv, monkeypatch)


@pytest.mark.parametrize("argv, texts", REFUSALS.values(), ids=REFUSALS.keys())
def test_refused_at_start_up_naming_the_flag(argv, texts, monkeypatch):
    with pytest.raises(PluginError) as refused:
        enabled(argv, monkeypatch)
    for text in texts:
        assert text in str(refused.value)


@pytest.mark.parametrize("argv", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_honoured(argv, monkeypatch):
    enabled(argv, monkeypatch)


@pytest.mark.parametrize("argv, flag", [
    (["--plugins", "mla"], "--multi-latent-attention"),
    (MLA + ["--tensor-model-parallel-size", "3"], "--num-attention-heads 4 is not divisible"),
    (MLA + ["--qk-pos-emb-head-dim", "5"], "--qk-pos-emb-head-dim 5"),
    (MLA + ["--rope-type", "yarn", "--rotary-scaling-factor", "40"],
     "--yarn-original-max-position-embeddings"),
    (MLA + ["--recompute-granularity", "selective"], "--recompute-modules core_attn"),
    (MLA + ["--recompute-granularity", "selective", "--recompute-modules", "core_attn",
            "layernorm"], "--recompute-modules core_attn"),
    # Megatron's spelling of selective recomputation, read as its validation sets it (the
    # run plan is made before).
    (MLA + ["--recompute-activations"], "--recompute-modules core_attn"),
    (["--multi-latent-attention"], "--plugins mla"),
], ids=["no-mla-flag", "heads-vs-tp", "odd-rope", "yarn-no-length", "default-core-attn",
        "core-attn", "recompute-activations", "megatron-mla-without-plugin"])
def test_bad_configurations_name_the_flag(argv, flag, monkeypatch):
    if "--tensor-model-parallel-size" in argv:
        monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    with pytest.raises(PluginError, match=flag.replace(" ", r"\s").replace("-", r"\-")):
        enabled(argv, monkeypatch)


def _megatron_parser() -> argparse.ArgumentParser:
    from megatron.training.arguments import add_megatron_arguments

    return add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))


def test_refusal_table_holds_megatrons_defaults():
    """The plugin refuses any value but Megatron's default: the table must hold it."""
    defaults = _megatron_parser().parse_args([])
    for dest, flag, honoured, _ in IGNORED_ROPE_FLAGS:
        assert getattr(defaults, dest) == honoured[0], flag
    assert set(ROPE_KNOBS) == {flag for _, flag, _, _ in IGNORED_ROPE_FLAGS}
