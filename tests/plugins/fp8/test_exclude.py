"""`--fp8-exclude-modules SLOT ...`: the named linear slots stay in the training dtype (what
is under them included), the rest run in FP8; the start-up line lists both."""

from __future__ import annotations

import pytest
import torch

import integration  # noqa: F401  (megatron.training on Python 3.11)
from plugins import PluginError
from tests.helpers.multirank import run_ranks
from tests.helpers.training_runs import MLA_CHUNK

MODEL = [*MLA_CHUNK, "--plugins", "mla"]
FP8 = ["fp8", "--fp8-format", "e4m3", "--fp8-recipe", "blockwise", "--fp8-backend",
       "emulated"]
EXCLUDED = ["--fp8-exclude-modules", "linear_kv_up_proj", "linear_fc1", "linear_fc2"]
VOCAB = 64


def test_unknown_slot_is_refused_naming_the_flag(monkeypatch):
    from tests.helpers.plugin_args import enabled

    with pytest.raises(PluginError, match=r"--fp8-exclude-modules linear_kv_up: unknown; "
                                          r"choose from linear_qkv, "):
        enabled(MODEL + FP8 + ["--fp8-exclude-modules", "linear_kv_up"], monkeypatch)
    with pytest.raises(PluginError, match="--fp8-exclude-modules needs '--plugins fp8'"):
        enabled(MODEL + ["--fp8-exclude-modules", "experts"], monkeypatch)


def _model(argv):
    from tests.helpers.patching import patching, plugin_fixes
    from tests.helpers.plugin_args import gpt_model, validated

    args, plugins = validated(MODEL + argv)
    with patching(plugin_fixes(plugins)):
        return args, gpt_model(args, plugins, VOCAB)


def _grads(module, x):
    """(output, input gradient, weight gradients) of module on x."""
    x = x.clone().requires_grad_()
    y = module(x)
    y = y[0] if isinstance(y, tuple) else y
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


def _excluded_vs_plain(rank, world_size):
    from plugins.fp8.modules import _FP8Module, fp8_census
    from tests.helpers.mla_build import megatron_ranks

    with megatron_ranks():
        args, excluded = _model(FP8 + EXCLUDED)
        _, plain = _model([])  # no fp8 plugin: every linear in the training dtype (FP32)
        _, all_fp8 = _model(FP8)
        plain.load_state_dict(excluded.state_dict())
        all_fp8.load_state_dict(excluded.state_dict())
        census = fp8_census([excluded], args.fp8_exclude_modules)
        layer = lambda model: model.decoder.layers[0]  # noqa: E731
        g = torch.Generator().manual_seed(0)
        mlp_input = torch.randn(8, 2, 128, generator=g)
        kv_input = torch.randn(8, 2, 128, generator=g)
        kv = lambda model: layer(model).self_attention.linear_kv_up_proj  # noqa: E731
        return dict(
            census=census,
            fp8_kinds=sorted({type(m).__name__ for m in excluded.modules()
                              if isinstance(m, _FP8Module)}),
            mlp=[_grads(layer(m).mlp, mlp_input) for m in (excluded, plain, all_fp8)],
            kv=[_grads(kv(m), kv_input) for m in (excluded, plain, all_fp8)])


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[:2], b[:2])) and a[2].keys() == b[2].keys() \
        and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def test_excluded_slots_run_in_the_training_dtype_and_are_listed():
    r = run_ranks(_excluded_vs_plain, 1, timeout=300)[0]
    # The excluded MLP (fc1, its SwiGLU, fc2) and kv up-projection compute exactly what the
    # model without the fp8 plugin computes; the same modules in FP8 do not.
    excluded, plain, all_fp8 = r["mlp"]
    assert _equal(excluded, plain) and not _equal(all_fp8, plain)
    excluded, plain, all_fp8 = r["kv"]
    assert _equal(excluded, plain) and not _equal(all_fp8, plain)
    assert r["fp8_kinds"] == ["FP8ColumnParallelLinear", "FP8ReplicatedLinear",
                              "FP8RowParallelLinear"]
    assert r["census"] == (
        "fp8: linears in FP8: self_attention.linear_kv_down_proj x2, "
        "self_attention.linear_proj x2, self_attention.linear_q_down_proj x2, "
        "self_attention.linear_q_up_proj x2; kept in the training dtype "
        "(--fp8-exclude-modules): mlp.linear_fc1 x2, mlp.linear_fc2 x2, "
        "self_attention.linear_kv_up_proj x2")


MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-router-score-function", "sigmoid",
       "--moe-router-enable-expert-bias", "--moe-ffn-hidden-size", "128",
       "--moe-shared-expert-intermediate-size", "128", "--moe-router-load-balancing-type",
       "none", "--moe-layer-freq", "([0]+[1]*1)"]


def _census_of_built_moe_model(rank, world_size):
    from plugins.fp8.modules import fp8_census
    from tests.helpers.mla_build import megatron_ranks

    with megatron_ranks():
        args, model = _model(["moe", *FP8, *MOE])  # "moe" joins MODEL's --plugins mla
        return fp8_census([model], [])


def test_describe_lists_the_linears_the_built_model_runs_in_fp8(capsys):
    """`megaseek describe`'s FP8 line names the places of a layer where the built model
    (MLA, a dense and a MoE layer with shared experts) has FP8 modules, no more, no fewer;
    it refuses --fp8-exclude-modules, which its activation bytes do not model."""
    from integration import describe as d

    census = run_ranks(_census_of_built_moe_model, 1, timeout=300)[0]
    built = {entry.rsplit(" x", 1)[0]
             for entry in census.removeprefix("fp8: linears in FP8: ").split(", ")}
    argv = ["--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "256",
            "--num-attention-heads", "4", "--seq-length", "8", "--swiglu",
            "--disable-bias-linear", "--attention-dropout", "0", "--hidden-dropout", "0",
            "--multi-latent-attention", "--q-lora-rank", "128", "--kv-lora-rank", "128",
            "--qk-head-dim", "32", "--qk-pos-emb-head-dim", "16", "--v-head-dim", "32",
            "--num-experts", "4", "--moe-ffn-hidden-size", "128",
            "--moe-shared-expert-intermediate-size", "128", "--moe-layer-freq", "([0]+[1]*1)",
            "--plugins", "mla", "moe", "fp8",
            # what a run asks of the moe and fp8 plugins (describe checks as a run does)
            "--moe-router-topk", "2", "--moe-router-score-function", "sigmoid",
            "--moe-router-enable-expert-bias", "--moe-router-load-balancing-type", "none",
            "--fp8-format", "e4m3", "--fp8-recipe", "blockwise"]
    described = d.describe(d.parse(argv))["fp8_linears"]
    assert "mlp.experts" in built and "mlp.shared_experts.linear_fc1" in built
    assert sorted(described) == sorted(built)
    d.main(argv)
    assert f"FP8           {', '.join(described)} (embedding" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        d.main(argv + ["--fp8-exclude-modules", "linear_kv_up_proj"])
    assert "--fp8-exclude-modules is not modelled yet" in capsys.readouterr().err


def _refusal_of_an_absent_slot(rank, world_size):
    from tests.helpers.mla_build import megatron_ranks

    with megatron_ranks():
        from tests.helpers.plugin_args import validated

        excluded = FP8 + ["--fp8-exclude-modules", "linear_qkv", "linear_fc1"]
        _, model = _model(excluded)
        (fp8,) = [p for p in validated(MODEL + excluded)[1] if p.name == "fp8"]
        try:
            fp8.run_hooks().on_optimizer_step([model], None)
        except PluginError as error:
            return str(error)
        return None


def test_a_slot_the_model_does_not_have_is_refused_naming_its_slots():
    """MLA has no linear_qkv: excluding it would keep nothing in the training dtype. Known
    once the model is built (its specs, and its pipeline stage's layers: gathered over the
    ranks), before the first step."""
    assert run_ranks(_refusal_of_an_absent_slot, 1, timeout=300)[0] == (
        "--fp8-exclude-modules linear_qkv: this model has no such linear; its slots are "
        "linear_proj, linear_q_down_proj, linear_q_up_proj, linear_kv_down_proj, "
        "linear_kv_up_proj, linear_fc1, linear_fc2")
