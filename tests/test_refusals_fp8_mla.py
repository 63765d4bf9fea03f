"""Every FP8 flag of Megatron 0.19.2, and every flag MLA's attention meets, is honoured or
refused at start-up by name (with the reason); nothing is ignored quietly.

Driven through Megatron's argument parsing and the plugins' validation on one process, as
the launch path does (`tests.plugin_args`). The recomputation these plugins make work
(full, 'mlp', MLA's own) is checked for gradients in `tests/test_recompute_fp8_mla.py`,
MLA under context parallelism in `tests/test_mla.py`.
"""

from __future__ import annotations

import argparse

import pytest

import integration  # noqa: F401  (megatron.training on Python 3.11)
from plugins import PluginError
from plugins.fp8.plugin import NOT_HONOURED
from plugins.mla.plugin import IGNORED_ROPE_FLAGS
from tests.plugin_args import enabled as parse_enabled

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

# A value other than Megatron's default for each flag of the fp8 plugin's NOT_HONOURED.
FP8_KNOBS = {
    "--fp8-margin": ["--fp8-margin", "2"],
    "--fp8-interval": ["--fp8-interval", "4"],
    "--fp8-amax-history-len": ["--fp8-amax-history-len", "1024"],
    "--fp8-amax-compute-algo": ["--fp8-amax-compute-algo", "max"],
    "--fp8-quantizer-factory": ["--fp8-quantizer-factory", "package.module.factory"],
    "--no-fp8-wgrad": ["--no-fp8-wgrad"],
    "--fp8-output-proj": ["--fp8-output-proj"],
    "--fp8-param-gather": ["--fp8-param-gather"],
    "--keep-fp8-transpose-cache": ["--keep-fp8-transpose-cache"],
    "--reuse-grad-buf-for-mxfp8-param-ag": ["--reuse-grad-buf-for-mxfp8-param-ag"],
    "--first-last-layers-bf16": ["--first-last-layers-bf16"],
    "--num-layers-at-start-in-bf16": ["--num-layers-at-start-in-bf16", "2"],
    "--num-layers-at-end-in-bf16": ["--num-layers-at-end-in-bf16", "2"],
    "--te-precision-config-file": ["--te-precision-config-file", "precision.yaml"],
}
# The same for MLA's IGNORED_ROPE_FLAGS.
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
    # FP8 flags without the plugin: Megatron's local modules would ignore them.
    "fp8-format-without-plugin": (FP8, ["--fp8-format e4m3", "--plugins fp8",
                                        "full precision"]),
    "hybrid-without-plugin": (["--fp8-format", "hybrid"], ["--fp8-format hybrid",
                                                           "--plugins fp8"]),
    "recipe-without-format": (["--fp8-recipe", "blockwise"], ["--fp8-recipe blockwise",
                                                              "--fp8-format e4m3"]),
    # Transformer Engine's FP8 knobs, with and without the plugin.
    **{f"{flag[2:]}-without-plugin": (argv, [" ".join(argv), "not supported"])
       for flag, argv in FP8_KNOBS.items()},
    **{f"{flag[2:]}-with-plugin": ([*FP8, "--plugins", "fp8", *argv],
                                   [" ".join(argv), "not supported"])
       for flag, argv in FP8_KNOBS.items()},
    "delayed-scaling-reason": (["--fp8-amax-history-len", "16"], ["amax history"]),
    # The plugin's own format and recipe.
    "plugin-hybrid": (["--plugins", "fp8", "--fp8-format", "hybrid", "--fp8-recipe",
                       "blockwise"], ["--fp8-format e4m3"]),
    "plugin-delayed": (["--plugins", "fp8", "--fp8-format", "e4m3"],
                       ["--fp8-recipe blockwise"]),
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

ACCEPTED = {  # configurations the plugins honour: no error
    "fp8": [*FP8, "--plugins", "fp8"],
    "fp8-full-recompute": [*FP8, "--plugins", "fp8", "--recompute-granularity", "full",
                           "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    "fp8-mlp-recompute": [*FP8, "--plugins", "fp8", "--recompute-granularity", "selective",
                          "--recompute-modules", "mlp"],
    "mla-fp8-recompute": [*MLA, *FP8, "--plugins", "mla", "fp8", "--recompute-granularity",
                          "selective", "--recompute-modules", "layernorm", "mla_up_proj", "mlp"],
    "mla-yarn": [*MLA, *YARN, "--yarn-beta-fast", "32", "--yarn-beta-slow", "1", "--mscale",
                 "0.707", "--mscale-all-dim", "0.707"],
    "mla-yarn-round-to-int": [*MLA, "--yarn-correction-range-round-to-int"],
    "mla-rope": [*MLA, *ROPE],
    "mla-cp2": [*MLA, "--context-parallel-size", "2"],
    "mla-cp2-allgather": [*MLA, "--context-parallel-size", "2", "--cp-comm-type", "allgather"],
    "mla-attention-backend-auto": [*MLA, "--attention-backend", "auto"],  # Megatron's default
    "fp8-knobs-with-te": [*FP8, "--transformer-impl", "transformer_engine",
                          "--fp8-margin", "2"],  # TE's own modules read them
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


def _megatron_parser() -> argparse.ArgumentParser:
    from megatron.training.arguments import add_megatron_arguments

    return add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))


def test_every_fp8_flag_of_megatron_is_decided():
    """A flag Megatron adds with a new version fails here until it is honoured or refused.
    (`--moe-router-padding-for-fp8` is the moe plugin's: tests/test_refusals_moe.py.)"""
    honoured = {"--fp8-format", "--fp8-recipe"}  # e4m3 and blockwise, by the plugin
    refused = {flag for _, flag, _, _ in NOT_HONOURED}
    fp8_flags = [action.option_strings for action in _megatron_parser()._actions
                 if any("fp8" in o and not o.startswith("--moe-") for o in action.option_strings)]
    assert fp8_flags
    assert not [flags for flags in fp8_flags if not set(flags) & (honoured | refused)]
    assert set(FP8_KNOBS) == refused  # and each refusal is in the table above


def test_refusal_tables_hold_megatrons_defaults():
    """The plugins refuse any value but Megatron's default: the tables must hold it."""
    defaults = _megatron_parser().parse_args([])
    for dest, flag, honoured, _ in (*NOT_HONOURED, *IGNORED_ROPE_FLAGS):
        assert getattr(defaults, dest) == honoured[0], flag
    assert set(ROPE_KNOBS) == {flag for _, flag, _, _ in IGNORED_ROPE_FLAGS}
