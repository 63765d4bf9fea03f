"""The Triton FP8 GEMM kernel, run by Triton's interpreter on the CPU, against the
emulated backend (the exact block-scaled product)."""

from __future__ import annotations

import pytest
import torch

from tests.multirank import run_ranks

SHAPES = [(64, 128, 128), (130, 256, 384), (256, 384, 256)]  # (M, N, K); M not a tile multiple


def triton_vs_emulated(rank: int, world_size: int) -> list[float]:
    from plugins.fp8 import backends
    from plugins.fp8.quantize import quantize

    errors = []
    g = torch.Generator().manual_seed(0)
    for m, n, k in SHAPES:
        x, w, dy = (torch.randn(m, k, generator=g), torch.randn(n, k, generator=g),
                    torch.randn(n, k, generator=g))
        a = backends.Operand(*quantize(x, (1, 128)), (1, 128))
        for b in (backends.Operand(*quantize(w, (128, 128)), (128, 128)),   # Fprop/Dgrad
                  backends.Operand(*quantize(dy, (1, 128)), (1, 128))):     # Wgrad
            want = backends.emulated_gemm(a, b)
            got = backends.BACKENDS["triton"](a, b)
            errors.append(((got - want).abs().max() / want.abs().max()).item())
    return errors


def test_triton_kernel_matches_the_emulated_product(monkeypatch):
    # The interpreter is chosen when the kernel is defined: set it for the spawned process.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    errors = run_ranks(triton_vs_emulated, 1, timeout=300)[0]
    assert len(errors) == 2 * len(SHAPES)
    # Same products, summed per 128-wide chunk then scaled (FP32 summation order only).
    assert max(errors) < 1e-5, errors


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
    from tests.training_runs import losses, torchrun

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
