"""FP8 on a GPU, on fresh random inputs: quantize on CUDA keeps the CPU's contract and
values; the GPU GEMM backends (`torch`, `triton`) agree with the `emulated` backend, the
exact block-scaled product, GEMM by GEMM and through fp8_linear's forward and backward.
Skipped without CUDA; a backend the GPU cannot run is skipped with the reason
`--fp8-backend` would give."""

from __future__ import annotations

import pytest
import torch

from plugins.fp8 import backends
from plugins.fp8.linear import fp8_linear
from plugins.common.quantize import dequantize, quantize

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ["torch", "triton"]
# (M, N, K). K / 128 = 3 and 5 are not multiples of 4 (cuBLAS reads 128x128 scales with
# a row stride rounded up to 4), nor is M = 130 (cuBLAS refuses it); the others are
# DeepSeek-V3 linears at a few token counts.
SHAPES = [(256, 384, 384), (130, 384, 640), (128, 256, 4096), (4096, 2048, 7168),
          (512, 7168, 2048)]
# Hopper's FP8 tensor cores add up each 128-long chunk with about 14 mantissa bits
# (DeepSeek-V3 report, section 3.3.2) where `emulated` sums in FP32: expect errors near
# 2^-14 * sqrt(128) ~ 7e-4 of the largest output, not FP32's 1e-6.
GEMM_TOLERANCE = 2e-3
# fp8_linear's outputs and gradients are rounded to BF16: a GEMM difference can move a
# value to the neighbouring BF16 number, 2^-8 of it.
LINEAR_TOLERANCE = 1e-2


def require(name: str) -> None:
    try:
        backends.resolve(name)
    except ValueError as error:
        pytest.skip(str(error))


def fresh_generator() -> tuple[torch.Generator, int]:
    g = torch.Generator("cuda")
    return g, g.seed()


def max_relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.mark.parametrize("power_of_two", [False, True], ids=["scales", "pow2scales"])
@pytest.mark.parametrize("shape,block,dtype", [
    ((4096, 7168), (1, 128), torch.bfloat16), ((7168, 2048), (128, 128), torch.bfloat16),
    ((512, 384), (1, 128), torch.float32), ((384, 512), (128, 128), torch.float32)])
def test_quantize_on_cuda_matches_cpu(shape, block, dtype, power_of_two):
    g, seed = fresh_generator()
    x = (torch.randn(shape, device="cuda", generator=g)
         * torch.logspace(-3, 3, shape[1], device="cuda")).to(dtype)  # tiles of many scales
    q, scales = quantize(x, block, power_of_two_scales=power_of_two)
    q_cpu, scales_cpu = quantize(x.cpu(), block, power_of_two_scales=power_of_two)
    assert q.is_cuda and q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == scales_cpu.shape

    # The documented bound (plugins.common.quantize): half an E4M3 ulp, up to FP32 rounding.
    s = scales.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    error = (dequantize(q, scales, block) - x.float()).abs()
    bound = torch.maximum(x.float().abs() * 2**-4, s * 2**-10) * (1 + 2**-10)
    assert bool((error <= bound).all()), f"seed {seed}: {int((error > bound).sum())} over"
    # The CPU's values: amax / 448 may differ in the last bits where the GPU divides
    # approximately, and then an element on a rounding midpoint may round the other way.
    if power_of_two:
        assert torch.equal(scales.cpu(), scales_cpu), f"seed {seed}"
    else:
        torch.testing.assert_close(scales.cpu(), scales_cpu, rtol=2.5e-7, atol=0)
    differ = q.cpu().view(torch.uint8) != q_cpu.view(torch.uint8)
    assert differ.float().mean().item() < 1e-4, f"seed {seed}: {int(differ.sum())} differ"


def test_quantize_on_cuda_rejects_non_finite():
    x = torch.randn(256, 256, device="cuda")
    x[130, 7] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        quantize(x, (1, 128))


@pytest.mark.parametrize("name", ["emulated", *GPU_BACKENDS])
def test_linear_rejects_non_finite_on_cuda(name):
    """fp8_linear checks x and W only after queuing its GEMM: the error still comes."""
    require(name)
    x = torch.randn(256, 256, device="cuda", requires_grad=True)
    w = torch.randn(128, 256, device="cuda")
    with torch.no_grad():
        x_bad = x.clone()
        x_bad[130, 7] = float("nan")
    with pytest.raises(ValueError, match="input x .* non-finite"):
        fp8_linear(x_bad, w, name)
    dy = torch.randn(256, 128, device="cuda")
    dy[3, 3] = float("inf")
    with pytest.raises(ValueError, match="output gradient dy has non-finite"):
        fp8_linear(x, w, name).backward(dy)


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("b_block", [(128, 128), (1, 128)], ids=["B128x128", "B1x128"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemm_matches_emulated(name, b_block, m, n, k, record_property):
    require(name)
    g, seed = fresh_generator()
    x = torch.randn(m, k, device="cuda", generator=g)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02  # a weight's scale
    a = backends.Operand(*quantize(x, (1, 128)), (1, 128))
    b = backends.Operand(*quantize(w, b_block), b_block)

    got = backends.BACKENDS[name](a, b)
    want = backends.emulated_gemm(a, b)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert bool(got.isfinite().all()), f"seed {seed}: non-finite output"
    error = max_relative(got, want)
    record_property("max_rel_error", error)
    print(f"{name} A 1x128 B {b_block[0]}x{b_block[1]} {m}x{n}x{k}: max rel error {error:.2e}")
    assert error < GEMM_TOLERANCE, f"seed {seed}"


@pytest.mark.parametrize("name", GPU_BACKENDS)
# 576 outputs as MLA's KV down-projection (kv_lora_rank + rope dim, ragged: its Dgrad
# reduces over 5 blocks) at 130 tokens (not a multiple of 4).
@pytest.mark.parametrize("tokens,n,k", [(256, 384, 256), (130, 576, 512), (1024, 2048, 7168)])
def test_linear_matches_emulated(name, tokens, n, k, record_property):
    require(name)
    g, seed = fresh_generator()
    x = torch.randn(tokens, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
    dy = torch.randn(tokens, n, device="cuda", generator=g).bfloat16()

    def forward_backward(backend):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_linear(xr, wr, backend)
        return (y, *torch.autograd.grad(y, (xr, wr), dy))

    errors = {what: max_relative(got, want) for what, got, want in
              zip(("y", "dx", "dW"), forward_backward(name), forward_backward("emulated"))}
    for what, error in errors.items():
        record_property(f"max_rel_error_{what}", error)
    print(f"fp8_linear {name} {tokens}x{n}x{k}: " + ", ".join(
        f"{what} {error:.2e}" for what, error in errors.items()))
    assert max(errors.values()) < LINEAR_TOLERANCE, f"seed {seed}: {errors}"


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_an_expert_without_tokens_on_cuda(name):
    """0 tokens (an expert that got none; cuBLAS refuses empty operands): empty outputs,
    a zero weight gradient, nothing launched that fails."""
    require(name)
    x = torch.zeros(0, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = fp8_linear(x, w, name, x_fp8=quantize(x.detach(), (1, 128)))
    y.backward(torch.zeros_like(y))
    assert y.shape == (0, 256) and x.grad.shape == (0, 128) and not w.grad.any()
