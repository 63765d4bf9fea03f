"""Block-scaled FP8 GEMM backends: C = A @ B^T from E4M3 operands and their tile scales.

Every backend computes the same thing: A [m, k] with scales per (a_block) tile, B [n, k]
with scales per (b_block) tile, products accumulated in FP32, the result rounded once to
`out_dtype` (FP32 by default; the training dtype in a linear, so that no FP32 product is
written out and read back to be cast).
- `emulated`: dequantizes both operands to FP32 and multiplies in FP32: the exact value
  of the block-scaled product up to FP32 summation order. Runs anywhere; the reference.
- `torch`: PyTorch's block-scaled `torch._scaled_mm` on Hopper (sm90) GPUs.
- `triton`: megaseek's Triton kernel (`plugins.fp8.triton_gemm`) on FP8 tensor cores.
A backend that cannot run here raises; nothing falls back to BF16.

`ACCUMULATING[name](a, b, into)` adds the product to an FP32 tensor instead (Wgrad into
Megatron's `main_grad`, `--gradient-accumulation-fusion`): the Triton kernel in its
epilogue; the emulated backend adds its FP32 product; torch 2.13's block-scaled
`_scaled_mm` (and `_scaled_mm_v2`, `F.scaled_mm`) only writes its output (`out=`
overwrites, `bias` is a vector) and it has no `scaled_addmm`, so its FP32 product is added
(one more pass over the product than an accumulating GEMM).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from plugins.common.quantize import dequantize
from plugins.common.tiles import outer_dim_major

Block = tuple[int, int]


@dataclass(frozen=True)
class Operand:
    q: torch.Tensor        # float8_e4m3fn [rows, k]
    scales: torch.Tensor   # float32, one per tile
    block: Block


def emulated_gemm(a: Operand, b: Operand, out_dtype: torch.dtype = torch.float32
                  ) -> torch.Tensor:
    product = dequantize(a.q, a.scales, a.block) @ dequantize(b.q, b.scales, b.block).t()
    return product.to(out_dtype)


def torch_scaled_gemm(a: Operand, b: Operand, out_dtype: torch.dtype = torch.float32
                      ) -> torch.Tensor:
    # torch._scaled_mm takes B column-major ([k, n] with stride (1, k)).
    m, n = a.q.shape[0], b.q.shape[0]
    if (empty := _empty_product(a, b, out_dtype)) is not None:
        return empty
    a, b = _cublas_aligned(a, b)
    scale_a, scale_b = _scaled_mm_scales(a, b)
    out = torch._scaled_mm(a.q, b.q.t(), scale_a=scale_a, scale_b=scale_b,
                           out_dtype=out_dtype)
    return out if out.shape == (m, n) else out[:m, :n].contiguous()


def _scaled_mm_scales(a: Operand, b: Operand) -> tuple[torch.Tensor, torch.Tensor]:
    """a's and b's scales as torch._scaled_mm takes them (aten/src/ATen/native/cuda/
    ScaledBlas.cpp, is_blockwise_1x128_scaling / is_blockwise_128x128_scaling, checked on
    a and on b^T): 1x128 scales outer-dim-major ([rows, k/128] with stride (1, rows)),
    given as they are for A and transposed for B ([k/128, n], contiguous); B's 128x128
    scales as [k/128, n/128], the transpose of our row-major [n/128, k/128]. Views of the
    operands' own scales where their quantizer wrote that layout (`quantize_with_transposed`,
    the weight quantizers): no copy per GEMM. Others (`quantize`'s row-major 1x128 scales:
    FP8-dispatched tokens, the padded operands of `_cublas_aligned`) are copied."""
    scale_a = outer_dim_major(a.scales)
    if b.block == (1, 128):
        return scale_a, outer_dim_major(b.scales).t()
    return scale_a, b.scales.contiguous().t()


def _empty_product(a: Operand, b: Operand, out_dtype: torch.dtype) -> torch.Tensor | None:
    """The product when an operand is empty (an expert without tokens: no rows in Fprop
    and Dgrad, nothing to sum in Wgrad), else None. cuBLAS refuses such operands' scale
    layouts ("Invalid scaling configuration": a DeepSeek-V3-style step on an H200,
    2026-11-26), and a kernel launch over an empty grid is not needed to know zeros."""
    m, n = a.q.shape[0], b.q.shape[0]
    if 0 not in (m, n, a.q.shape[1]):
        return None
    return torch.zeros(m, n, dtype=out_dtype, device=a.q.device)


def _cublas_aligned(a: Operand, b: Operand) -> tuple[Operand, Operand]:
    """a and b padded with zero rows and zero K-blocks (scale 1) to the shapes cuBLAS's
    block-scaled GEMM reads correctly; the product's first [m, n] are unchanged.

    Seen with torch 2.11 + CUDA 13 on an H100 and an H200 (2026-11-26:
    tests/plugins/fp8/test_gpu.py, scripts/gpu_probe.py; bench/gpu-runs.md):
    - 128x128 scales of B with k/128 not a multiple of 4 (3, 5, 2 tried) give wrong
      products, silently; torch 2.11 refuses the layout with rows padded to 4, which later
      PyTorch demands (ScaledBlas.cpp, is_blockwise_128x128_scaling: round_up(k/128, 4)),
      so the cure is padding k itself;
    - m = 130 fails in cuBLAS's heuristic (CUBLAS_STATUS_NOT_SUPPORTED); a 1x128 B's n is
      padded alike as a precaution (not seen failing).
    Zero columns of both operands add nothing; zero rows give rows that are cut off."""
    k_blocks = a.scales.shape[1]
    pad_k = -k_blocks % 4 if b.block == (128, 128) else 0
    a = _pad(a, rows=-a.q.shape[0] % 4, k_blocks=pad_k)
    b = _pad(b, rows=-b.q.shape[0] % (128 if b.block == (128, 128) else 4), k_blocks=pad_k)
    return a, b


def _pad(x: Operand, rows: int, k_blocks: int) -> Operand:
    if rows == k_blocks == 0:
        return x
    q = torch.nn.functional.pad(x.q.view(torch.uint8), (0, 128 * k_blocks, 0, rows))
    tile_rows = rows // x.block[0] if x.block[0] > 1 else rows
    scales = torch.nn.functional.pad(x.scales, (0, k_blocks, 0, tile_rows), value=1.0)
    return Operand(q.view(torch.float8_e4m3fn), scales, x.block)


def torch_scaled_available() -> str | None:
    """None when the `torch` backend can run, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return f"block-scaled torch._scaled_mm needs an sm90 GPU, this is sm{major}{minor}"
    return None


def triton_scaled_gemm(a: Operand, b: Operand, out_dtype: torch.dtype = torch.float32
                       ) -> torch.Tensor:
    from plugins.fp8.triton_gemm import triton_gemm

    if (empty := _empty_product(a, b, out_dtype)) is not None:
        return empty
    # The kernel writes FP32 and torch casts: a narrower store in the kernel is untried on
    # a GPU (on Hopper the `torch` backend is the default).
    return triton_gemm(a, b).to(out_dtype)


# The multiple of A's rows each backend computes without copying A (`_cublas_aligned`
# pads others with zero rows, a copy per GEMM): the MoE dispatch lays out each FP8
# expert's tokens so (`plugins.fp8.modules.FP8LocalExperts.token_multiple`).
ROW_MULTIPLE = {"emulated": 1, "torch": 4, "triton": 1}

BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "emulated": emulated_gemm,
    "torch": torch_scaled_gemm,
    "triton": triton_scaled_gemm,
}


def _adding(gemm: Callable[..., torch.Tensor]) -> Callable[[Operand, Operand, torch.Tensor], None]:
    def accumulate(a: Operand, b: Operand, into: torch.Tensor) -> None:
        into.add_(gemm(a, b, torch.float32))

    return accumulate


def triton_scaled_gemm_accumulate(a: Operand, b: Operand, into: torch.Tensor) -> None:
    from plugins.fp8.triton_gemm import triton_gemm

    if _empty_product(a, b, into.dtype) is None:  # else nothing to add
        triton_gemm(a, b, accumulate_into=into)


# into += A @ B^T, `into` float32 [m, n] (contiguous for triton).
ACCUMULATING: dict[str, Callable[[Operand, Operand, torch.Tensor], None]] = {
    "emulated": _adding(emulated_gemm),
    "torch": _adding(torch_scaled_gemm),
    "triton": triton_scaled_gemm_accumulate,
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
