"""plugins.fp8's linear layers: the three FP8 GEMMs, the FP8 activation cache, and the
Megatron drop-ins under tensor parallelism."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from plugins.common.quantize import dequantize, quantize
from plugins.fp8.linear import ACTIVATION, WEIGHT, fp8_linear
from tests.helpers import backend
from tests.helpers import paths
from tests.helpers.multirank import run_ranks


def fake_quant(x: torch.Tensor, block) -> torch.Tensor:
    return dequantize(*quantize(x, block), block)


def test_gemms_are_the_products_of_the_quantized_operands():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 384, generator=g, requires_grad=True)
    w = torch.randn(256, 384, generator=g, requires_grad=True)
    dy = torch.randn(256, 256, generator=g)
    y = fp8_linear(x, w)
    y.backward(dy)
    # The emulated backend is the exact block-scaled product, up to FP32 summation order.
    torch.testing.assert_close(y, fake_quant(x.detach(), ACTIVATION) @ fake_quant(w.detach(), WEIGHT).t())
    torch.testing.assert_close(x.grad, fake_quant(dy, ACTIVATION) @ fake_quant(w.detach().t().contiguous(), WEIGHT).t())
    # Wgrad: x^T tiled along tokens, quantized from x itself (in the same pass as Fprop's
    # x), not from x's FP8 copy re-quantized (DeepSeek's double quantization, which moves
    # dW's bits).
    dy_t = fake_quant(dy.t().contiguous(), ACTIVATION)
    x_t = fake_quant(x.detach().t().contiguous(), ACTIVATION)
    torch.testing.assert_close(w.grad, dy_t @ x_t.t(), rtol=0, atol=0)
    double = fake_quant(fake_quant(x.detach(), ACTIVATION).t().contiguous(), ACTIVATION)
    assert not torch.equal(w.grad, dy_t @ double.t())
    # And they are close to the FP32 linear: E4M3 has 3 mantissa bits, errors average out
    # over K = 384 products (relative Frobenius error of a few percent at most).
    ref = x.detach() @ w.detach().t()
    assert (y - ref).norm() / ref.norm() < 0.05


def test_ragged_out_and_tokens_are_the_zero_padded_product():
    """MLA's kv down-projection has 576 output rows and an expert gets any number of
    tokens: the layer pads both with zeros to whole tiles, which is exactly the product of
    explicitly padded operands, cut back."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 256, generator=g, requires_grad=True)
    w = torch.randn(576, 256, generator=g, requires_grad=True)
    dy = torch.randn(200, 576, generator=g)
    fp8_linear(x, w).backward(dy)
    y = fp8_linear(x, w)

    x_pad = torch.cat([x.detach(), torch.zeros(56, 256)]).requires_grad_()  # 256 tokens
    w_pad = torch.cat([w.detach(), torch.zeros(64, 256)]).requires_grad_()  # 640 rows
    dy_pad = torch.zeros(256, 640)
    dy_pad[:200, :576] = dy
    y_pad = fp8_linear(x_pad, w_pad)
    y_pad.backward(dy_pad)
    assert torch.equal(y, y_pad[:200, :576])
    assert torch.equal(x.grad, x_pad.grad[:200])
    assert torch.equal(w.grad, w_pad.grad[:576])
    # The last 128x128 weight block holds 64 real rows: its scale is theirs alone.
    assert (y - x.detach() @ w.detach().t()).norm() / y.norm() < 0.05


def test_input_already_in_fp8_is_used_as_given():
    """The MoE plugin hands its FP8-dispatched tokens (power-of-two 1x128 scales) to the
    experts: Fprop and the Wgrad cache use those bytes, not a second quantization."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 256, generator=g, requires_grad=True)
    w = torch.randn(128, 256, generator=g, requires_grad=True)
    dy = torch.randn(128, 128, generator=g)
    q, scales = quantize(x.detach(), ACTIVATION, power_of_two_scales=True)
    x_sent = dequantize(q, scales, ACTIVATION)
    y = fp8_linear(x, w, x_fp8=(q, scales))
    y.backward(dy)
    torch.testing.assert_close(y, x_sent @ fake_quant(w.detach(), WEIGHT).t())
    torch.testing.assert_close(
        w.grad, fake_quant(dy.t().contiguous(), ACTIVATION) @ fake_quant(x_sent.t().contiguous(), ACTIVATION).t())
    # Quantizing x again (amax / 448 scales) would have given other values.
    assert not torch.equal(y, fp8_linear(x.detach(), w.detach()))
    with pytest.raises(ValueError, match="x_fp8 holds"):
        fp8_linear(x[:64], w, x_fp8=(q, scales))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_operands_raise_naming_the_tensor(bad):
    """Each direction checks its operands once, after its GEMMs: x and W in forward, dy in
    backward; the error names the tensor and the tile."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 256, generator=g, requires_grad=True)
    w = torch.randn(128, 256, generator=g, requires_grad=True)
    with torch.no_grad():
        x_bad, w_bad = x.clone(), w.clone()
        x_bad[200, 130], w_bad[5, 3] = bad, bad
    with pytest.raises(ValueError, match=r"the input x .* non-finite .*row tile 200, col tile 1"):
        fp8_linear(x_bad, w)
    with pytest.raises(ValueError, match=r"the weight has non-finite .*row tile 0, col tile 0"):
        fp8_linear(x, w_bad)
    dy = torch.randn(256, 128, generator=g)
    dy[7, 0] = bad
    with pytest.raises(ValueError, match=r"output gradient dy has non-finite .*row tile 7"):
        fp8_linear(x, w).backward(dy)


def test_one_host_sync_per_direction(monkeypatch):
    """The inf/NaN checks are fp8_linear's only waits on the device (a `bool(tensor)`): one
    in forward, one in backward, not one per quantization; none in a forward whose
    operands arrive in FP8 (dispatched tokens, a cached weight), checked by their makers."""
    from plugins.fp8.weight_cache import FP8WeightCache

    syncs = []
    to_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: syncs.append(t) or to_bool(t))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 256, generator=g, requires_grad=True)
    w = torch.randn(576, 256, generator=g, requires_grad=True)
    y = fp8_linear(x, w)
    assert len(syncs) == 1
    y.backward(torch.randn(200, 576, generator=g))
    assert len(syncs) == 2

    weight_fp8 = FP8WeightCache().get(w)  # checked once, when cached
    x_fp8 = quantize(x.detach(), ACTIVATION)
    syncs.clear()
    fp8_linear(x, w, x_fp8=x_fp8, weight_fp8=weight_fp8)
    assert syncs == []


def saved_bytes(fn, *inputs) -> int:
    params = {t.untyped_storage().data_ptr() for t in inputs[1:]}
    kept: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(kept.values())


def test_input_is_cached_in_fp8_half_the_bytes_of_bf16():
    x = torch.randn(1024, 1024, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(512, 1024, dtype=torch.bfloat16, requires_grad=True)
    bf16 = saved_bytes(torch.nn.functional.linear, x, w)
    fp8 = saved_bytes(fp8_linear, x, w)
    assert bf16 == x.numel() * 2
    # 1 byte per element plus one float32 scale per 128 elements.
    assert fp8 == x.numel() + x.numel() // 128 * 4
    assert 0.5 <= fp8 / bf16 < 0.52


def test_backward_keeps_x_transposed_only():
    """What backward keeps of x is x^T as Wgrad takes it: 1x128 tiles along tokens, the
    token count zero-padded to whole tiles (200 -> 256), one float32 scale per tile; not
    x's Fprop codes (those are dropped after the forward GEMM)."""
    x = torch.randn(200, 256, requires_grad=True)
    w = torch.randn(128, 256, requires_grad=True)
    assert saved_bytes(fp8_linear, x, w) == 256 * 256 + 256 * (256 // 128) * 4
    # A given FP8 input is kept as it came (and re-tiled in backward): no x^T in forward.
    x_fp8 = quantize(x.detach(), ACTIVATION)
    assert saved_bytes(lambda x, w: fp8_linear(x, w, x_fp8=x_fp8), x, w) == 200 * 256 + 200 * 2 * 4


def tp_linear_pair(rank: int, world_size: int, sequence_parallel: bool):
    """An FP8 column-parallel then row-parallel linear (an MLP without activation)."""
    from tests.helpers.backend import device
    from tests.helpers.mla_build import megatron_ranks

    from megatron.core.transformer import TransformerConfig

    from plugins.fp8.modules import FP8ColumnParallelLinear, FP8RowParallelLinear

    hidden, ffn, tokens = 256, 512, 128
    g = torch.Generator().manual_seed(0)  # drawn on the CPU, then moved to this rank's device
    w1, w2 = torch.randn(ffn, hidden, generator=g) / 16, torch.randn(hidden, ffn, generator=g) / 16
    x = torch.randn(tokens, 1, hidden, generator=g).to(device())
    dy = torch.randn(tokens, 1, hidden, generator=g).to(device())
    with megatron_ranks(tp=world_size):
        config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=4,
                                   tensor_model_parallel_size=world_size,
                                   sequence_parallel=sequence_parallel,
                                   use_cpu_initialization=True, add_bias_linear=False)
        fc1 = FP8ColumnParallelLinear(hidden, ffn, config=config, init_method=torch.nn.init.zeros_,
                                      bias=False, gather_output=False)
        fc2 = FP8RowParallelLinear(ffn, hidden, config=config, init_method=torch.nn.init.zeros_,
                                   bias=False, input_is_parallel=True, skip_bias_add=True)
        fc1, fc2 = fc1.to(device()), fc2.to(device())
        with torch.no_grad():
            fc1.weight.copy_(w1.chunk(world_size, 0)[rank])
            fc2.weight.copy_(w2.chunk(world_size, 1)[rank])
        local_x = (x.chunk(world_size)[rank] if sequence_parallel else x).clone().requires_grad_()
        y, _ = fc2(fc1(local_x)[0])
        y.backward(dy.chunk(world_size)[rank] if sequence_parallel else dy)
        return y.detach(), local_x.grad, fc1.weight.grad, fc2.weight.grad


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_tensor_parallel_fp8_equals_single_rank(sequence_parallel):
    ref_y, ref_dx, ref_g1, ref_g2 = run_ranks(tp_linear_pair, 1, False)[0]
    ranks = run_ranks(tp_linear_pair, 2, sequence_parallel)
    cat = (lambda parts: torch.cat(parts)) if sequence_parallel else (lambda parts: parts[0])
    # Per-rank weight shards are whole 128x128 blocks and activations keep their 1x128
    # tiles, so every rank quantizes exactly as one rank would; only FP32 summation order
    # (the row-parallel all-reduce) differs.
    tol = backend.tolerance(cpu=(1e-5, 1e-5), gpu=(1e-4, 1e-4),
                            why="the GPU GEMM chooses tiles and split-K by shape, and TP/SP "
                                "halve the shapes: FP32 summation order differs more")
    backend.assert_close(cat([r[0] for r in ranks]), ref_y, tol)
    backend.assert_close(cat([r[1] for r in ranks]), ref_dx, tol)
    backend.assert_close(torch.cat([r[2] for r in ranks]), ref_g1, tol)
    backend.assert_close(torch.cat([r[3] for r in ranks], dim=1), ref_g2, tol)


def test_emulated_backend_never_imports_triton():
    """`--fp8-backend emulated` on the CPU: quantization and all three GEMMs of fp8_linear
    run, and Triton is never imported (in a fresh process, where nothing else did)."""
    script = """if True:
        import sys
        import torch
        from plugins.common.quantize import quantize
        from plugins.fp8 import backends
        from plugins.fp8.linear import fp8_linear
        backend = backends.resolve("emulated")
        x = torch.randn(256, 256, requires_grad=True)
        w = torch.randn(384, 256, requires_grad=True)
        fp8_linear(x, w, backend).sum().backward()
        for block in [(1, 128), (128, 128), (128, 1)]:
            quantize(x.detach(), block)
        assert x.grad is not None and w.grad is not None
        print(sorted(m for m in sys.modules if m.split(".")[0] == "triton"
                     or m.endswith(("triton_quantize", "triton_gemm"))))
    """
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=paths.REPO, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize("m,n,k,b_block", [
    (130, 384, 640, WEIGHT),      # 5 K-blocks and 130 rows: both padded
    (256, 384, 384, WEIGHT),      # 3 K-blocks
    (256, 512, 512, WEIGHT),      # aligned: passed through as it is
    (130, 6, 256, ACTIVATION),    # Wgrad's 1x128 B: rows of A and B to 4, K as it is
])
def test_cublas_alignment_keeps_the_product(m, n, k, b_block):
    """The `torch` backend pads its operands to what cuBLAS's block-scaled GEMM reads
    correctly (`backends._cublas_aligned`); the product's [m, n] corner stays the
    unpadded product, so the padding is only zeros."""
    from plugins.fp8.backends import Operand, _cublas_aligned

    a = Operand(*quantize(torch.randn(m, k), ACTIVATION), ACTIVATION)
    b = Operand(*quantize(torch.randn(n, k) * 0.02, b_block), b_block)
    padded_a, padded_b = _cublas_aligned(a, b)

    assert padded_a.q.shape[0] % 4 == 0 and padded_b.q.shape[0] % 4 == 0
    if b_block == WEIGHT:
        assert padded_a.scales.shape[1] % 4 == 0
    else:
        assert padded_a.q.shape[1] == k
    if (m, k) == (256, 512):
        assert padded_a is a and padded_b is b

    def product(x, y):
        return (dequantize(x.q, x.scales, x.block, torch.float64)
                @ dequantize(y.q, y.scales, y.block, torch.float64).t())

    torch.testing.assert_close(product(padded_a, padded_b)[:m, :n], product(a, b),
                               rtol=1e-12, atol=1e-12)


def _scaled_mm_accepts(t: torch.Tensor, scale: torch.Tensor, block) -> bool:
    """ScaledBlas.cpp's is_blockwise_1x128_scaling / is_blockwise_128x128_scaling for an
    operand t [rows, k] (A, or B^T) and its scales: check_size_stride on each dim, a dim of
    size 1 taking any stride."""
    rows, k = t.shape
    if block == (1, 128):
        want = ((rows, 1), (-(-k // 128), rows))
    else:
        want = ((-(-rows // 128), -(-k // 128)), (-(-k // 128), 1))
    return scale.dim() == 2 and all(
        scale.shape[d] == size and (size <= 1 or scale.stride(d) == stride)
        for d, (size, stride) in enumerate(want))


def test_scales_reach_scaled_mm_without_a_copy():
    """The `torch` backend hands each GEMM the operands' own scales, as views in the layouts
    torch._scaled_mm checks, when the fused quantizers made them (Fprop, Dgrad and Wgrad as
    fp8_linear runs them, ragged `out` and tokens); `quantize`'s row-major 1x128 scales (an
    input given in FP8) are copied into that layout. Checked on the CPU: the layouts, not
    the GEMM."""
    from plugins.common.quantize import quantize_with_transposed
    from plugins.fp8.backends import Operand, _scaled_mm_scales
    from plugins.fp8.weight_cache import quantize_weight_with_transposed

    g = torch.Generator().manual_seed(4)
    x, w, dy = torch.randn(200, 256, generator=g), torch.randn(576, 256, generator=g), \
        torch.randn(200, 576, generator=g)

    def operands(quantized):
        return tuple(Operand(*t, ACTIVATION) for t in quantized)

    x_q, x_t = operands(quantize_with_transposed(x))
    dy_q, dy_t = operands(quantize_with_transposed(dy, pad_cols=True))
    w_q, w_t = quantize_weight_with_transposed(w)
    for a, b in ((x_q, w_q), (dy_q, w_t), (dy_t, x_t)):  # Fprop, Dgrad, Wgrad
        scale_a, scale_b = _scaled_mm_scales(a, b)
        assert scale_a.data_ptr() == a.scales.data_ptr()
        assert scale_b.data_ptr() == b.scales.data_ptr()
        assert _scaled_mm_accepts(a.q, scale_a, a.block)
        assert _scaled_mm_accepts(b.q, scale_b.t(), b.block)  # checked as B^T = b.q
        assert torch.equal(scale_a, a.scales) and torch.equal(scale_b.t(), b.scales)
    given = Operand(*quantize(x, ACTIVATION), ACTIVATION)  # row-major scales
    scale_a, _ = _scaled_mm_scales(given, w_q)
    assert scale_a.data_ptr() != given.scales.data_ptr()
    assert _scaled_mm_accepts(given.q, scale_a, ACTIVATION)
    assert torch.equal(scale_a, given.scales)


@pytest.mark.parametrize("m,n,k", [(0, 256, 128), (256, 128, 0)])
def test_torch_backend_gives_zeros_for_empty_operands(m, n, k):
    """An expert that got no tokens: Fprop and Dgrad have no rows, Wgrad sums over no
    tokens. cuBLAS refuses the empty operands' scale layouts ("Invalid scaling
    configuration", a DeepSeek-V3-style training step on an H200, 2026-11-26), so the
    `torch` backend answers before calling it; the answer needs no GPU."""
    from plugins.fp8.backends import Operand, torch_scaled_gemm

    a = Operand(torch.zeros(m, k, dtype=torch.float8_e4m3fn),
                torch.ones(m, k // 128), ACTIVATION)
    b = Operand(torch.zeros(n, k, dtype=torch.float8_e4m3fn),
                torch.ones(n, k // 128), ACTIVATION)
    out = torch_scaled_gemm(a, b, torch.bfloat16)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16 and not out.any()


def test_an_expert_without_tokens_gets_zero_gradients():
    x = torch.zeros(0, 256, requires_grad=True)
    w = torch.randn(128, 256, requires_grad=True)
    y = fp8_linear(x, w, x_fp8=quantize(x.detach(), ACTIVATION))
    y.backward(torch.zeros(0, 128))
    assert y.shape == (0, 128) and x.grad.shape == (0, 256)
    assert w.grad is not None and not w.grad.any()
