"""`--plugins fp8` on Megatron's command line, and what it does to the layer spec."""

from __future__ import annotations

import pytest
import torch

import integration  # noqa: F401
from tests.helpers.plugin_args import enabled as parse_enabled

BASE = ["--num-layers", "2", "--hidden-size", "256", "--ffn-hidden-size", "512",
        "--num-attention-heads", "4", "--seq-length", "64", "--max-position-embeddings", "64",
        "--micro-batch-size", "2", "--transformer-impl", "local",
        "--no-gradient-accumulation-fusion"]
FP8 = ["--plugins", "fp8", "--fp8-format", "e4m3", "--fp8-recipe", "blockwise"]


def enabled(argv, monkeypatch):
    return parse_enabled(BASE + argv, monkeypatch)


def test_auto_backend_resolves_to_emulated_without_a_gpu(monkeypatch):
    args, plugins = enabled(FP8, monkeypatch)
    assert [p.name for p in plugins] == ["fp8"] and plugins[0].config.backend == "emulated"


@pytest.mark.parametrize("capability,backend", [((9, 0), "torch"), ((8, 9), "triton"),
                                                ((10, 0), "triton"), ((8, 0), "emulated")])
def test_auto_backend_on_gpus(capability, backend, monkeypatch):
    """What 'auto' picks per GPU generation (the device queries answered as that GPU's):
    FP8 tensor cores are never left unused for the emulated backend."""
    from plugins.fp8 import backends

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert backends.resolve("auto") == backend


def test_every_layer_linear_becomes_fp8(monkeypatch):
    """The transform maps module classes, whichever plugin put them in the spec:
    Megatron's linears, MLA's replicated down-projections, the MoE layer's experts."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from plugins.fp8.modules import FP8LocalExperts, FP8ReplicatedLinear
    from plugins.fp8.spec import count_fp8_linears
    from plugins.mla.spec import with_mla
    from plugins.moe.plugin import MoEPluginConfig
    from plugins.moe.spec import with_deepseek_moe

    args, plugins = enabled(FP8, monkeypatch)
    dense = plugins[0].transform_layer_spec(get_gpt_layer_local_spec())
    assert count_fp8_linears(dense) == 4  # qkv, proj, fc1, fc2
    mla = plugins[0].transform_layer_spec(with_mla(get_gpt_layer_local_spec()))
    # MLA's q/kv down- and up-projections, q_proj slot, output projection, fc1, fc2.
    assert count_fp8_linears(mla) == 8
    attention = mla.submodules.self_attention.submodules
    assert attention.linear_kv_down_proj.module is FP8ReplicatedLinear
    assert attention.linear_kv_down_proj.params == {"fp8_backend": "emulated",
                                                     "fp8_cache_weights": False}
    moe = with_deepseek_moe(get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False),
                            MoEPluginConfig())
    moe = plugins[0].transform_layer_spec(moe)
    assert moe.submodules.mlp.submodules.experts.module is FP8LocalExperts
    # qkv, proj; routed experts; shared experts' fc1, fc2.
    assert count_fp8_linears(moe) == 5
    args, plugins = enabled(FP8 + ["--fp8-cache-weights"], monkeypatch)
    mla = plugins[0].transform_layer_spec(with_mla(get_gpt_layer_local_spec()))
    attention = mla.submodules.self_attention.submodules
    assert attention.linear_kv_down_proj.params["fp8_cache_weights"] is True
    assert attention.linear_proj.params["fp8_cache_weights"] is True


def test_megatron_still_gates_layernorm_recompute_with_fp8_on_transformer_engine():
    """The fp8 plugin lifts this upstream gate (its norms are not FP8; the MLA plugin does
    the recomputation); once upstream drops it, this test fails and the lift can go."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from upstream.patching import source_has
    from upstream.transformer import RECOMPUTE_FP8_NEEDS_TE

    assert source_has(TransformerConfig.__post_init__, RECOMPUTE_FP8_NEEDS_TE)
