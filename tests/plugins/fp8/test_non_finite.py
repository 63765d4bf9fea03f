"""The fp8 plugin never waits for the device in an FP8 linear or expert group, and still
fails a step loudly on inf or NaN in an FP8 operand: the module's device-side flags are
read once per step, before Megatron's gradient checks (`plugins.fp8.non_finite`). Under
fp16 with Megatron's dynamic loss scaler a backward overflow is the scaler's to skip."""

from __future__ import annotations

import re

import pytest
import torch

import integration  # noqa: F401  (megatron.training on Python 3.11)
from tests.helpers.multirank import run_ranks
from tests.helpers.training_runs import pretrain

HIDDEN, OUT, COUNTS = 128, 256, [3, 0, 5]  # one expert without tokens


def _modules(cache_weights: bool):
    """An FP8 replicated linear and an FP8 expert group inside a small named model."""
    from megatron.core.transformer import TransformerConfig

    from plugins.fp8.modules import FP8LocalExperts, FP8ReplicatedLinear

    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4,
                               add_bias_linear=False, use_cpu_initialization=True)
    kw = dict(fp8_backend="emulated", fp8_cache_weights=cache_weights)
    model = torch.nn.Module()
    model.proj = FP8ReplicatedLinear(HIDDEN, OUT, config=config,
                                     init_method=torch.nn.init.normal_, **kw)
    model.experts = FP8LocalExperts(config, len(COUNTS), HIDDEN, OUT // 2, **kw)
    return model


def _step(model, x, dy_scale: float = 1.0):
    """Forward and backward of both modules, the way a layer runs them."""
    y = model.proj(x)
    out = model.experts(y[:, :HIDDEN].contiguous(), COUNTS)
    (out * dy_scale).sum().backward()


def _waits(rank, world):
    from tests.helpers.host_syncs import device_waits
    from tests.helpers.mla_build import megatron_ranks
    from plugins.fp8.linear import fp8_linear

    waits = {}
    with megatron_ranks():
        for cache_weights in (False, True):
            model = _modules(cache_weights)
            for step in range(2):  # with the cache: quantizing, then held
                x = torch.randn(sum(COUNTS), HIDDEN, requires_grad=True)
                with device_waits() as calls:
                    _step(model, x)
                waits[(cache_weights, step)] = calls
        # The plain-torch API without flags checks eagerly: the counter sees those waits.
        x, w = torch.randn(8, HIDDEN, requires_grad=True), torch.randn(OUT, HIDDEN,
                                                                       requires_grad=True)
        with device_waits() as calls:
            fp8_linear(x, w).sum().backward()
        waits["eager"] = calls
    return waits


def test_fp8_linear_and_expert_group_never_wait_for_the_device():
    """Forward and backward of an FP8 linear and of an FP8 expert group (with and without
    the weight cache) make no host synchronization: no `aten::_local_scalar_dense`,
    `is_nonzero`, `nonzero` ... and no `tolist`. (FP8 dispatch: one per hop, for the
    all-to-all split sizes Megatron's dispatchers also need on the host, with the
    inf/NaN count riding along: tests/plugins/moe/test_dispatch.py::test_one_host_sync_per_hop.)"""
    waits = run_ranks(_waits, 1)[0]
    for key in [(False, 0), (False, 1), (True, 0), (True, 1)]:
        assert waits[key] == [], key
    # One wait per direction, each the first read of an inf/NaN check.
    assert waits["eager"].count("aten::_local_scalar_dense") == 2


def _args(fp16: bool = False, loss_scale: float | None = None, bf16: bool = False):
    """The fp8 plugin's config of a run in bf16 (or fp32), or fp16 with Megatron's dynamic
    loss scaler (no --loss-scale) or a constant one."""
    from plugins.fp8.plugin import FP8PluginConfig

    return FP8PluginConfig(fp16=fp16, loss_scale=loss_scale)


def _flags(rank, world):
    from tests.helpers.mla_build import megatron_ranks
    from plugins.fp8.plugin import before_gradient_checks

    results = {}
    with megatron_ranks():
        model = _modules(cache_weights=False)
        x = torch.randn(sum(COUNTS), HIDDEN)
        x[5, 3] = float("nan")  # token 5: expert 2's tokens
        x.requires_grad_()
        _step(model, x)  # nothing raised: recorded
        try:
            before_gradient_checks(_args(bf16=True), [model])(7)
        except ValueError as error:
            results["fprop"] = str(error)

        model = _modules(cache_weights=True)
        _step(model, torch.randn(sum(COUNTS), HIDDEN, requires_grad=True), dy_scale=float("inf"))
        check_fp16 = before_gradient_checks(_args(fp16=True), [model])
        check_fp16(3)  # the dynamic loss scaler's to skip: no error, flags cleared
        results["fp16_cleared"] = [f.found() for f in model.experts.fp8_non_finite.values()]
        _step(model, torch.randn(sum(COUNTS), HIDDEN, requires_grad=True), dy_scale=float("inf"))
        try:
            before_gradient_checks(_args(fp16=True, loss_scale=1024.0), [model])(4)
        except ValueError as error:
            results["backward_constant_scale"] = str(error)
        model.proj.fp8_non_finite[""].clear()
        for flags in model.experts.fp8_non_finite.values():
            flags.clear()
        before_gradient_checks(_args(), [model])(5)  # clean: nothing to say
        results["clean"] = True
    return results


def test_non_finite_operand_fails_the_step_naming_module_pass_and_iteration():
    results = run_ranks(_flags, 1)[0]
    # A NaN in the linear's input: its Fprop, and every projection downstream of it.
    fprop = results["fprop"]
    assert fprop.startswith("fp8: non-finite values (inf or NaN) in FP8 operands at "
                            "iteration 7: ")
    assert "proj: the input x of Fprop" in fprop
    assert "experts.linear_fc1: the input x of Fprop" in fprop
    assert "experts.linear_fc2: the input x of Fprop" in fprop
    # Under fp16 with the dynamic loss scaler, an inf dy is left to Megatron's skip.
    assert results["fp16_cleared"] == [[], []]
    # With a constant loss scale (no scaler to skip), the same overflow fails the step.
    backward = results["backward_constant_scale"]
    assert "at iteration 4" in backward
    assert "experts.linear_fc2: the output gradient dy of Dgrad/Wgrad" in backward
    assert results["clean"]


FP8_GPT = ["--hidden-size", "128", "--ffn-hidden-size", "256", "--transformer-impl", "local",
           "--no-gradient-accumulation-fusion", "--plugins", "fp8", "--fp8-format", "e4m3",
           "--fp8-recipe", "blockwise", "--fp8-backend", "emulated", "--fp16",
           "--train-iters", "4"]
OVERFLOWING_SCALE = str(2.0 ** 40)  # scaled output gradients overflow fp16 in backward

_LOGGED = re.compile(r"iteration\s+(\d+)/.*?loss scale: ([0-9.E+-]+) \| number of skipped "
                     r"iterations:\s+(\d+)")


@pytest.mark.slow
def test_fp16_overflow_in_fp8_backward_takes_megatrons_skip_path(tmp_path):
    """`--plugins fp8 --fp16`: at an initial loss scale of 2^40 the first steps overflow in
    backward; the fp8 plugin raised `dy has non-finite values` there, where Megatron's
    dynamic loss scaler skips the step and halves the scale. Now the run goes on: the
    skipped iterations are Megatron's count, the scale comes down. With a constant loss
    scale (no scaler to skip) the same overflow fails the first step, naming the modules,
    the pass and the iteration."""
    output = pretrain(FP8_GPT + ["--initial-loss-scale", OVERFLOWING_SCALE], tmp_path)
    # The start-up line of which linears run in FP8 (all: no --fp8-exclude-modules).
    assert output.count("fp8: linears in FP8: mlp.linear_fc1 x2, mlp.linear_fc2 x2, "
                        "self_attention.linear_proj x2, self_attention.linear_qkv x2\n") == 1
    logged = {int(i): (float(scale), int(skipped)) for i, scale, skipped in _LOGGED.findall(output)}
    assert sorted(logged) == [1, 2, 3, 4]
    assert all(skipped >= 1 for _, skipped in logged.values())
    assert logged[1][0] == 2.0 ** 40 and logged[4][0] < logged[1][0]

    with pytest.raises(AssertionError) as failed:
        pretrain(FP8_GPT + ["--loss-scale", OVERFLOWING_SCALE], tmp_path)
    said = str(failed.value)
    assert ("NonFiniteFP8Operand: fp8: non-finite values (inf or NaN) in FP8 operands at "
            "iteration 1: ") in said
    assert "decoder.layers.1.mlp.linear_fc2: the output gradient dy of Dgrad/Wgrad" in said
