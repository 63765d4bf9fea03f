"""Block-scaled FP8 GEMM backends: C = A @ B^T from E4M3 operands and their tile scales.

Every backend computes the same thing: A [m, k] with scales per (a_block) tile, B [n, k]
with scales per (b_block) tile, products accumulated in FP32, result in FP32.
- `emulated`: dequantizes both operands to FP32 and multiplies in FP32: the exact value
  of the block-scaled product up to FP32 summation order. Runs anywhere; the reference.
- `torch`: PyTorch's block-scaled `torch._scaled_mm` on Hopper (sm90) GPUs.
- `triton`: megaseek's Triton kernel (`plugins.fp8.triton_gemm`) on FP8 tensor cores.
A backend that cannot run here raises; nothing falls back to BF16.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from plugins.common.quantize import dequantize

Block = tuple[int, int]


@dataclass(frozen=True)
class Operand:
    q: torch.Tensor        # float8_e4m3fn [rows, k]
    scales: torch.Tensor   # float32, one per tile
    block: Block


def emulated_gemm(a: Operand, b: Operand) -> torch.Tensor:
    return dequantize(a.q, a.scales, a.block) @ dequantize(b.q, b.scales, b.block).t()


def torch_scaled_gemm(a: Operand, b: Operand) -> torch.Tensor:
    # torch._scaled_mm takes B column-major ([k, n] with stride (1, k)) and its block-wise
    # scales in these layouts (aten/src/ATen/native/cuda/ScaledBlas.cpp): 1x128 scales
    # outer-dim-major ([rows, k/128] with stride (1, rows)); B's 128x128 scales as
    # [k/128, n/128] (the transpose of ours, a view); B's 1x128 scales (Wgrad) as a
    # contiguous [k/128, n]. Not yet run on an sm90 GPU (tests/test_fp8_gpu.py checks it).
    scale_a = a.scales.t().contiguous().t()
    scale_b = b.scales.t().contiguous() if b.block == (1, 128) else b.scales.t()
    return torch._scaled_mm(a.q, b.q.t(), scale_a=scale_a, scale_b=scale_b,
                            out_dtype=torch.float32)


def torch_scaled_available() -> str | None:
    """None when the `torch` backend can run, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return f"block-scaled torch._scaled_mm needs an sm90 GPU, this is sm{major}{minor}"
    return None


def triton_scaled_gemm(a: Operand, b: Operand) -> torch.Tensor:
    from plugins.fp8.triton_gemm import triton_gemm

    return triton_gemm(a, b)


BACKENDS: dict[str, Callable[[Operand, Operand], torch.Tensor]] = {
    "emulated": emulated_gemm,
    "torch": torch_scaled_gemm,
    "triton": triton_scaled_gemm,
}


def auto() -> str:
    """`torch` on sm90; `triton` on another GPU with FP8 tensor cores (sm89 or newer);
    `emulated` elsewhere (the CPU, or a GPU without FP8: FP8 numerics, FP32 speed)."""
    if torch_scaled_available() is None:
        return "torch"
    if (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
            and importlib.util.find_spec("triton") is not None):
        return "triton"
    return "emulated"


def resolve(name: str) -> str:
    """The backend `--fp8-backend NAME` asks for ('auto': see `auto`). An unavailable
    explicit choice is an error, never a silent fallback."""
    if name == "auto":
        return auto()
    if name not in BACKENDS:
        raise ValueError(f"--fp8-backend {name}: unknown; choose from auto, "
                         f"{', '.join(BACKENDS)}")
    if name == "torch" and (why := torch_scaled_available()) is not None:
        raise ValueError(f"--fp8-backend torch is unavailable here ({why}); use "
                         "--fp8-backend emulated")
    if name == "triton":
        from plugins.fp8.triton_gemm import available

        if (why := available()) is not None:
            raise ValueError(f"--fp8-backend triton is unavailable here ({why}); use "
                             "--fp8-backend emulated")
    return name
