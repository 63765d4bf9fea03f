"""`--plugins mla` on Megatron's command line: what it accepts and what it refuses."""

from __future__ import annotations

import pytest

import integration  # noqa: F401  (megatron.training on Python 3.11)
from plugins import PluginError
from tests.plugin_args import enabled as parse_enabled

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "1",
        "--transformer-impl", "local"]
MLA = ["--plugins", "mla", "--multi-latent-attention", "--kv-lora-rank", "16",
       "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "4", "--v-head-dim", "8"]


def enabled(argv, monkeypatch):
    return parse_enabled(BASE + argv, monkeypatch)


def test_mla_enabled_with_megatron_flags(monkeypatch):
    args, plugins = enabled(MLA + ["--recompute-granularity", "selective",
                                   "--recompute-modules", "layernorm", "mla_up_proj"], monkeypatch)
    assert [p.name for p in plugins] == ["mla"]
    assert args.rope_type == "yarn"  # Megatron's documented default for MLA


def test_yarn_flags_reach_the_config_fields(monkeypatch):
    args, _ = enabled(MLA + ["--rope-type", "yarn", "--rotary-scaling-factor", "4",
                             "--yarn-original-max-position-embeddings", "8",
                             "--yarn-beta-fast", "16"], monkeypatch)
    assert (args.original_max_position_embeddings, args.beta_fast) == (8, 16)


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
