"""Every FP8 flag of Megatron 0.19.2 is honoured or refused at start-up by name (with the
reason); nothing is ignored quietly.

Driven through Megatron's argument parsing and the plugins' validation on one process, as
the launch path does (`tests.helpers.plugin_args`). The recomputation the plugin makes work
(full, 'mlp') is checked for gradients in `tests/plugins/test_recompute.py`; MLA's flags,
FP8 with MLA's recomputation included, in `tests/plugins/mla/test_refusals.py`.
"""

from __future__ import annotations

import argparse
import re

import pytest

import integration  # noqa: F401  (megatron.training on Python 3.11)
from plugins import PluginError
from plugins.fp8.plugin import NOT_HONOURED
from tests.helpers.plugin_args import enabled as parse_enabled

BASE = ["--num-layers", "2", "--hidden-size", "256", "--ffn-hidden-size", "512",
        "--num-attention-heads", "4", "--seq-length", "64", "--max-position-embeddings", "64",
        "--micro-batch-size", "2", "--transformer-impl", "local",
        "--no-gradient-accumulation-fusion"]
FP8 = ["--fp8-format", "e4m3", "--fp8-recipe", "blockwise"]
PLUGIN_FP8 = ["--plugins", "fp8", *FP8]

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
    # GTP weight shards, which Megatron's linears gather inside their GEMM.
    "gtp": (PLUGIN_FP8 + ["--tensor-parallel-num-weight-shards", "2"],
            ["--tensor-parallel-num-weight-shards 2 is not supported with --plugins fp8",
             "--tensor-model-parallel-size 1 (GTP)", "drop --tensor-parallel-num-weight-shards"]),
    "expert-gtp": (PLUGIN_FP8 + ["--tensor-model-parallel-size", "2",
                                 "--expert-tensor-parallel-num-weight-shards", "4"],
                   ["--expert-tensor-parallel-num-weight-shards 4 is not supported with "
                    "--plugins fp8", "--expert-tensor-parallel-size 2 (GTP)"]),
}

ACCEPTED = {  # configurations the plugin honours: no error
    "fp8": [*FP8, "--plugins", "fp8"],
    "fp8-full-recompute": [*FP8, "--plugins", "fp8", "--recompute-granularity", "full",
                           "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    "fp8-mlp-recompute": [*FP8, "--plugins", "fp8", "--recompute-granularity", "selective",
                          "--recompute-modules", "mlp"],
    "fp8-knobs-with-te": [*FP8, "--transformer-impl", "transformer_engine",
                          "--fp8-margin", "2"],  # TE's own modules read them
    # as many weight shards as tensor-parallel ranks: no GTP
    "fp8-weight-shards-of-tp": [*PLUGIN_FP8, "--tensor-model-parallel-size", "2",
                                "--tensor-parallel-num-weight-shards", "2",
                                "--expert-tensor-parallel-num-weight-shards", "2"],
    # without the plugin, Megatron's own linears take them
    "gtp-without-plugin": ["--tensor-parallel-num-weight-shards", "2"],
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


@pytest.mark.parametrize("argv, message", [
    (["--plugins", "fp8"], "--fp8-format e4m3"),
    (["--plugins", "fp8", "--fp8-format", "hybrid", "--fp8-recipe", "blockwise"], "--fp8-format e4m3"),
    (["--plugins", "fp8", "--fp8-format", "e4m3"], "--fp8-recipe blockwise"),
    (PLUGIN_FP8 + ["--fp8-backend", "torch"], "--fp8-backend torch is unavailable"),
    (PLUGIN_FP8 + ["--hidden-size", "192"], "--hidden-size 192 gives 192 per rank; it must be a "
                                     "multiple of 128"),
    (PLUGIN_FP8 + ["--tensor-model-parallel-size", "4"],
     "--num-attention-heads 4 x --kv-channels 64 / --tensor-model-parallel-size 4 gives 64"),
    (["--plugins", "mla", *PLUGIN_FP8[1:], "--multi-latent-attention", "--kv-lora-rank", "96",
      "--v-head-dim", "32", "--qk-head-dim", "32", "--qk-pos-emb-head-dim", "16"],
     "--kv-lora-rank 96 gives 96"),
    (PLUGIN_FP8 + ["--num-experts", "4", "--moe-ffn-hidden-size", "64"],
     "--moe-ffn-hidden-size 64 gives 64 per rank"),
    (["--fp8-backend", "emulated"], "--fp8-backend needs '--plugins fp8'"),
    (["--fp8-cache-weights"], "--fp8-cache-weights needs '--plugins fp8'"),
    (PLUGIN_FP8 + ["--cuda-graph-impl", "local"], "cannot run under CUDA graphs (--cuda-graph-impl "
                                           "local): a captured step would replay"),
    (PLUGIN_FP8 + ["--cuda-graph-impl", "full_iteration"], "(--cuda-graph-impl full_iteration)"),
    (PLUGIN_FP8 + ["--enable-cuda-graph"], "cannot run under CUDA graphs (--enable-cuda-graph)"),
], ids=["no-format", "hybrid", "no-recipe", "torch-backend-on-cpu", "hidden", "attn-proj-tp",
        "mla-kv-lora", "expert-ffn", "flag-without-plugin", "cache-without-plugin",
        "cuda-graph-local", "cuda-graph-full-iteration", "enable-cuda-graph"])
def test_bad_configurations_fail_at_start(argv, message, monkeypatch):
    with pytest.raises(PluginError, match=re.escape(message)):
        enabled(argv, monkeypatch)


def _megatron_parser() -> argparse.ArgumentParser:
    from megatron.training.arguments import add_megatron_arguments

    return add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))


def test_every_fp8_flag_of_megatron_is_decided():
    """A flag Megatron adds with a new version fails here until it is honoured or refused.
    (`--moe-router-padding-for-fp8` is the moe plugin's: tests/plugins/moe/test_refusals.py.)"""
    honoured = {"--fp8-format", "--fp8-recipe"}  # e4m3 and blockwise, by the plugin
    refused = {flag for _, flag, _, _ in NOT_HONOURED}
    fp8_flags = [action.option_strings for action in _megatron_parser()._actions
                 if any("fp8" in o and not o.startswith("--moe-") for o in action.option_strings)]
    assert fp8_flags
    assert not [flags for flags in fp8_flags if not set(flags) & (honoured | refused)]
    assert set(FP8_KNOBS) == refused  # and each refusal is in the table above


def test_refusal_table_holds_megatrons_defaults():
    """The plugin refuses any value but Megatron's default: the table must hold it."""
    defaults = _megatron_parser().parse_args([])
    for dest, flag, honoured, _ in NOT_HONOURED:
        assert getattr(defaults, dest) == honoured[0], flag


def test_embedding_wgrad_deferral_is_refused_before_the_plugin_is_asked(monkeypatch):
    """--defer-embedding-wgrad-compute (what Megatron passes to `_forward_impl` as
    grad_output_buffer and wgrad_deferral_limit) fails in every local linear, the FP8 ones
    among them: megaseek's check of Megatron's flags refuses it first."""
    from tests.integration.test_argument_checks import start_up_refusal

    for extra, said in ((["--defer-embedding-wgrad-compute", "--pipeline-model-parallel-size",
                          "2"], "--defer-embedding-wgrad-compute needs Transformer Engine's"),
                        (["--wgrad-deferral-limit", "2"], "--wgrad-deferral-limit 2 limits")):
        assert start_up_refusal(BASE + PLUGIN_FP8 + extra, monkeypatch).startswith(said)


def test_every_keyword_of_megatrons_gemm_is_honoured_or_its_flags_refused():
    """The keywords Megatron's linears pass to `_forward_impl` that the FP8 GEMM does not
    take by name carry features refused at start-up (the tests above)."""
    import inspect

    from plugins.fp8.modules import _fp8_forward_impl
    from upstream.private_names import COLUMN_KEYWORDS

    taken = set(inspect.signature(_fp8_forward_impl).parameters)
    assert COLUMN_KEYWORDS - taken == {"grad_output_buffer", "wgrad_deferral_limit",
                                       "gtp_remat_size"}
