"""The block-scaled E4M3 format's constants and the checks every quantizer applies.

`plugins.common.quantize` (torch ops) and `plugins.common.triton_quantize` (one Triton
kernel) give the same bits and must refuse the same inputs with the same messages: both
import their checks from here, and neither imports the other's module for them.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SMALLEST_NORMAL_FP32 = 2.0 ** -126  # floor for scales: all-zero (or underflowing) tiles
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_block(shape: torch.Size, block: tuple[int, int], who: str) -> tuple[int, int]:
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"{who}: block must be a pair of positive ints such as (1, 128), "
                         f"(128, 128) or (128, 1); got {block!r}")
    r, c = block
    for name, size, b in (("rows", shape[0], r), ("cols", shape[1], c)):
        if size % b:
            raise ValueError(
                f"{who}: {name} = {size} (dim {0 if name == 'rows' else 1} of shape "
                f"{tuple(shape)}) is not divisible by the block's {name} {b} for block "
                f"{tuple(block)}; pad {name} to a multiple of {b} (zeros quantize exactly)")
    return r, c


def check_input(x: torch.Tensor, block: tuple[int, int], who: str) -> tuple[int, int]:
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"{who}: x has dtype {x.dtype}; expected one of "
                        f"torch.float32, torch.bfloat16, torch.float16")
    if x.dim() != 2:
        raise ValueError(f"{who}: x must be 2-D [rows, cols]; got shape {tuple(x.shape)}")
    return check_block(x.shape, block, who)


def transposed_rows(x: torch.Tensor, pad_rows: bool, who: str) -> int:
    """Rows of x after padding (x^T's columns), checked to make whole 128-row tiles."""
    rows, cols = x.shape
    out_rows = rows + (-rows % 128 if pad_rows else 0)
    check_block(torch.Size((out_rows, cols)), (128, 1), who)
    return out_rows


def outer_dim_major(scales: torch.Tensor) -> torch.Tensor:
    """1x128 scales [rows, k // 128] as the GEMMs take a 1x128 operand's: stride (1, rows),
    the same values (cuBLAS's block-scaled GEMM through torch._scaled_mm reads them so; the
    other backends read any strides). Scales already so (the fused quantizers write them
    so) come back as they are, a view; others are copied."""
    return scales.t().contiguous().t()


def raise_if_non_finite(scales: torch.Tensor, block: tuple[int, int], what: str) -> None:
    """Raises naming the first tile with inf or NaN, for `scales` from
    quantize(..., check_finite=False) (such a tile's scale is inf). A host sync on a GPU."""
    finite = torch.isfinite(scales)  # [R, C]
    if bool(finite.all()):
        return
    r, c = block
    bad = (~finite).nonzero()
    i, j = bad[0].tolist()
    raise ValueError(
        f"{what} has non-finite values (inf or NaN) in tile (row tile {i}, col tile {j}) "
        f"of block {(r, c)}, i.e. rows {i * r}:{(i + 1) * r}, cols {j * c}:{(j + 1) * c}; "
        f"{len(bad)} of {finite.numel()} tiles are affected")
