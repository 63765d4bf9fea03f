"""Megatron's recomputation with the fp8, mla and moe plugins: the same gradients as
without it.

Each model is built as the launch path builds it: Megatron's parser with the registry's
flags, the enabled plugins' fixes applied (with FP8, full and 'mlp' recomputation would
otherwise go to Transformer Engine's te_checkpoint: `upstream.transformer.FP8_RECOMPUTE`),
Megatron's block spec transformed by the plugins, `GPTModel`, one forward and backward.
Recomputation reruns the same modules on the same inputs with the RNG states of the first
run (dropout is on), so every gradient must be bit-identical to the run without it. A
forward hook counts the reruns, so that a recomputation that silently did nothing fails.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.multirank import run_ranks
from tests.helpers.plugin_args import gpt_model, validated
from tests.plugins.test_order import FP8, MLA, MODEL, MOE

MODELS = {  # two layers each; with MOE the second is an MoE layer
    "dense-fp8": [*FP8, "--plugins", "fp8"],
    "mla": [*MLA, "--plugins", "mla"],
    "mla-moe-fp8": [*MLA, *MOE, *FP8, "--plugins", "mla", "moe", "fp8"],
}
FULL = ["--recompute-granularity", "full"]
SELECTIVE = ["--recompute-granularity", "selective", "--recompute-modules"]
# name -> (flags, whether a dense layer's mlp reruns, whether an MoE layer's reruns):
# 'mlp' is the dense MLP only, as in Megatron (MoE layers are recomputed by 'moe').
RECOMPUTE = {
    "none": ([], False, False),
    "full-uniform": ([*FULL, "--recompute-method", "uniform", "--recompute-num-layers", "1"],
                     True, True),
    "full-block": ([*FULL, "--recompute-method", "block", "--recompute-num-layers", "2"],
                   True, True),
    "mlp": ([*SELECTIVE, "mlp"], True, False),
}
MLA_RECOMPUTE = {"mla-own-and-mlp": ([*SELECTIVE, "layernorm", "mla_up_proj", "mlp"],
                                     True, False)}


def _gradients(argv) -> tuple[dict, list[tuple[bool, int]]]:
    """Every parameter's gradient after one forward and backward, and for each layer
    whether its mlp is an MoE layer and how often it ran forward."""
    from tests.helpers.patching import patching, plugin_fixes

    args, plugins = validated(argv)
    with patching(plugin_fixes(plugins)):
        model = gpt_model(args, plugins, 256)
        runs = [0] * len(model.decoder.layers)
        for i, layer in enumerate(model.decoder.layers):
            layer.mlp.register_forward_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
        tokens = torch.randint(256, (2, args.seq_length + 1),
                               generator=torch.Generator().manual_seed(1))
        positions = torch.arange(args.seq_length).expand(2, -1)
        model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean().backward()
        moe = [getattr(layer.mlp, "is_moe_layer", False) for layer in model.decoder.layers]
        return {n: p.grad for n, p in model.named_parameters()}, list(zip(moe, runs))


def _every_recomputation(rank, world_size, model):
    from tests.helpers.mla_build import megatron_ranks

    options = {**RECOMPUTE, **(MLA_RECOMPUTE if "mla" in model else {})}
    with megatron_ranks():
        return {name: (*_gradients(MODEL + MODELS[model] + flags), dense, moe)
                for name, (flags, dense, moe) in options.items()}


@pytest.mark.parametrize("model", MODELS)
def test_recomputation_gives_the_same_gradients(model):
    (results,) = run_ranks(_every_recomputation, 1, model, timeout=600)
    reference, layers, _, _ = results["none"]
    assert reference["decoder.layers.0.mlp.linear_fc1.weight"].abs().sum() > 0
    assert [moe for moe, _ in layers] == ([False, True] if "moe" in model else [False, False])
    for name, (grads, layers, dense_reruns, moe_reruns) in results.items():
        expected = [(moe, 1 + (moe_reruns if moe else dense_reruns)) for moe, _ in layers]
        assert layers == expected, f"{name}: (MoE layer?, forward runs of its mlp) per layer"
        assert grads.keys() == reference.keys()
        for param, grad in grads.items():
            assert torch.equal(grad, reference[param]), f"{name}: {param}"
