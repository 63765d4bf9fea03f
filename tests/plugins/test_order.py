"""Plugins compose by spec, in the registry's order: every order of `--plugins mla moe fp8`
builds the same model and trains it to the same losses.

Each order is parsed by Megatron's own argument parser (the registry's flags as its
extra_args_provider), enabled by the registry, and Megatron's block spec for the model
(one layer spec per layer: a dense layer, then an MoE layer) is transformed by
`plugins.transform_spec`. The model built from it must have the same parameters, the same
FP8 modules (every linear slot: Megatron's, MLA's down-projections, the routed experts) and
the same losses over a few optimizer steps, bit for bit: the same modules built in the same
order from the same seed compute the same numbers. (Applied in command-line order, `fp8`
before `mla` would map the linears before MLA puts its attention in: 2 fewer FP8 modules
per layer, other losses.)
"""

from __future__ import annotations

import itertools

from tests.helpers.multirank import run_ranks

# Tiny DeepSeek-V3-like shapes; FP8 GEMMs reduce over whole 128-wide tiles.
MODEL = ["--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "256",
         "--num-attention-heads", "2", "--seq-length", "16", "--max-position-embeddings", "16",
         "--micro-batch-size", "2", "--transformer-impl", "local",
         "--no-gradient-accumulation-fusion", "--swiglu", "--no-bias-swiglu-fusion",
         "--disable-bias-linear", "--normalization", "RMSNorm", "--no-persist-layer-norm",
         "--position-embedding-type", "none", "--log-interval", "2"]
MLA = ["--multi-latent-attention", "--q-lora-rank", "128", "--kv-lora-rank", "128",
       "--qk-head-dim", "32", "--qk-pos-emb-head-dim", "16", "--v-head-dim", "64"]
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-router-num-groups", "2",
       "--moe-router-group-topk", "1", "--moe-router-score-function", "sigmoid",
       "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "1e-2",
       "--moe-ffn-hidden-size", "128", "--moe-shared-expert-intermediate-size", "128",
       "--moe-router-load-balancing-type", "none", "--moe-layer-freq", "([0]+[1]*1)",
       "--moe-fp8-dispatch"]
FP8 = ["--fp8-format", "e4m3", "--fp8-recipe", "blockwise", "--fp8-backend", "emulated"]
ORDERS = list(itertools.permutations(["mla", "moe", "fp8"]))
VOCAB, STEPS = 256, 3


def _parsed(order):
    """(args, enabled plugins) for `--plugins ORDER`, as the launch path parses them."""
    from tests.helpers.plugin_args import validated

    return validated([*MODEL, *MLA, *MOE, *FP8, "--plugins", *order])


def _train(args, plugins) -> dict:
    """Builds the model from Megatron's block spec as transformed by `plugins`, and runs
    STEPS optimizer steps (with the plugins' after-step callbacks) on one batch."""
    import torch

    from plugins.fp8.spec import FP8_MODULES
    from plugins.fp8.swiglu import FP8SwiGLU
    from tests.helpers.plugin_args import gpt_model

    model = gpt_model(args, plugins, VOCAB)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    after_step = [h.on_optimizer_step([model], optimizer)
                  for h in (p.run_hooks() for p in plugins) if h.on_optimizer_step is not None]
    tokens = torch.randint(VOCAB, (2, args.seq_length + 1),
                           generator=torch.Generator().manual_seed(1))  # one batch, learnt
    positions = torch.arange(args.seq_length).expand(2, -1)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean()
        loss.backward()
        optimizer.step()
        for callback in after_step:
            callback(step + 1)  # Megatron's iteration
        losses.append(loss.item())
    modules = list(model.modules())
    return dict(params={n: tuple(p.shape) for n, p in model.named_parameters()},
                fp8_modules=sum(type(m) in FP8_MODULES for m in modules),
                fp8_swiglu=sum(isinstance(m, FP8SwiGLU) for m in modules), losses=losses)


def _every_order(rank, world_size):
    from tests.helpers.mla_build import megatron_ranks
    from tests.helpers.patching import patching, plugin_fixes

    results = {}
    with megatron_ranks():
        for order in ORDERS:
            args, plugins = _parsed(order)
            with patching(plugin_fixes(plugins)):
                results[order] = dict(_train(args, plugins),
                                      enabled=[p.name for p in plugins],
                                      configs=[p.config for p in plugins])
    return results


def test_every_order_builds_and_trains_the_same_model():
    (results,) = run_ranks(_every_order, 1, timeout=600)
    first = results[ORDERS[0]]
    assert first["enabled"] == ["mla", "moe", "fp8"]  # the registry's order
    # Per layer: MLA's 5 linear slots (q_proj's is not built with a q LoRA rank) and
    # linear_proj; the dense MLP's fc1 and fc2, or the routed experts and the shared
    # experts' fc1 and fc2. The MLPs' SwiGLU: dense, shared experts.
    assert first["fp8_modules"] == 2 * 5 + 2 + 3 and first["fp8_swiglu"] == 2
    assert first["losses"][-1] < first["losses"][0]  # it trained
    for order in ORDERS[1:]:
        assert results[order] == first, f"--plugins {' '.join(order)} built another model"
