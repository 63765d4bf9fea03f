"""Tile-wise E4M3 quantization as one Triton kernel: x read once, q and scales written once.

`plugins.common.quantize.quantize` in torch ops passes over memory several times (upcast,
abs, amax, divide, clamp, cast). Activations are quantized on every step, so on
the GPU the same result should come at memory bandwidth. This kernel gives it bit for bit
(same codes, same scales): the same float32 operations with IEEE division, the same
floor, power-of-two rounding and clamp, and the same error for a tile with inf or NaN.

Blocks (1, 128), (128, 128) and (128, 1), and `quantize_transposed(x)`: x^T in 1x128
tiles, i.e. x in 128x1 tiles (128 tokens per channel, as Wgrad takes x and dy) written
out transposed, from one read of x and with no `x.t().contiguous()` copy; a ragged token
count is zero-padded on the way. `requantize_transposed(q, scales)` does the same from x
held in FP8 1x128 tiles, decoding it in registers. `quantize_with_transposed(x)` and
`quantize_blocks_with_transposed(x)` write x and x^T together from one read of each
128x128 chunk (a linear's x or dy in 1x128 tiles both ways; a weight as W and W^T), the
1x128 scales outer-dim-major, as the GEMMs read them.

`plugins.common.quantize.quantize` calls it for CUDA tensors where it can run (sm89 or newer,
for the E4M3 conversions); CPU tensors keep the torch ops. `TRITON_INTERPRET=1`, set
before this module is imported, runs the kernel on the CPU, which is how the tests check it.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from plugins.common.tiles import (
    E4M3_MAX,
    SMALLEST_NORMAL_FP32,
    check_block,
    check_input,
    raise_if_non_finite,
    transposed_rows,
)

# Launch shape per block: (BLOCK_R, BLOCK_C, num_warps), i.e. the chunk of x one program
# takes. Starting points, not tuned on a GPU (first run on an H100, 2026-11-26: kernel
# alone at 21% to 110% of copy bandwidth, bench/results.md).
LAUNCH = {
    (1, 128): (32, 128, 4),     # 32 rows of one 128-wide tile column: 32 scales
    (128, 128): (128, 128, 8),  # one tile: one scale
    (128, 1): (128, 64, 8),     # 64 columns of one 128-tall tile row: 64 scales
}
BLOCKS = tuple(LAUNCH)

_E4M3_MAX = tl.constexpr(E4M3_MAX)
_SMALLEST_NORMAL_FP32 = tl.constexpr(SMALLEST_NORMAL_FP32)
_INF_BITS = tl.constexpr(0x7F800000)  # float32 bits of inf; above it: NaN


@triton.jit
def _tile_scales(amax_bits, POWER_OF_TWO: tl.constexpr):
    """Per-tile float32 scales from the bits of the tiles' amax, as `quantize.tile_scales`;
    inf for a tile holding inf or NaN (amax_bits >= inf's bits)."""
    amax = amax_bits.to(tl.float32, bitcast=True)
    # div_rn: IEEE division as in torch (on NVIDIA GPUs `/` is not correctly rounded).
    scale = tl.maximum(tl.math.div_rn(amax, _E4M3_MAX), _SMALLEST_NORMAL_FP32)
    if POWER_OF_TWO:
        # Round up to a power of two as frexp does: a positive normal float is a power of
        # two iff its mantissa bits are zero; otherwise carry into the exponent, then
        # clear the mantissa.
        bits = scale.to(tl.int32, bitcast=True)
        scale = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.where(amax_bits >= _INF_BITS, float("inf"), scale)


@triton.jit
def _e4m3_codes(y):
    """float32 y in [-448, 448] -> E4M3 codes (uint8), rounded to nearest even, in
    integer arithmetic: for Triton's interpreter, whose float8 cast is not RNE (see
    `_SOFTWARE_CASTS`); a GPU uses its conversion instruction instead."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    # Normal codes (|y| >= 2^-6): keep 3 of float32's 23 mantissa bits, rounding the 20
    # dropped ones to nearest even (a carry runs on into the exponent, as it should),
    # and rebias the exponent from 127 to 7.
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - ((127 - 7) << 3)
    # Subnormal codes (|y| < 2^-6) count multiples of 2^-9: adding 2^23 rounds |y| * 2^9
    # to an integer (ties to even) in the low mantissa bits. 8 comes out as 2^-6's code.
    subnormal = (tl.abs(y) * 512.0 + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
    return (tl.where(mag >= (121 << 23), normal, subnormal) | sign).to(tl.uint8)


@triton.jit
def _e4m3_value(codes):
    """E4M3 codes (uint8) -> float32, exactly, in integer arithmetic (for the interpreter,
    as `_e4m3_codes`): normal codes rebias the exponent from 7 to 127, subnormal ones
    count multiples of 2^-9; 0x7F and 0xFF are NaN."""
    bits = codes.to(tl.int32)
    mag = bits & 0x7F
    normal = ((mag + ((127 - 7) << 3)) << 20).to(tl.float32, bitcast=True)
    value = tl.where(mag >= 8, normal, (mag & 7).to(tl.float32) * 0.001953125)
    value = tl.where(mag == 0x7F, float("nan"), value)
    # The sign as a bit: `-value` may be compiled as 0 - value, which makes -0 +0 (the
    # likely cause of -0 lost in the requantized cases on an H100, 2026-11-26; the
    # hardware conversions were seen to keep it). Not yet re-run on a GPU.
    return (value.to(tl.int32, bitcast=True) | ((bits & 0x80) << 24)).to(tl.float32,
                                                                       bitcast=True)


@triton.jit
def _codes(v, scale, POWER_OF_TWO: tl.constexpr, SOFTWARE_CASTS: tl.constexpr):
    """E4M3 codes (uint8) of float32 v divided by its tiles' scales (broadcast), clamped
    to +-448 first as `quantize._quantize_tiles` does."""
    if POWER_OF_TWO:
        y = v * tl.math.div_rn(1.0, scale)  # 1 / scale is a power of two: same as v / scale
    else:
        y = tl.math.div_rn(v, scale)
    y = tl.minimum(tl.maximum(y, -_E4M3_MAX), _E4M3_MAX)  # where amax / scale rounded up
    if SOFTWARE_CASTS:
        return _e4m3_codes(y)
    return y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)  # RNE, as torch's cast


@triton.jit
def _load_chunk(x, src_scales, r, c, rows, cols, stride_r, stride_c,
                FROM_FP8: tl.constexpr, SOFTWARE_CASTS: tl.constexpr):
    """x's values at rows r [BR] and cols c [BC] as float32 [BR, BC], zeros outside x.
    FROM_FP8: x holds E4M3 codes (uint8) in 1x128 tiles with src_scales [rows, cols // 128],
    and the values are codes times scales in float32, as `quantize.dequantize`."""
    inside = (r < rows)[:, None] & (c < cols)[None, :]                # [BR, BC]
    r64, c64 = r.to(tl.int64), c.to(tl.int64)                         # offsets may pass 2^31
    v = tl.load(x + r64[:, None] * stride_r + c64[None, :] * stride_c, mask=inside,
                other=0)                                              # [BR, BC]
    if FROM_FP8:
        if SOFTWARE_CASTS:
            v = _e4m3_value(v)
        else:
            v = v.to(tl.float8e4nv, bitcast=True).to(tl.float32)      # exact
        s = tl.load(src_scales + r64[:, None] * (cols // 128) + (c // 128)[None, :],
                    mask=inside, other=0.0)                           # [BR, BC]
        return v * s
    if SOFTWARE_CASTS and v.dtype == tl.bfloat16:
        # bf16 is float32's upper half: widening is a shift (also for subnormals).
        v = (v.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return v.to(tl.float32)                                           # exact


@triton.jit
def _quantize_tiles(x, q, scales, src_scales, rows, cols, out_rows, stride_r, stride_c,
                    TILE_R: tl.constexpr, TILE_C: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    POWER_OF_TWO: tl.constexpr, TRANSPOSE: tl.constexpr,
                    FROM_FP8: tl.constexpr, SOFTWARE_CASTS: tl.constexpr):
    """Quantize x [rows, cols] (any strides), zero rows appended up to out_rows, in
    TILE_R x TILE_C tiles.

    One program takes a BLOCK_R x BLOCK_C chunk of x; each tile side is 1 or the chunk's
    whole side, so the chunk holds [BLOCK_R // TILE_R, BLOCK_C // TILE_C] whole tiles:
        (1, 128)    BLOCK_R rows of one 128-wide tile column  -> BLOCK_R scales
        (128, 128)  one tile                                  -> 1 scale
        (128, 1)    BLOCK_C columns of one 128-tall tile row  -> BLOCK_C scales
    It loads the chunk once, reduces it to its tiles' amax, and writes the E4M3 codes to
    q (uint8) and the scales. q is [out_rows, cols] and scales [out_rows // TILE_R,
    cols // TILE_C]; with TRANSPOSE, q is [cols, out_rows] and scales [cols // TILE_C,
    out_rows // TILE_R]: x^T quantized in TILE_C x TILE_R tiles. A tile with inf or NaN
    gets scale inf. FROM_FP8: x is itself FP8 in 1x128 tiles (see `_load_chunk`).
    SOFTWARE_CASTS does the conversions between float32 and bf16 or E4M3 in integer
    arithmetic, for Triton's interpreter (see `_SOFTWARE_CASTS`).
    """
    col_chunks = tl.cdiv(cols, BLOCK_C)
    pid_r, pid_c = tl.program_id(0) // col_chunks, tl.program_id(0) % col_chunks
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)                       # [BR] rows of x
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)                       # [BC] cols of x
    r64, c64 = r.to(tl.int64), c.to(tl.int64)
    v = _load_chunk(x, src_scales, r, c, rows, cols, stride_r, stride_c,
                    FROM_FP8, SOFTWARE_CASTS)                         # [BR, BC] float32

    # Tile amax, as float32 bits: for |v| the integers order as the floats do, and inf
    # and NaN (exponent all ones) above every finite value, so this max cannot drop a NaN
    # (a float max may) and also tells which tiles are not finite.
    amax_bits = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF            # [BR, BC]
    if TILE_C > 1:
        amax_bits = tl.max(amax_bits, axis=1, keep_dims=True)         # [BR, 1]
    if TILE_R > 1:
        amax_bits = tl.max(amax_bits, axis=0, keep_dims=True)         # [1, BC] or [1, 1]
    scale = _tile_scales(amax_bits, POWER_OF_TWO)                     # [BR // TR, BC // TC]
    codes = _codes(v, scale, POWER_OF_TWO, SOFTWARE_CASTS)            # [BR, BC] uint8

    inside = (r < out_rows)[:, None] & (c < cols)[None, :]            # [BR, BC]
    tr = pid_r * (BLOCK_R // TILE_R) + tl.arange(0, BLOCK_R // TILE_R)  # [BR // TR] tile rows
    tc = pid_c * (BLOCK_C // TILE_C) + tl.arange(0, BLOCK_C // TILE_C)  # [BC // TC] tile cols
    tiles_inside = (tr < out_rows // TILE_R)[:, None] & (tc < cols // TILE_C)[None, :]
    if TRANSPOSE:
        tl.store(q + c64[:, None] * out_rows + r64[None, :], tl.trans(codes),
                 mask=tl.trans(inside))                           # [BC, BR] of [cols, out_rows]
        tl.store(scales + tc[:, None] * (out_rows // TILE_R) + tr[None, :], tl.trans(scale),
                 mask=tl.trans(tiles_inside))
    else:
        tl.store(q + r64[:, None] * cols + c64[None, :], codes, mask=inside)
        tl.store(scales + tr[:, None] * (cols // TILE_C) + tc[None, :], scale,
                 mask=tiles_inside)


@triton.jit
def _quantize_with_transposed(x, q, scales, q_t, scales_t, rows, cols, q_rows, q_cols,
                              out_rows, stride_r, stride_c, s_stride_r, s_stride_c,
                              t_stride_r, t_stride_c, SQUARE: tl.constexpr,
                              POWER_OF_TWO: tl.constexpr, SOFTWARE_CASTS: tl.constexpr):
    """x [rows, cols] (any strides, zeros outside) quantized twice from one read: as q
    [q_rows, q_cols] and as x^T, q_t [cols, out_rows]. One program takes one 128x128 chunk
    of x, i.e. of the zero-padded [out_rows, q_cols] grid:
        SQUARE      one 128x128 block: one scale, the same codes written both ways
                    (q_rows = out_rows: x's rows padded; scales [out_rows // 128,
                    cols // 128], scales_t its transpose)
        otherwise   128 1x128 tiles along x's rows (q, scales [q_rows, q_cols // 128],
                    q_rows = rows, q_cols = cols or cols padded) and 128 along its columns,
                    written as 1x128 tiles of x^T (q_t, scales_t [cols, out_rows // 128])
    Scales go where their strides say (s_stride_*, t_stride_*): the caller lays them out as
    the GEMMs read them. A tile with inf or NaN gets scale inf, as `_quantize_tiles`."""
    col_chunks = tl.cdiv(q_cols, 128)
    pid_r, pid_c = tl.program_id(0) // col_chunks, tl.program_id(0) % col_chunks
    r = pid_r * 128 + tl.arange(0, 128)                               # [128] rows of x
    c = pid_c * 128 + tl.arange(0, 128)                               # [128] cols of x
    r64, c64 = r.to(tl.int64), c.to(tl.int64)
    v = _load_chunk(x, x, r, c, rows, cols, stride_r, stride_c,
                    False, SOFTWARE_CASTS)                            # [128, 128] float32
    amax_bits = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF            # as `_quantize_tiles`
    if SQUARE:
        amax_bits = tl.max(tl.max(amax_bits, axis=1, keep_dims=True), axis=0,
                           keep_dims=True)                            # [1, 1]
        scale = _tile_scales(amax_bits, POWER_OF_TWO)                 # [1, 1]
        codes = _codes(v, scale, POWER_OF_TWO, SOFTWARE_CASTS)        # [128, 128]
        codes_t = tl.trans(codes)
        tl.store(scales + pid_r * s_stride_r + pid_c * s_stride_c + tl.zeros((1, 1), tl.int32),
                 scale)
        tl.store(scales_t + pid_c * t_stride_r + pid_r * t_stride_c + tl.zeros((1, 1), tl.int32),
                 scale)
    else:
        row_scale = _tile_scales(tl.max(amax_bits, axis=1, keep_dims=True),
                                 POWER_OF_TWO)                        # [128, 1]: x's tiles
        col_scale = _tile_scales(tl.max(amax_bits, axis=0, keep_dims=True),
                                 POWER_OF_TWO)                        # [1, 128]: x^T's
        codes = _codes(v, row_scale, POWER_OF_TWO, SOFTWARE_CASTS)    # [128, 128]
        codes_t = tl.trans(_codes(v, col_scale, POWER_OF_TWO, SOFTWARE_CASTS))
        tl.store(scales + r64[:, None] * s_stride_r + pid_c * s_stride_c, row_scale,
                 mask=(r < q_rows)[:, None])
        tl.store(scales_t + c64[None, :] * t_stride_r + pid_r * t_stride_c, col_scale,
                 mask=(c < cols)[None, :])
    tl.store(q + r64[:, None] * q_cols + c64[None, :], codes,
             mask=(r < q_rows)[:, None] & (c < q_cols)[None, :])       # [128, 128] of q
    tl.store(q_t + c64[:, None] * out_rows + r64[None, :], codes_t,
             mask=(c < cols)[:, None] & (r < out_rows)[None, :])       # [128, 128] of q_t


# Workaround for Triton's interpreter (triton/runtime/interpreter.py, `_convert_float`,
# Triton 3.9.0): its float32 -> float8e4nv cast rounds ties away from zero and truncates
# E4M3 subnormals, and its bf16 -> float32 cast gets subnormals wrong; the GPU's
# conversions are exact (widening) and round to nearest even, as torch's. Interpreted, the
# kernel converts in integer arithmetic instead. tests/plugins/common/test_triton_quantize.py fails
# once the interpreter's casts are right.
_SOFTWARE_CASTS = isinstance(_quantize_tiles, InterpretedFunction)


def available(device: torch.device | None = None) -> str | None:
    """None when the kernel can run on `device` (default: the current CUDA device), else
    why not."""
    if _SOFTWARE_CASTS:  # interpreted: runs anywhere
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (TRITON_INTERPRET=1 runs it on the CPU, for tests)"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return "E4M3 conversions need sm89 or newer"
    return None


def _launch(x: torch.Tensor, block: tuple[int, int], power_of_two_scales: bool,
            transpose: bool, software_casts: bool = _SOFTWARE_CASTS, out_rows: int | None = None,
            src_scales: torch.Tensor | None = None):
    """q and scales of x (zero rows appended up to out_rows), x^T's with transpose; x FP8
    in 1x128 tiles with src_scales given."""
    rows, cols = x.shape
    out_rows = rows if out_rows is None else out_rows
    r, c = block
    block_r, block_c, num_warps = LAUNCH[block]
    q = torch.empty((cols, out_rows) if transpose else (out_rows, cols),
                    dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((cols // c, out_rows // r) if transpose else (out_rows // r, cols // c),
                         dtype=torch.float32, device=x.device)
    if q.numel() == 0:
        return q, scales
    from_fp8 = src_scales is not None
    grid = (triton.cdiv(out_rows, block_r) * triton.cdiv(cols, block_c),)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _quantize_tiles[grid](  # on x's device, which need not be the current one
            x.view(torch.uint8) if from_fp8 else x, q.view(torch.uint8), scales,
            src_scales if from_fp8 else scales, rows, cols, out_rows, x.stride(0), x.stride(1),
            TILE_R=r, TILE_C=c, BLOCK_R=block_r, BLOCK_C=block_c,
            POWER_OF_TWO=power_of_two_scales, TRANSPOSE=transpose, FROM_FP8=from_fp8,
            SOFTWARE_CASTS=software_casts, num_warps=num_warps,
            enable_fp_fusion=False)  # nothing to fuse; fixed so Triton's default can't matter
    return q, scales


def quantize(x: torch.Tensor, block: tuple[int, int], *, power_of_two_scales: bool = False,
             check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`plugins.common.quantize.quantize` on the kernel: same arguments, same errors, same
    result bit for bit; for blocks (1, 128), (128, 128) and (128, 1)."""
    r, c = check_input(x, block, "quantize")
    if (r, c) not in BLOCKS:
        raise ValueError(f"triton quantize: block {(r, c)} is not one of {BLOCKS}; "
                         f"plugins.common.quantize.quantize takes any block")
    q, scales = _launch(x, (r, c), power_of_two_scales, transpose=False)
    if check_finite:
        raise_if_non_finite(scales, (r, c), "quantize: x")
    return q, scales


def quantize_transposed(x: torch.Tensor, *, power_of_two_scales: bool = False,
                        check_finite: bool = True, pad_rows: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """`plugins.common.quantize.quantize_transposed` on the kernel: x^T in 1x128 tiles
    (128 rows of x per scale, zero rows appended with pad_rows), from one read of x."""
    check_input(x, (1, 1), "quantize_transposed")
    out_rows = transposed_rows(x, pad_rows, "quantize_transposed")
    q, scales = _launch(x, (128, 1), power_of_two_scales, transpose=True, out_rows=out_rows)
    if check_finite:
        raise_if_non_finite(scales, (1, 128), "quantize_transposed: x^T")
    return q, scales


def quantize_blocks_transposed(x: torch.Tensor, *, power_of_two_scales: bool = False,
                               check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`plugins.common.quantize.quantize_blocks_transposed` on the kernel: x^T in 128x128
    blocks (x's rows zero-padded to whole blocks), from one read of x."""
    check_input(x, (1, 128), "quantize_blocks_transposed")
    out_rows = x.shape[0] + -x.shape[0] % 128
    q, scales = _launch(x, (128, 128), power_of_two_scales, transpose=True, out_rows=out_rows)
    if check_finite:
        raise_if_non_finite(scales, (128, 128), "quantize_blocks_transposed: x^T")
    return q, scales


def requantize_transposed(q: torch.Tensor, scales: torch.Tensor, *,
                          power_of_two_scales: bool = False, pad_rows: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """`plugins.common.quantize.requantize_transposed` on the kernel: x held in FP8 1x128
    tiles -> x^T in 1x128 tiles, reading the FP8 bytes and scales once."""
    if q.dtype != torch.float8_e4m3fn or q.dim() != 2:
        raise TypeError(f"requantize_transposed: q must be 2-D torch.float8_e4m3fn; got "
                        f"{q.dtype} of shape {tuple(q.shape)}")
    check_block(q.shape, (1, 128), "requantize_transposed")
    if scales.dtype != torch.float32 or tuple(scales.shape) != (q.shape[0], q.shape[1] // 128):
        raise ValueError(f"requantize_transposed: scales must be float32 of shape "
                         f"{(q.shape[0], q.shape[1] // 128)}; got {scales.dtype} of shape "
                         f"{tuple(scales.shape)}")
    out_rows = transposed_rows(q, pad_rows, "requantize_transposed")
    return _launch(q, (128, 1), power_of_two_scales, transpose=True, out_rows=out_rows,
                   src_scales=scales.contiguous())


def _launch_with_transposed(x: torch.Tensor, square: bool, power_of_two_scales: bool,
                            pad_cols: bool = False, software_casts: bool = _SOFTWARE_CASTS):
    """((q, scales), (q_t, scales_t)) of x by `_quantize_with_transposed`: 128x128 blocks
    with square, else 1x128 tiles with their scales outer-dim-major."""
    rows, cols = x.shape
    out_rows = rows + -rows % 128  # x^T's columns: tokens (or a weight's rows) padded
    device = x.device
    if square:
        q_rows, q_cols = out_rows, cols
        scales = torch.empty(out_rows // 128, cols // 128, device=device)
        scales_t = torch.empty(cols // 128, out_rows // 128, device=device)
    else:
        q_rows, q_cols = rows, cols + (-cols % 128 if pad_cols else 0)
        # Outer-dim-major: [k / 128, rows] in memory, seen as [rows, k / 128].
        scales = torch.empty(q_cols // 128, rows, device=device).t()
        scales_t = torch.empty(out_rows // 128, cols, device=device).t()
    q = torch.empty(q_rows, q_cols, dtype=torch.float8_e4m3fn, device=device)
    q_t = torch.empty(cols, out_rows, dtype=torch.float8_e4m3fn, device=device)
    if x.numel() == 0:  # then every output is empty too: nothing to launch
        return (q, scales), (q_t, scales_t)
    grid = (triton.cdiv(out_rows, 128) * triton.cdiv(q_cols, 128),)
    with torch.cuda.device(device) if x.is_cuda else contextlib.nullcontext():
        _quantize_with_transposed[grid](  # on x's device, which need not be the current one
            x, q.view(torch.uint8), scales, q_t.view(torch.uint8), scales_t,
            rows, cols, q_rows, q_cols, out_rows, x.stride(0), x.stride(1),
            scales.stride(0), scales.stride(1), scales_t.stride(0), scales_t.stride(1),
            SQUARE=square, POWER_OF_TWO=power_of_two_scales, SOFTWARE_CASTS=software_casts,
            num_warps=8, enable_fp_fusion=False)
    return (q, scales), (q_t, scales_t)


def quantize_with_transposed(x: torch.Tensor, *, power_of_two_scales: bool = False,
                             check_finite: bool = True, pad_cols: bool = False):
    """`plugins.common.quantize.quantize_with_transposed` on the kernel: x and x^T in 1x128
    tiles (x^T's rows, x's tokens, zero-padded), scales outer-dim-major, one read of x."""
    check_input(x, (1, 1) if pad_cols else (1, 128), "quantize_with_transposed")
    rowwise, transposed = _launch_with_transposed(x, False, power_of_two_scales, pad_cols)
    if check_finite:
        raise_if_non_finite(rowwise[1], (1, 128), "quantize_with_transposed: x")
    return rowwise, transposed


def quantize_blocks_with_transposed(x: torch.Tensor, *, power_of_two_scales: bool = False,
                                    check_finite: bool = True):
    """`plugins.common.quantize.quantize_blocks_with_transposed` on the kernel: x and x^T
    in 128x128 blocks (x's rows zero-padded), one read of x."""
    check_input(x, (1, 128), "quantize_blocks_with_transposed")
    blocks, transposed = _launch_with_transposed(x, True, power_of_two_scales)
    if check_finite:
        raise_if_non_finite(blocks[1], (128, 128), "quantize_blocks_with_transposed: x")
    return blocks, transposed
