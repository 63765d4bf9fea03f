"""The Triton FP8 GEMM kernel, run by Triton's interpreter on the CPU, against the
emulated backend (the exact block-scaled product)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.multirank import run_ranks

WEIGHT, ACTIVATION = (128, 128), (1, 128)
# (M, N, K, blocks of B). With the interpreter's 64x128 tiles in groups of 2 tile rows:
# M not a tile multiple, a short last group (130: 3 tile rows), two full groups (256),
# and N not a tile multiple (300, 1x128 B only: 128x128 blocks need whole blocks).
SHAPES = [(64, 128, 128, (WEIGHT, ACTIVATION)), (130, 256, 384, (WEIGHT, ACTIVATION)),
          (256, 384, 256, (WEIGHT, ACTIVATION)), (200, 300, 256, (ACTIVATION,))]
# For the GPU configs' tiles (up to 128x256): ragged in M and, for 256-wide tiles, in N.
GPU_CONFIG_SHAPES = [(300, 384, 256, (WEIGHT, ACTIVATION)), (300, 200, 256, (ACTIVATION,))]


def relative_errors(shapes, gemm, outer_dim_major: bool = False) -> list[float]:
    """max |C - C_emulated| / max |C_emulated| of `gemm(a, b)` per shape and B block
    (Fprop/Dgrad: 128x128 weight blocks; Wgrad: 1x128 tiles). outer_dim_major: 1x128
    scales laid out as the fused quantizers write them (stride (1, rows))."""
    from plugins.fp8 import backends
    from plugins.common.quantize import quantize
    from plugins.common.tiles import outer_dim_major as laid_out

    def quantized(t, block):
        q, scales = quantize(t, block)
        if outer_dim_major and block == ACTIVATION:
            scales = laid_out(scales)
            assert scales.shape[1] == 1 or scales.stride() == (1, t.shape[0])
        return backends.Operand(q, scales, block)

    errors = []
    g = torch.Generator().manual_seed(0)
    for m, n, k, blocks in shapes:
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        a = quantized(x, ACTIVATION)
        for block in blocks:
            b = quantized(w, block)
            want = backends.emulated_gemm(a, b)
            errors.append(((gemm(a, b) - want).abs().max() / want.abs().max()).item())
    return errors


def triton_vs_emulated(rank: int, world_size: int) -> list[float]:
    from plugins.fp8 import backends, triton_gemm

    # Interpreted: one fixed config, so the autotuner never benchmarks.
    assert triton_gemm._tuned_gemm.configs == [triton_gemm.INTERPRETER_CONFIG]
    return [e for outer_dim_major in (False, True)
            for e in relative_errors(SHAPES, backends.BACKENDS["triton"], outer_dim_major)]


def gpu_configs_vs_emulated(rank: int, world_size: int) -> list[float]:
    from plugins.fp8 import triton_gemm

    # The interpreter ignores warps and stages: each tile shape and group size once.
    metas = {tuple(c.kwargs.items()): c.kwargs for c in triton_gemm.CONFIGS}.values()
    return [e for meta in metas for e in relative_errors(
        GPU_CONFIG_SHAPES, lambda a, b, meta=meta: triton_gemm._launch(
            triton_gemm._block_scaled_gemm, a, b, **meta))]


def test_triton_kernel_matches_the_emulated_product(monkeypatch):
    # The interpreter is chosen when the kernel is defined: set it for the spawned process.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    errors = run_ranks(triton_vs_emulated, 1, timeout=300)[0]
    # Each case twice: 1x128 scales row-major, and outer-dim-major (read through strides)
    assert len(errors) == 2 * sum(len(blocks) for *_, blocks in SHAPES)
    # Same products, summed per 128-wide chunk then scaled (FP32 summation order only).
    assert max(errors) < 1e-5, errors


def test_every_gpu_tile_shape_matches_the_emulated_product(monkeypatch):
    """The tiles the GPU autotunes over, interpreted: their masks and grouped order."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    errors = run_ranks(gpu_configs_vs_emulated, 1, timeout=300)[0]
    assert errors
    assert max(errors) < 1e-5, errors  # FP32 summation order only, as above


def accumulated_vs_emulated(rank: int, world_size: int) -> list[float]:
    """Wgrad into main_grad: `into + A @ B^T` by the kernel's accumulating epilogue, against
    the emulated product added to the same FP32 values; for each backend's path."""
    from plugins.common.quantize import quantize
    from plugins.fp8 import backends

    errors = []
    g = torch.Generator().manual_seed(3)
    for m, n, k in [(130, 256, 384), (200, 300, 256)]:  # ragged tiles in M and N
        a = backends.Operand(*quantize(torch.randn(m, k, generator=g), ACTIVATION), ACTIVATION)
        b = backends.Operand(*quantize(torch.randn(n, k, generator=g), ACTIVATION), ACTIVATION)
        main_grad = torch.randn(m, n, generator=g)
        want = main_grad + backends.emulated_gemm(a, b)
        for name in ("triton", "emulated"):
            into = main_grad.clone()
            backends.ACCUMULATING[name](a, b, into)
            errors.append(((into - want).abs().max() / want.abs().max()).item())
    return errors


def test_triton_kernel_accumulates_into_fp32(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    errors = run_ranks(accumulated_vs_emulated, 1, timeout=300)[0]
    assert len(errors) == 4
    assert max(errors) < 1e-5, errors  # FP32 summation order only, as above


def test_configs_fit_h100_and_the_key_leaves_out_m():
    from plugins.fp8 import triton_gemm

    h100, sm89 = 227 * 1024, 99 * 1024  # shared memory a block may opt into
    assert all(triton_gemm._shared_bytes(c) <= h100 for c in triton_gemm.CONFIGS)
    assert triton_gemm._fitting_configs(triton_gemm.CONFIGS, h100) == list(triton_gemm.CONFIGS)
    small = triton_gemm._fitting_configs(triton_gemm.CONFIGS, sm89)
    assert small and all(triton_gemm._shared_bytes(c) <= sm89 for c in small)
    # Token counts change on almost every MoE call: tuning must not follow them.
    assert "M" not in triton_gemm._tuned_gemm.keys and "K" not in triton_gemm._tuned_gemm.keys


def test_unavailable_without_a_gpu_or_the_interpreter(monkeypatch):
    from plugins.fp8 import backends

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="--fp8-backend triton is unavailable"):
        backends.resolve("triton")


@pytest.mark.slow
def test_trains_with_the_triton_backend(tmp_path):
    """Megatron's loop with `--fp8-backend triton` (interpreted) follows the emulated
    backend's loss curve up to FP32 summation order."""
    from tests.helpers.training_runs import losses, torchrun

    args = ["--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "256",
            "--num-attention-heads", "4", "--seq-length", "64", "--max-position-embeddings",
            "64", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3",
            "--train-iters", "3", "--log-interval", "1", "--eval-iters", "1",
            "--eval-interval", "1000",
            "--plugins", "fp8", "--fp8-format", "e4m3", "--fp8-recipe", "blockwise"]
    run = lambda backend, env: losses(torchrun(  # noqa: E731
        ["-m", "integration.pretrain"], args + ["--fp8-backend", backend], tmp_path, env=env))
    triton = run("triton", {"TRITON_INTERPRET": "1"})
    emulated = run("emulated", {})
    assert sorted(triton) == sorted(emulated) == [1, 2, 3]
    for i in (1, 2, 3):
        assert triton[i] == pytest.approx(emulated[i], rel=1e-4)
