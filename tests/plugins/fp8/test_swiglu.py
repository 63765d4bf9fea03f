"""The SwiGLU that keeps its input in FP8 and recomputes its output in backward."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from plugins.common.quantize import dequantize, quantize
from plugins.fp8.swiglu import FP8CachedSwiGLU
from tests.plugins.fp8.test_linear import saved_bytes


def megatron_glu(x):  # Megatron's unfused gated linear unit with SiLU (mlp.py glu)
    gate, linear = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * linear


def test_forward_exact_backward_from_the_fp8_cache():
    x = torch.randn(256, 512, requires_grad=True)
    dy = torch.randn(256, 256)
    y = FP8CachedSwiGLU.apply(x)
    y.backward(dy)
    torch.testing.assert_close(y, megatron_glu(x.detach()), rtol=0, atol=0)
    # The gradient is SwiGLU's at the FP8-cached input: exactly autograd's there.
    cached = dequantize(*quantize(x.detach(), (1, 128)), (1, 128)).requires_grad_()
    megatron_glu(cached).backward(dy)
    torch.testing.assert_close(x.grad, cached.grad, rtol=1e-6, atol=1e-6)


def test_keeps_a_third_of_the_bytes_of_megatrons_swiglu():
    x = torch.randn(1024, 1024, dtype=torch.bfloat16, requires_grad=True)
    ours = saved_bytes(FP8CachedSwiGLU.apply, x)
    megatron = saved_bytes(megatron_glu, x)
    assert megatron == 3 * (x.numel() // 2) * 2  # gate, silu(gate), linear in BF16
    assert ours == x.numel() + x.numel() // 128 * 4
    assert ours / megatron < 0.35


def test_the_plugin_puts_it_into_megatrons_mlp(monkeypatch):
    import integration  # noqa: F401
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.training.arguments import parse_args

    from plugins import default_registry
    from plugins.fp8.swiglu import FP8SwiGLU

    registry = default_registry()
    monkeypatch.setattr(sys, "argv", [
        "x", "--num-layers", "1", "--hidden-size", "128", "--num-attention-heads", "4",
        "--seq-length", "128", "--max-position-embeddings", "128", "--micro-batch-size", "1",
        "--transformer-impl", "local", "--no-gradient-accumulation-fusion", "--swiglu",
        # (Megatron's default with --swiglu, 320, is no multiple of 128: refused)
        "--ffn-hidden-size", "512",
        "--no-bias-swiglu-fusion", "--plugins", "fp8", "--fp8-format", "e4m3",
        "--fp8-recipe", "blockwise"])
    args = parse_args(extra_args_provider=registry.add_arguments)
    plan = registry.plan(args)
    fp8, = plan.plugins
    plan.apply_overrides(args)
    assert args.use_te_activation_func
    spec = fp8.transform_layer_spec(get_gpt_layer_local_spec())
    assert spec.submodules.mlp.keywords["submodules"].activation_func is FP8SwiGLU
