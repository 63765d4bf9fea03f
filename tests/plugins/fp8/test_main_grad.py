"""`--gradient-accumulation-fusion` with the fp8 plugin: every FP8 linear (Megatron's
column/row-parallel ones, MLA's replicated down-projections, the routed experts) adds its
FP8 Wgrad product into the parameter's FP32 `main_grad` and hands Megatron's DDP hook
the dummy gradient, as Megatron's own fused linear does; the gradients are those of
`--no-gradient-accumulation-fusion`, bit for bit (emulated backend, FP32 on the CPU).

Oracle: the same DDP-wrapped GPTModel chunk (Megatron's block spec through the mla, moe
and fp8 plugins' transforms) without fusion. Why not a whole `pretrain` run: Megatron's own
non-FP8 linears (the output head) refuse fusion without apex's CUDA kernel, and the CPU
launch passes `--no-gradient-accumulation-fusion` for them (upstream/cpu.py); the chunk
here is built as on a machine with apex, where the head uses that kernel.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.multirank import run_ranks
from tests.helpers.training_runs import MLA_CHUNK

MODEL = [*MLA_CHUNK,
         "--num-experts", "4", "--moe-router-topk", "2", "--moe-router-score-function",
         "sigmoid", "--moe-router-enable-expert-bias", "--moe-ffn-hidden-size", "128",
         "--moe-shared-expert-intermediate-size", "128", "--moe-router-load-balancing-type",
         "none", "--moe-layer-freq", "([0]+[1]*1)", "--plugins", "mla", "moe", "fp8",
         "--fp8-format", "e4m3", "--fp8-recipe", "blockwise", "--fp8-backend", "emulated"]
VOCAB, MICROBATCHES = 64, 3


def _chunk(fused: bool, cache_weights: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from plugins.fp8.modules import _FP8Module
    from tests.helpers.patching import patching, plugin_fixes
    from tests.helpers.plugin_args import gpt_model, validated

    args, plugins = validated(MODEL + (["--fp8-cache-weights"] if cache_weights else []))
    with patching(plugin_fixes(plugins)):  # the fp8 plugin's lifts of Megatron's TE-only checks
        model = gpt_model(args, plugins, VOCAB)
    if fused:  # as Megatron builds it with its default --gradient-accumulation-fusion
        model.config.gradient_accumulation_fusion = True
        for module in model.modules():
            if isinstance(module, _FP8Module):
                module.gradient_accumulation_fusion = True
    return DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)


def _grads(chunk) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    chunk.zero_grad_buffer()
    for _ in range(MICROBATCHES):
        tokens = torch.randint(VOCAB, (2, 9), generator=g)
        positions = torch.arange(8).expand(2, -1)
        chunk(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean().backward()
    return {n: p.main_grad.clone() for n, p in chunk.module.named_parameters()}


def _fp8_weights_added(chunk) -> dict[str, bool]:
    from plugins.fp8.modules import _FP8Module

    return {f"{name}.{p_name}": bool(p.grad_added_to_main_grad)
            for name, module in chunk.module.named_modules() if isinstance(module, _FP8Module)
            for p_name, p in module.named_parameters(recurse=False) if p.dim() >= 2}


def _fused_and_unfused(rank, world_size):
    from tests.helpers.mla_build import megatron_ranks

    results = {}
    with megatron_ranks():
        for cache_weights in (False, True):
            unfused, fused = _chunk(False, cache_weights), _chunk(True, cache_weights)
            fused.module.load_state_dict(unfused.module.state_dict())
            results[cache_weights] = dict(
                unfused=_grads(unfused), fused=_grads(fused),
                added=_fp8_weights_added(fused), not_added=_fp8_weights_added(unfused))
    return results


@pytest.mark.parametrize("cache_weights", [False, True], ids=["quantized", "cached"])
def test_fused_wgrad_lands_in_main_grad_as_unfused(cache_weights):
    results = run_ranks(_fused_and_unfused, 1, timeout=600)[0][cache_weights]
    added = results["added"]
    # Every FP8 weight: MLA's projections, the dense MLP, shared and routed experts.
    assert any("linear_kv_down_proj" in n for n in added)
    assert any("experts.weight1" in n for n in added) and any("shared_experts" in n for n in added)
    assert all(added.values()), [n for n, a in added.items() if not a]
    assert not any(results["not_added"].values())
    unfused, fused = results["unfused"], results["fused"]
    assert sorted(unfused) == sorted(fused)
    for name in unfused:
        assert unfused[name].any(), name
        assert torch.equal(fused[name], unfused[name]), name
