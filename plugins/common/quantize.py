"""Fine-grained (tile-wise) E4M3 quantization, as in DeepSeek-V3's FP8 training.

DeepSeek-V3 stores every GEMM operand in E4M3 (3 mantissa bits, max 448) and keeps the
range problem of so few bits in check with one float32 scale per small tile, computed
online from the tile's absolute maximum: scale = amax / 448, so the tile's largest value
maps to E4M3's largest. An outlier then costs precision only inside its own tile. The
tilings, for y = x @ W^T with x [tokens, in] and W [out, in]:

    Fprop  y  = x @ W^T     x  1x128 (per token, per 128 channels), W 128x128
    Dgrad  dx = dy @ W      dy 1x128,                              W 128x128 (as W^T)
    Wgrad  dW = dy^T @ x    dy and x 128x1 (128 tokens per channel, K runs over tokens)

In every case the tiles run along the GEMM's reduction dimension K, so one scale applies
to each 128-long stretch of K and can be applied once per 128 products (see
`plugins.fp8.accumulation`). Blocks (1, 128), (128, 128) and (128, 1) are the ones used;
any (r, c) that divides the shape works.

Convention: `scales` multiply on the way back, x ≈ q * scale (DeepSeek's checkpoints call
the same numbers `weight_scale_inv`, one per 128x128 block, laid out [out/128, in/128] as
here). Error bound per element, with s the tile's scale: |dequantize(q) - x| <=
max(2^-4 * |x|, 2^-10 * s) up to float32 rounding of x / s and q * s, i.e. half an E4M3
ulp: relative 2^-4 where |x| / s is in E4M3's normal range (>= 2^-6), absolute 2^-10 * s
(half the smallest subnormal) below it; never more than 2^-4 of the tile's amax. Scales
never go below float32's smallest normal 2^-126: an all-zero tile gets that scale and zeros.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from types import ModuleType

import torch

from plugins.common.tiles import (
    E4M3_MAX,
    SMALLEST_NORMAL_FP32,
    check_block,
    check_input,
    outer_dim_major,
    raise_if_non_finite,
    transposed_rows,
)

__all__ = ["E4M3_MAX", "Quantizer", "dequantize", "pad_to_tiles", "quantize",
           "quantize_blocks_transposed", "quantize_blocks_with_transposed", "quantize_transposed",
           "quantize_with_transposed", "raise_if_non_finite", "requantize_transposed",
           "tile_scales"]


@dataclass(frozen=True)
class Quantizer:
    """Where quantization runs on one device, decided once: `triton` is
    `plugins.common.triton_quantize` where its kernels run on `device` (a CUDA GPU of sm89
    or newer, or Triton's interpreter), else None (torch ops). Finding that out (a module
    search, an import, a device query) costs tens of microseconds of host time, as much as
    a launch; a module resolves it when it first sees its device (`for_device`) and hands
    it to every quantization it queues (`quantizer=`). Plain callers pass nothing and get
    the same decision per call. It changes speed only: both paths give the same bits."""

    device: torch.device
    triton: ModuleType | None

    @classmethod
    def for_device(cls, device: torch.device) -> "Quantizer":
        device = torch.device(device)
        if device.type != "cuda" or importlib.util.find_spec("triton") is None:
            return cls(device, None)  # CPU tensors never import Triton
        from plugins.common import triton_quantize

        return cls(device, triton_quantize if triton_quantize.available(device) is None
                   else None)

    def kernel(self, block: tuple[int, int]) -> ModuleType | None:
        """The Triton kernels where they quantize in `block` here, else None."""
        return self.triton if self.triton is not None and block in self.triton.BLOCKS else None


def _triton_kernel(x: torch.Tensor, block: tuple[int, int], quantizer: Quantizer | None = None):
    """`plugins.common.triton_quantize` where it should quantize x in `block`, else None:
    as `quantizer` decided for x's device, or decided now (no quantizer, another device)."""
    if quantizer is None or quantizer.device != x.device:
        quantizer = Quantizer.for_device(x.device)
    return quantizer.kernel(block)


def _tiles(x: torch.Tensor, r: int, c: int) -> torch.Tensor:
    rows, cols = x.shape
    return x.reshape(rows // r, r, cols // c, c)  # [R, r, C, c]


def tile_scales(amax: torch.Tensor, power_of_two_scales: bool = False) -> torch.Tensor:
    """Per-tile scales from per-tile absolute maxima (float32, any shape); inf where amax
    is inf or NaN, so that such a tile dequantizes to inf or NaN, never to finite values."""
    # The floor keeps zero tiles (and amax so small that amax / 448 underflows) finite and
    # positive; an all-zero tile gets scale 2^-126 and quantizes to zeros.
    scale = (amax / E4M3_MAX).clamp_min(SMALLEST_NORMAL_FP32)
    if power_of_two_scales:
        # Round up to 2^ceil(log2(scale)) exactly via frexp (scale = m * 2^e, m in [0.5, 1)):
        # m == 0.5 is already a power of two. Up, so that amax / scale stays <= 448.
        mantissa, exponent = torch.frexp(scale)
        scale = torch.ldexp(torch.ones_like(scale), exponent - (mantissa == 0.5).int())
    return torch.where(torch.isfinite(amax), scale, torch.inf)


def quantize(x: torch.Tensor, block: tuple[int, int], *, power_of_two_scales: bool = False,
             check_finite: bool = True, quantizer: Quantizer | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] fp32/bf16/fp16 -> (q [rows, cols] float8_e4m3fn,
    scales [rows // r, cols // c] float32) for block (r, c); x ≈ dequantize(q, scales, block).

    power_of_two_scales rounds each scale up to 2^ceil(log2(amax / 448)), as DeepSeek's
    later checkpoints and FP8 dispatch do: scaling by it is exact, at up to 1 bit of range.

    Non-finite values raise ValueError naming the first bad tile: the E4M3 cast would turn
    them into NaN or (on some backends) silently into ±448, and one inf makes the whole
    tile's scale inf. That check waits for the GPU; check_finite=False skips it, for
    callers that check the scales later (`raise_if_non_finite`) after queuing more work.
    A tile with inf or NaN gets scale inf either way, so it cannot dequantize to finite.

    CUDA tensors on sm89+ go through the Triton kernel `plugins.common.triton_quantize`
    for blocks (1, 128), (128, 128) and (128, 1): one pass over memory, the same bits.
    `quantizer`: where that was decided for x's device (`Quantizer`; the other quantize
    functions take it too); None decides it in this call.
    """
    r, c = check_input(x, block, "quantize")
    kernel = _triton_kernel(x, (r, c), quantizer)
    if kernel is not None:  # one pass over memory on the GPU, bit-identical
        return kernel.quantize(x, (r, c), power_of_two_scales=power_of_two_scales,
                               check_finite=check_finite)
    q, scales = _quantize_tiles(x, (r, c), power_of_two_scales)
    if check_finite:
        raise_if_non_finite(scales, (r, c), "quantize: x")
    return q, scales


def _quantize_tiles(x: torch.Tensor, block: tuple[int, int], power_of_two_scales: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    tiles = _tiles(x.float(), *block)  # [R, r, C, c] float32, exact upcast
    amax = tiles.abs().amax(dim=3).amax(dim=1)  # [R, C], NaN where a tile has one
    scales = tile_scales(amax, power_of_two_scales)  # [R, C]
    # Clamp before the cast: the cast's handling of out-of-range values differs between
    # backends and versions (NaN or saturation). With amax scaling values only leave
    # [-448, 448] by rounding of amax / scale, which the clamp undoes.
    scaled = (tiles / scales[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX)
    return scaled.to(torch.float8_e4m3fn).reshape(x.shape), scales  # [rows, cols], [R, C]


def quantize_transposed(x: torch.Tensor, *, power_of_two_scales: bool = False,
                        check_finite: bool = True, pad_rows: bool = False,
                        quantizer: Quantizer | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] -> x^T in 1x128 tiles: (q [cols, rows], scales [cols, rows // 128]),
    exactly quantize(x.t().contiguous(), (1, 128)). Wgrad's operands are tiled along
    tokens this way; on a GPU the Triton kernel reads x once and never builds x^T.

    pad_rows appends zero rows to x up to a multiple of 128 first (a ragged token count:
    zeros add nothing to Wgrad's sum over tokens); q is then [cols, rows rounded up]."""
    check_input(x, (1, 1), "quantize_transposed")
    transposed_rows(x, pad_rows, "quantize_transposed")
    kernel = _triton_kernel(x, (128, 1), quantizer)
    if kernel is not None:
        return kernel.quantize_transposed(x, power_of_two_scales=power_of_two_scales,
                                          check_finite=check_finite, pad_rows=pad_rows)
    x_t = pad_to_tiles(x, rows=128 if pad_rows else 1).t().contiguous()
    q, scales = quantize(x_t, (1, 128), power_of_two_scales=power_of_two_scales,
                         check_finite=False, quantizer=quantizer)
    if check_finite:
        raise_if_non_finite(scales, (1, 128), "quantize_transposed: x^T")
    return q, scales


def quantize_blocks_transposed(x: torch.Tensor, *, power_of_two_scales: bool = False,
                               check_finite: bool = True,
                               quantizer: Quantizer | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] -> x^T in 128x128 blocks, rows zero-padded to whole blocks:
    (q [cols, rows rounded up to 128], scales [cols // 128, rows rounded up // 128]),
    exactly quantize(pad_to_tiles(x, rows=128).t().contiguous(), (128, 128)). Dgrad takes
    the weight so (W^T); square blocks make these the bits of W's own quantization,
    transposed, and on a GPU the Triton kernel writes them from one read of W, with no
    transposed copy of either."""
    check_input(x, (1, 128), "quantize_blocks_transposed")
    kernel = _triton_kernel(x, (128, 128), quantizer)
    if kernel is not None:
        return kernel.quantize_blocks_transposed(x, power_of_two_scales=power_of_two_scales,
                                                 check_finite=check_finite)
    x_t = pad_to_tiles(x, rows=128).t().contiguous()
    q, scales = quantize(x_t, (128, 128), power_of_two_scales=power_of_two_scales,
                         check_finite=False, quantizer=quantizer)
    if check_finite:
        raise_if_non_finite(scales, (128, 128), "quantize_blocks_transposed: x^T")
    return q, scales


def requantize_transposed(q: torch.Tensor, scales: torch.Tensor, *,
                          power_of_two_scales: bool = False, pad_rows: bool = False,
                          quantizer: Quantizer | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """x held in FP8 in 1x128 tiles (q [rows, cols], scales [rows, cols // 128]) -> x^T in
    1x128 tiles, exactly quantize_transposed(dequantize(q, scales, (1, 128)), ...): the
    layer input cached for backward, re-tiled along tokens for Wgrad. On a GPU the Triton
    kernel reads the FP8 bytes once; nothing in float32 is built. Not checked for
    non-finite values: these are the source's, which its own quantization reported."""
    kernel = _triton_kernel(q, (128, 1), quantizer)
    if kernel is not None:
        return kernel.requantize_transposed(q, scales, power_of_two_scales=power_of_two_scales,
                                            pad_rows=pad_rows)
    return quantize_transposed(dequantize(q, scales, (1, 128)), check_finite=False,
                               power_of_two_scales=power_of_two_scales, pad_rows=pad_rows,
                               quantizer=quantizer)


def quantize_with_transposed(x: torch.Tensor, *, power_of_two_scales: bool = False,
                             check_finite: bool = True, pad_cols: bool = False,
                             quantizer: Quantizer | None = None
                             ) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                        tuple[torch.Tensor, torch.Tensor]]:
    """x [rows, cols] -> (x in 1x128 tiles, x^T in 1x128 tiles), both quantized from x
    itself: a linear's input (Fprop's and Wgrad's operands) or output gradient (Dgrad's
    and Wgrad's). Exactly
        (quantize(pad_to_tiles(x, cols=128 if pad_cols else 1), (1, 128)),
         quantize_transposed(x, pad_rows=True)),
    i.e. q [rows, cols_p], scales [rows, cols_p // 128] and q_t [cols, rows_p], scales_t
    [cols, rows_p // 128], with the rows of x^T (tokens) zero-padded to whole tiles and,
    with pad_cols, the cols of x (a ragged `out`) too. The scales come outer-dim-major,
    stride (1, rows) and (1, cols): the layout the GEMMs read 1x128 scales in (see
    `outer_dim_major`), so no copy of them is made per GEMM. On a GPU one Triton kernel
    writes all four from one read of x; check_finite as in `quantize` (x's tiles named)."""
    check_input(x, (1, 1) if pad_cols else (1, 128), "quantize_with_transposed")
    kernel = _triton_kernel(x, (1, 128), quantizer)
    if kernel is not None:
        return kernel.quantize_with_transposed(x, power_of_two_scales=power_of_two_scales,
                                               check_finite=check_finite, pad_cols=pad_cols)
    p2 = dict(power_of_two_scales=power_of_two_scales, check_finite=False, quantizer=quantizer)
    q, scales = quantize(pad_to_tiles(x, cols=128 if pad_cols else 1), (1, 128), **p2)
    q_t, scales_t = quantize_transposed(x, pad_rows=True, **p2)
    if check_finite:
        raise_if_non_finite(scales, (1, 128), "quantize_with_transposed: x")
    return (q, outer_dim_major(scales)), (q_t, outer_dim_major(scales_t))


def quantize_blocks_with_transposed(x: torch.Tensor, *, power_of_two_scales: bool = False,
                                    check_finite: bool = True,
                                    quantizer: Quantizer | None = None
                                    ) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                               tuple[torch.Tensor, torch.Tensor]]:
    """x [rows, cols] -> (x, x^T) in 128x128 blocks, rows zero-padded to whole blocks:
    a weight as Fprop and as Dgrad take it. Exactly
        (quantize(pad_to_tiles(x, rows=128), (128, 128)), quantize_blocks_transposed(x)),
    both scales row-major ([rows_p // 128, cols // 128] and its transpose, each contiguous
    as the GEMMs read a 128x128 operand's). On a GPU one Triton kernel writes all four from
    one read of x; check_finite as in `quantize` (x's blocks named)."""
    check_input(x, (1, 128), "quantize_blocks_with_transposed")
    kernel = _triton_kernel(x, (128, 128), quantizer)
    if kernel is not None:
        return kernel.quantize_blocks_with_transposed(
            x, power_of_two_scales=power_of_two_scales, check_finite=check_finite)
    p2 = dict(power_of_two_scales=power_of_two_scales, check_finite=False, quantizer=quantizer)
    blocks = quantize(pad_to_tiles(x, rows=128), (128, 128), **p2)
    if check_finite:
        raise_if_non_finite(blocks[1], (128, 128), "quantize_blocks_with_transposed: x")
    return blocks, quantize_blocks_transposed(x, **p2)


def pad_to_tiles(t: torch.Tensor, rows: int = 1, cols: int = 1) -> torch.Tensor:
    """t [r, c] with zero rows and columns appended up to multiples of `rows` and `cols`:
    zeros quantize exactly and add nothing to a product, so a ragged dimension costs a
    copy, never accuracy."""
    extra_rows, extra_cols = -t.shape[0] % rows, -t.shape[1] % cols
    if extra_rows == extra_cols == 0:
        return t
    return torch.nn.functional.pad(t, (0, extra_cols, 0, extra_rows))


def dequantize(q: torch.Tensor, scales: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [rows, cols] float8_e4m3fn, scales [rows // r, cols // c] -> [rows, cols] dtype."""
    if q.dtype != torch.float8_e4m3fn:
        raise TypeError(f"dequantize: q has dtype {q.dtype}; expected torch.float8_e4m3fn")
    if q.dim() != 2:
        raise ValueError(f"dequantize: q must be 2-D [rows, cols]; got shape {tuple(q.shape)}")
    r, c = check_block(q.shape, block, "dequantize")
    expected = (q.shape[0] // r, q.shape[1] // c)
    if tuple(scales.shape) != expected:
        raise ValueError(f"dequantize: scales have shape {tuple(scales.shape)}; expected "
                         f"{expected} for q of shape {tuple(q.shape)} and block {(r, c)}")
    tiles = _tiles(q.float(), r, c) * scales.float()[:, None, :, None]  # [R, r, C, c]
    return tiles.reshape(q.shape).to(dtype)
