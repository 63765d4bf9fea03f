"""Where quantization runs (Triton kernels or torch ops) is decided once per FP8 module and
device, not per quantization (issue 22: the per-call check cost about 33 us of host time
on an H200, as much as a launch)."""

from __future__ import annotations

import pytest
import torch

import integration  # noqa: F401  (megatron.training on Python 3.11)
from plugins.common.quantize import Quantizer

HIDDEN, FFN, COUNTS = 128, 128, [3, 0, 5]


@pytest.fixture
def decisions(monkeypatch):
    """A list that collects the device of every `Quantizer.for_device` call."""
    calls: list[torch.device] = []
    decide = Quantizer.for_device.__func__

    def counted(cls, device):
        calls.append(device)
        return decide(cls, device)

    monkeypatch.setattr(Quantizer, "for_device", classmethod(counted))
    return calls


def _modules(cache_weights: bool):
    from megatron.core.transformer import TransformerConfig

    from plugins.fp8.modules import FP8LocalExperts, FP8ReplicatedLinear
    from plugins.fp8.swiglu import FP8SwiGLU

    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4,
                               add_bias_linear=False, use_cpu_initialization=True,
                               perform_initialization=False)
    kw = dict(fp8_backend="emulated", fp8_cache_weights=cache_weights)
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.proj = FP8ReplicatedLinear(HIDDEN, 2 * HIDDEN, config=config,
                                     init_method=torch.nn.init.normal_, **kw)
    model.act = FP8SwiGLU()
    model.experts = FP8LocalExperts(config, len(COUNTS), HIDDEN, FFN, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) / 12)
    return model


def _step(model, x):
    out = model.experts(model.act(model.proj(x)), COUNTS)
    out.square().sum().backward()
    return out


@pytest.mark.parametrize("cache_weights", [False, True], ids=["quantized", "cached"])
def test_an_fp8_module_decides_where_it_quantizes_once(cache_weights, decisions):
    """Forward and backward of an FP8 linear, the FP8 SwiGLU and an FP8 expert group decide
    once each, when they first run on their device; later steps never ask again."""
    model = _modules(cache_weights)
    x = torch.randn(sum(COUNTS), HIDDEN, requires_grad=True)
    _step(model, x)
    assert decisions == [torch.device("cpu")] * 3  # the linear, the SwiGLU, the experts
    decisions.clear()
    for _ in range(2):
        _step(model, x)
    assert decisions == []


def test_the_decided_quantizer_gives_the_bits_of_the_per_call_decision(decisions):
    """The modules' products and gradients are the plain functions' (deciding per call),
    bit for bit."""
    from plugins.common.quantize import quantize
    from plugins.fp8.linear import fp8_linear
    from plugins.fp8.swiglu import FP8CachedSwiGLU

    model = _modules(cache_weights=False)
    x = torch.randn(sum(COUNTS), HIDDEN, requires_grad=True)
    out = _step(model, x)
    grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    decisions.clear()

    x2 = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    w, w1, w2 = params
    h = FP8CachedSwiGLU.apply(fp8_linear(x2, w))

    def fp8(t):  # the experts quantize their inputs once for the layer, then take the bytes
        return quantize(t, (1, 128), check_finite=False)

    want = torch.cat([
        fp8_linear(a := FP8CachedSwiGLU.apply(fp8_linear(rows, w1[e], x_fp8=fp8(rows))),
                   w2[e], x_fp8=fp8(a))
        for e, rows in enumerate(h.split(COUNTS))])
    want.square().sum().backward()
    assert decisions, "the plain functions decide per call"
    assert torch.equal(out, want)
    for got, expected in zip(grads, [x2.grad] + [p.grad for p in params]):
        assert torch.equal(got, expected)


def test_a_quantizer_for_another_device_is_not_used():
    """A tensor on a device the quantizer was not decided for is decided for its own."""
    from plugins.common.quantize import _triton_kernel, quantize

    elsewhere = Quantizer(torch.device("meta"), triton=object())
    assert _triton_kernel(torch.zeros(1, 128), (1, 128), elsewhere) is None
    x = torch.randn(4, 256)
    assert all(torch.equal(a, b) for a, b in zip(quantize(x, (1, 128), quantizer=elsewhere),
                                                 quantize(x, (1, 128))))
    assert Quantizer.for_device(torch.device("cpu")).triton is None  # CPU: torch ops
