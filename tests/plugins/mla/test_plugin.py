"""`--plugins mla` on Megatron's command line: what it accepts (what it refuses:
tests/plugins/mla/test_refusals.py)."""

from __future__ import annotations

import integration  # noqa: F401  (megatron.training on Python 3.11)
from tests.helpers.plugin_args import enabled as parse_enabled

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
