"""Recomputation with the moe plugin's layer: `--recompute-modules moe`, `shared_experts`
and `moe_act` (selective) and `--recompute-granularity full` give the same outputs,
gradients, expert loads and logged losses as no recomputation (bit for bit: a recomputed
forward runs the same operations on the same inputs), at EP=1 and EP=2; what each one
recomputes is recomputed, once; tokens are counted once per micro-batch."""

from __future__ import annotations

import argparse
import contextlib
import weakref

import pytest
import torch

from tests.helpers import backend
from tests.helpers.moe_build import moe_layer, tokens
from tests.helpers.multirank import run_ranks
from tests.helpers.patching import patching

LOSSES = dict(moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-2,
              moe_z_loss_coeff=1e-2)
RECOMPUTE = [["moe"], ["shared_experts"], ["moe_act"], ["moe", "shared_experts", "moe_act"]]


def _recompute_fixes():
    """The upstream fixes the launch path applies for --plugins moe with these flags."""
    from upstream import moe
    from upstream.patching import applicable

    args = argparse.Namespace(plugins=["moe"], recompute_granularity="selective",
                              recompute_modules=["moe", "shared_experts", "moe_act", "mlp"])
    return applicable(moe.FIXES, args)


def one_step(layer, seed: int = 1) -> dict[str, torch.Tensor]:
    """A training micro-batch through `layer`: its output, every gradient, the expert loads
    and what it recorded for Megatron's log."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    tracker.clear()
    x = tokens(seed=seed)
    out, _ = layer(x)
    (out.square().mean() * 1e3).backward()
    result = {"out": out.detach(), "x.grad": x.grad, "load": layer.tokens_per_expert.clone()}
    result.update({f"{name}.grad": p.grad for name, p in layer.named_parameters()})
    result.update({name: entry.values.clone() for name, entry in tracker.metrics.items()})
    return result


@contextlib.contextmanager
def counted(owner, name: str, calls: list):
    """`owner.name` appends its first argument to `calls` at each call, inside the block."""
    original = getattr(owner, name)

    def counting(first, *args, **kwargs):
        calls.append(first)
        return original(first, *args, **kwargs)

    setattr(owner, name, counting)
    try:
        yield
    finally:
        setattr(owner, name, original)


def recomputed_steps(rank: int, world_size: int) -> dict:
    """On each EP rank: one step without recomputation, then one with each recompute
    setting, and the forward and activation computations and checkpoints each made."""
    from megatron.core import tensor_parallel

    import plugins.common.experts as experts_module
    from plugins.moe.layer import DeepSeekMoE
    from tests.helpers.mla_build import megatron_ranks

    results = {}
    forwards, activations, checkpoints = [], [], []
    with (patching(_recompute_fixes()), megatron_ranks(ep=world_size),
          counted(DeepSeekMoE, "_forward", forwards),
          counted(experts_module, "swiglu", activations),
          counted(tensor_parallel, "checkpoint", checkpoints)):
        for modules in [[]] + RECOMPUTE:
            forwards.clear(), activations.clear(), checkpoints.clear()
            extra = dict(recompute_granularity="selective", recompute_modules=modules)
            layer = moe_layer(rank, world_size, **LOSSES, **(extra if modules else {}))
            step = one_step(layer)
            step["forwards"], step["activations"] = len(forwards), len(activations)
            # whose forward was checkpointed: the layer's, the shared experts'
            step["checkpointed"] = sorted(type(getattr(fn, "__self__", fn)).__name__
                                          for fn in checkpoints)
            results[" ".join(modules) or "none"] = step
    return results


@pytest.mark.parametrize("ep", [1, 2])
def test_recompute_modules_give_the_same_step(ep):
    tol = backend.tolerance(gpu=(1e-5, 1e-6), why="the backward scatter-adds rows (combine, "
                            "expert gradients) with atomics on CUDA: order varies run to run")
    for results in run_ranks(recomputed_steps, ep):
        plain = results["none"]
        assert plain["forwards"] == 1 and plain["activations"] == 1
        assert plain["seq_load_balancing_loss"].sum() > 0 and plain["z_loss"].sum() > 0
        for modules in RECOMPUTE:
            got = results[" ".join(modules)]
            for name, want in plain.items():
                if not isinstance(want, torch.Tensor):
                    continue
                backend.assert_close(got[name], want, tol,
                                     msg=f"{' '.join(modules)}: {name} differs")
            # Each one recomputes what it names, once, in backward.
            assert got["forwards"] == (2 if "moe" in modules else 1)
            assert got["activations"] == 1 + ("moe_act" in modules) + ("moe" in modules)
            assert got["checkpointed"] == sorted(
                (["DeepSeekMoE"] if "moe" in modules else [])
                + (["SharedExpertMLP"] * (1 + ("moe" in modules)) if "shared_experts" in modules
                   else []))


def activation_kept(rank: int, world_size: int) -> dict[str, bool]:
    """Whether the routed experts' SwiGLU output is still alive after the forward."""
    import plugins.common.experts as experts_module
    from tests.helpers.mla_build import megatron_ranks

    kept = {}
    swiglu, keeping_input = experts_module.swiglu, experts_module._SwiGLUKeepingInput.apply
    outputs = []
    with patching(_recompute_fixes()) as patcher, megatron_ranks():
        patcher.setattr(experts_module, "swiglu",
                        lambda h: outputs.append(weakref.ref(y := swiglu(h))) or y)
        patcher.setattr(experts_module._SwiGLUKeepingInput, "apply",
                        lambda h: outputs.append(weakref.ref(y := keeping_input(h))) or y)
        for modules in ([], ["moe_act"]):
            outputs.clear()
            layer = moe_layer(recompute_granularity="selective", recompute_modules=modules)
            out, _ = layer(tokens())
            kept[" ".join(modules) or "none"] = outputs[0]() is not None
            out.sum().backward()
    return kept


def test_moe_act_keeps_no_activation_for_backward():
    """Without moe_act, fc2 keeps the SwiGLU output for its weight gradient; with it, the
    output is freed after the forward and backward computes it again."""
    assert run_ranks(activation_kept, 1)[0] == {"none": True, "moe_act": False}


def full_recompute_steps(rank: int, world_size: int) -> dict:
    """Megatron's TransformerBlock of two MoE layers (the plugin's) with and without
    --recompute-granularity full: its checkpoint reruns each layer's forward in backward."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_block import TransformerBlock

    from plugins import Enabled, transform_spec
    from plugins.moe.layer import DeepSeekMoE
    from plugins.moe.plugin import MOE, MoEPluginConfig
    from tests.helpers.mla_build import megatron_ranks

    moe = Enabled(MOE, MoEPluginConfig())
    results, weights, forwards = {}, None, []
    with megatron_ranks(), counted(DeepSeekMoE, "_forward", forwards):
        for granularity in (None, "full"):
            forwards.clear()
            full = dict(recompute_granularity="full", recompute_method="uniform",
                        recompute_num_layers=1) if granularity else {}
            config = moe_layer(**LOSSES, **full, hidden_dropout=0.0, attention_dropout=0.0).config
            block = TransformerBlock(config, transform_spec(
                [moe], get_gpt_decoder_block_spec(config, use_transformer_engine=False)))
            weights = weights or block.state_dict()
            block.load_state_dict(weights)
            block.train()
            x = tokens()
            out = block(x, attention_mask=None)
            out.square().mean().backward()
            layers = [m for m in block.modules() if isinstance(m, DeepSeekMoE)]
            results[granularity or "none"] = {
                "forwards": len(forwards), "out": out.detach(), "x.grad": x.grad,
                "loads": torch.stack([m.tokens_per_expert for m in layers]),
                **{n: p.grad for n, p in block.named_parameters()}}
    return results


def test_full_recompute_counts_tokens_once():
    results = run_ranks(full_recompute_steps, 1)[0]
    plain, full = results["none"].pop("forwards"), results["full"].pop("forwards")
    assert (plain, full) == (2, 4)  # each layer's forward ran again in backward
    assert results["none"]["loads"].sum() == 2 * 32 * 2  # 2 layers, 32 tokens, top-2
    for name, want in results["none"].items():
        assert torch.equal(results["full"][name], want), name


# --- the upstream fixes the recompute settings need --------------------------------------------

def test_moe_act_needs_no_grouped_gemm_with_the_plugin(patcher):
    """Megatron refuses moe_act without --moe-grouped-gemm (CUDA kernels); the fix lifts it
    for --plugins moe, whose experts recompute the activation themselves."""
    from megatron.core.transformer import TransformerConfig

    from upstream.patching import apply_fixes

    settings = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_moe_experts=8,
                    recompute_granularity="selective", recompute_modules=["moe_act"])
    with pytest.raises(ValueError, match="moe_act in recompute_modules is only supported"):
        TransformerConfig(**settings)
    apply_fixes(_recompute_fixes(), patcher)
    assert "moe_act" in TransformerConfig(**settings).recompute_modules


def mlp_recompute(rank: int, world_size: int) -> dict[str, bool]:
    """TransformerLayer.recompute_mlp of a dense layer and of the plugin's MoE layer, for
    --recompute-modules mlp, without and with the fix."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.spec_utils import build_module

    from plugins import Enabled, transform_spec
    from plugins.moe.plugin import MOE, MoEPluginConfig
    from tests.helpers.mla_build import megatron_ranks

    moe = Enabled(MOE, MoEPluginConfig())
    found = {}
    with megatron_ranks():
        config = moe_layer(recompute_granularity="selective", recompute_modules=["mlp"],
                           moe_layer_freq=[0, 1]).config
        specs = transform_spec([moe], get_gpt_decoder_block_spec(
            config, use_transformer_engine=False)).layer_specs
        for fixed in (False, True):
            with patching(_recompute_fixes() if fixed else []):
                for name, spec in zip(("dense", "moe"), specs):
                    layer = build_module(spec, config=config, layer_number=1)
                    found[f"{name}, {'fixed' if fixed else 'upstream'}"] = layer.recompute_mlp
    return found


def test_mlp_recompute_leaves_the_moe_layers_to_moe():
    """Megatron's 'mlp' recompute is for dense MLPs; it would take the plugin's MoE layer
    for one (it is not Megatron's MoELayer); with the fix it does not."""
    assert run_ranks(mlp_recompute, 1)[0] == {
        "dense, upstream": True, "moe, upstream": True,
        "dense, fixed": True, "moe, fixed": False}


@pytest.mark.parametrize("granularity, modules, expected", [
    ("selective", ["moe_act"], ["moe-act-recompute-without-grouped-gemm"]),
    ("selective", ["mlp"], ["moe-layer-not-recomputed-as-mlp"]),
    ("selective", ["moe", "shared_experts"], []),
    ("full", ["moe_act", "mlp"], []),
])
def test_fixes_apply_only_with_their_flags(granularity, modules, expected):
    from plugins import Enabled
    from plugins.mla.plugin import MLA, MLAPluginConfig
    from plugins.moe.plugin import MOE, MoEPluginConfig

    def names(plugins):  # the fixes a run with `plugins` applies (integration.hooks.enable)
        enabled = {"moe": Enabled(MOE, MoEPluginConfig(recompute_granularity=granularity,
                                                       recompute_modules=tuple(modules))),
                   "mla": Enabled(MLA, MLAPluginConfig())}
        return [fix.name for name in plugins if enabled[name].fixes is not None
                for fix in enabled[name].fixes()]

    assert names(["moe"]) == expected and names(["mla"]) == []
