"""Tile-wise E4M3 quantization (plugins.common.quantize).

The round-trip bound tested, per element with s the element's tile scale:
    |dequantize(quantize(x)) - x| <= max(2^-4 * |x|, 2^-10 * s) * (1 + 2^-20)
half an E4M3 ulp: 3 mantissa bits give relative 2^-4 in the normal range, and below it
(|x| / s < 2^-6) the subnormal spacing 2^-9 gives absolute 2^-10 * s. The 2^-20 slack
covers the float32 roundings of x / s and q * s (each <= 2^-24 relative).
"""

import pytest
import torch

from plugins.common.quantize import (
    E4M3_MAX,
    dequantize,
    quantize,
    quantize_transposed,
    raise_if_non_finite,
    requantize_transposed,
)

BLOCKS = [(1, 128), (128, 128), (128, 1)]


def spread(rows, cols, seed=0, dtype=torch.float32):
    """Values over ~8 decades, so tiles hold both normal and subnormal E4M3 values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp(3 * torch.randn(rows, cols, generator=g))
    return x.to(dtype)


def per_element(scales, block):
    r, c = block
    return scales.repeat_interleave(r, dim=0).repeat_interleave(c, dim=1)  # [rows, cols]


def bits(q):
    return q.view(torch.uint8)


def test_e4m3_max():
    assert E4M3_MAX == torch.finfo(torch.float8_e4m3fn).max == 448.0


@pytest.mark.parametrize("power_of_two", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", BLOCKS)
def test_round_trip_bound(block, dtype, power_of_two):
    x = spread(256, 256, dtype=dtype)
    if dtype == torch.float16:
        x = x.clamp(-60000, 60000)
    q, scales = quantize(x, block, power_of_two_scales=power_of_two)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scales.dtype == torch.float32
    assert scales.shape == (256 // block[0], 256 // block[1])

    x32 = x.float()  # the bound is against the (exact) upcast input
    err = (dequantize(q, scales, block) - x32).abs()
    s = per_element(scales, block)
    bound = torch.maximum(2.0 ** -4 * x32.abs(), 2.0 ** -10 * s) * (1 + 2.0 ** -20)
    assert bool((err <= bound).all()), (err / bound).max()
    r, c = block
    tile_amax = x32.abs().reshape(256 // r, r, 256 // c, c).amax(dim=(1, 3))
    assert bool((err <= 2.0 ** -4 * per_element(tile_amax, block)).all())  # the looser form
    assert dequantize(q, scales, block, dtype=dtype).dtype == dtype


@pytest.mark.parametrize("block", BLOCKS)
def test_scale_is_tile_amax_over_448(block):
    x = spread(256, 256, seed=1)
    q, scales = quantize(x, block)
    r, c = block
    for i, j in [(0, 0), (1, 1), (scales.shape[0] - 1, scales.shape[1] - 1)]:
        tile = x[i * r:(i + 1) * r, j * c:(j + 1) * c]
        assert scales[i, j] == tile.abs().max() / 448
        # the tile's largest magnitude lands exactly on E4M3's largest value
        assert q[i * r:(i + 1) * r, j * c:(j + 1) * c].float().abs().max() == 448


@pytest.mark.parametrize("block", [(1, 128), (128, 128)])
def test_outlier_only_affects_its_own_tile(block):
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(2))
    q, scales = quantize(x, block)
    spiked = x.clone()
    spiked[0, 0] = 1e6
    q_spiked, scales_spiked = quantize(spiked, block)

    # Every other tile: bitwise the same codes and scales.
    others = torch.ones(scales.shape, dtype=torch.bool)
    others[0, 0] = False
    assert torch.equal(scales_spiked[others], scales[others])
    same = per_element(others, block)
    assert torch.equal(bits(q_spiked)[same], bits(q)[same])

    # The outlier's own tile pays: scale 1e6 / 448 flushes its O(1) values to (near) zero.
    assert scales_spiked[0, 0] == pytest.approx(1e6 / 448)
    r, c = block
    rest = torch.ones(r, c, dtype=torch.bool)
    rest[0, 0] = False

    def mean_relative_error(q, scales, x):
        err = (dequantize(q, scales, block) - x)[:r, :c][rest].abs()
        return (err / x[:r, :c][rest].abs()).mean()

    assert mean_relative_error(q, scales, x) < 0.05
    assert mean_relative_error(q_spiked, scales_spiked, spiked) > 0.5


@pytest.mark.parametrize("block", BLOCKS)
def test_power_of_two_scales(block):
    x = spread(256, 256, seed=3)
    x[:128, :128] *= 0
    x[0, :128] = 448 * 2.0 ** -5  # amax already scale * 448 with scale a power of two
    q, scales = quantize(x, block, power_of_two_scales=True)
    amax_scales = quantize(x, block)[1]
    mantissa, _ = torch.frexp(scales)
    assert bool((mantissa == 0.5).all())  # exact powers of two
    assert bool((scales >= amax_scales).all()) and bool((scales < 2 * amax_scales).all())
    assert scales[0, 0] == 2.0 ** -5
    assert bool((q.float().abs() <= 448).all()) and not bool(q.float().isnan().any())


@pytest.mark.parametrize("power_of_two", [False, True])
def test_zero_tiles(power_of_two):
    x = torch.randn(256, 256)
    x[128:, :128] = 0
    q, scales = quantize(x, (128, 128), power_of_two_scales=power_of_two)
    assert scales[1, 0] == 2.0 ** -126  # documented floor: float32's smallest normal
    assert bool((q[128:, :128].float() == 0).all())
    assert bool((dequantize(q, scales, (128, 128))[128:, :128] == 0).all())
    assert bool(torch.isfinite(scales).all()) and bool((scales > 0).all())

    q, scales = quantize(torch.zeros(128, 128, dtype=torch.bfloat16), (1, 128))
    assert bool((scales == 2.0 ** -126).all()) and bool((q.float() == 0).all())


def test_tiny_tile_with_underflowing_scale():
    # amax / 448 is below float32's normal range; the floor keeps the scale usable.
    x = torch.full((1, 128), 1e-40)
    q, scales = quantize(x, (1, 128))
    assert scales.item() == 2.0 ** -126
    err = (dequantize(q, scales, (1, 128)) - x).abs()
    assert bool((err <= 2.0 ** -10 * 2.0 ** -126).all())


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_raises_naming_the_tile(bad):
    x = torch.randn(256, 256)
    x[130, 5] = bad
    with pytest.raises(ValueError, match=r"non-finite.*row tile 1, col tile 0"):
        quantize(x, (128, 128))
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    x[3, 200] = bad
    with pytest.raises(ValueError, match=r"non-finite.*row tile 3, col tile 1"):
        quantize(x, (1, 128))


@pytest.mark.parametrize("power_of_two", [False, True])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_unchecked_non_finite_tiles_cannot_come_back_finite(bad, power_of_two):
    """check_finite=False (no host sync) leaves the check to the caller: a bad tile's scale
    is inf, so all of it dequantizes to inf or NaN, and the later check names it."""
    x = torch.randn(256, 256)
    x[130, 5] = bad
    q, scales = quantize(x, (128, 128), power_of_two_scales=power_of_two, check_finite=False)
    assert torch.isinf(scales[1, 0]) and bool(torch.isfinite(scales).sum() == 3)
    y = dequantize(q, scales, (128, 128))
    assert not bool(torch.isfinite(y[128:, :128]).any())
    torch.testing.assert_close(y[:128], dequantize(*quantize(x[:128], (128, 128),
                               power_of_two_scales=power_of_two), (128, 128)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^the thing has non-finite.*row tile 1, col tile 0"):
        raise_if_non_finite(scales, (128, 128), "the thing")


def test_transposed_tiles_with_padding_and_from_fp8():
    """Wgrad's operands: x^T in 1x128 tiles with a ragged token count zero-padded, from x
    itself or from x held in FP8 1x128 tiles (the layer's backward cache)."""
    x = spread(200, 256, seed=6)
    x_pad = torch.cat([x, torch.zeros(56, 256)])
    q, scales = quantize_transposed(x, pad_rows=True)
    q_ref, scales_ref = quantize(x_pad.t().contiguous(), (1, 128))
    assert q.shape == (256, 256) and torch.equal(bits(q), bits(q_ref))
    assert torch.equal(scales, scales_ref)

    cache = quantize(x, (1, 128))
    q, scales = requantize_transposed(*cache, pad_rows=True)
    q_ref, scales_ref = quantize(torch.cat([dequantize(*cache, (1, 128)), torch.zeros(56, 256)])
                                 .t().contiguous(), (1, 128))
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(scales, scales_ref)
    with pytest.raises(ValueError, match=r"rows = 200.*multiple of 128"):
        quantize_transposed(x)


def test_indivisible_dims_raise_naming_dim_and_block():
    with pytest.raises(ValueError, match=r"rows = 100.*\(128, 128\).*multiple of 128"):
        quantize(torch.randn(100, 256), (128, 128))
    with pytest.raises(ValueError, match=r"cols = 200.*\(1, 128\).*multiple of 128"):
        quantize(torch.randn(256, 200), (1, 128))
    with pytest.raises(ValueError, match=r"rows = 64.*\(128, 1\).*multiple of 128"):
        quantize(torch.randn(64, 256), (128, 1))
    with pytest.raises(ValueError, match="positive ints"):
        quantize(torch.randn(128, 128), (0, 128))
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(128), (1, 128))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.float8_e4m3fn])
def test_wrong_dtype_raises(dtype):
    with pytest.raises(TypeError, match=str(dtype)):
        quantize(torch.zeros(128, 128).to(dtype), (1, 128))


def test_dequantize_checks_its_inputs():
    q, scales = quantize(torch.randn(128, 256), (1, 128))
    with pytest.raises(ValueError, match=r"scales have shape \(128, 2\); expected \(1, 2\)"):
        dequantize(q, scales, (128, 128))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        dequantize(q.float(), scales, (1, 128))


@pytest.mark.parametrize("power_of_two", [False, True])
def test_token_tiles_are_the_transposed_channel_tiles(power_of_two):
    x = spread(256, 384, seed=4)
    q, scales = quantize(x, (128, 1), power_of_two_scales=power_of_two)
    q_t, scales_t = quantize(x.T.contiguous(), (1, 128), power_of_two_scales=power_of_two)
    assert torch.equal(bits(q), bits(q_t).T)
    assert torch.equal(scales, scales_t.T)


@pytest.mark.parametrize("power_of_two", [False, True])
@pytest.mark.parametrize("block", BLOCKS)
def test_requantizing_dequantized_values_is_idempotent(block, power_of_two):
    x = spread(256, 256, seed=5)
    q, scales = quantize(x, block, power_of_two_scales=power_of_two)
    y = dequantize(q, scales, block)
    q2, scales2 = quantize(y, block, power_of_two_scales=power_of_two)
    # Dequantized values are exactly representable, so they come back as they are. (The
    # codes may not: with power-of-two scales an amax that rounded down onto 448 * 2^k
    # halves the scale and doubles every code, with the same values.)
    if power_of_two:  # x / s and q * s are exact
        assert torch.equal(dequantize(q2, scales2, block), y)
    else:  # amax * 448 / 448 may move a scale by a float32 ulp, never a code
        assert torch.equal(bits(q2), bits(q))
        torch.testing.assert_close(scales2, scales, rtol=2.0 ** -22, atol=0)
        torch.testing.assert_close(dequantize(q2, scales2, block), y, rtol=2.0 ** -21, atol=0)


def test_square_blocks_of_the_transpose_are_the_transposed_blocks():
    """FP8Linear's Dgrad transposes the FP8 weight instead of quantizing W^T: the same
    bits, because a 128x128 block of W^T is a block of W transposed."""
    w = torch.randn(384, 256, generator=torch.Generator().manual_seed(3)) * 5
    q, scales = quantize(w, (128, 128))
    q_t, scales_t = quantize(w.t().contiguous(), (128, 128))
    assert torch.equal(q.t().contiguous().view(torch.uint8), q_t.view(torch.uint8))
    assert torch.equal(scales.t(), scales_t)


@pytest.mark.parametrize("power_of_two", [False, True])
def test_x_and_x_transposed_from_one_call(power_of_two):
    """quantize_with_transposed: Fprop's (or Dgrad's) 1x128 tiles and Wgrad's x^T tiles,
    both from x itself, the tokens padded for x^T and a ragged `out` (pad_cols) for x;
    the scales outer-dim-major (stride (1, rows)), the same values as `quantize`'s.
    quantize_blocks_with_transposed: a weight as W and W^T in 128x128 blocks."""
    from plugins.common.quantize import (pad_to_tiles, quantize_blocks_transposed,
                                         quantize_blocks_with_transposed,
                                         quantize_with_transposed)

    p2 = dict(power_of_two_scales=power_of_two)
    x = spread(200, 576, seed=7, dtype=torch.bfloat16)
    x[:, :128] = 0  # all-zero tiles both ways
    (q, scales), (q_t, scales_t) = quantize_with_transposed(x, pad_cols=True, **p2)
    q_ref, scales_ref = quantize(pad_to_tiles(x, cols=128), (1, 128), **p2)
    q_t_ref, scales_t_ref = quantize_transposed(x, pad_rows=True, **p2)
    assert q.shape == (200, 640) and q_t.shape == (576, 256)
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(scales, scales_ref)
    assert torch.equal(bits(q_t), bits(q_t_ref)) and torch.equal(scales_t, scales_t_ref)
    assert scales.stride() == (1, 200) and scales_t.stride() == (1, 576)
    assert bool((scales_t[:128] == 2.0 ** -126).all())

    weight = x[:, :512]  # 200 rows: the last block padded
    (w, w_scales), (w_t, w_t_scales) = quantize_blocks_with_transposed(weight, **p2)
    w_ref, w_scales_ref = quantize(pad_to_tiles(weight, rows=128), (128, 128), **p2)
    w_t_ref, w_t_scales_ref = quantize_blocks_transposed(weight, **p2)
    assert torch.equal(bits(w), bits(w_ref)) and torch.equal(w_scales, w_scales_ref)
    assert torch.equal(bits(w_t), bits(w_t_ref)) and torch.equal(w_t_scales, w_t_scales_ref)


def test_x_and_x_transposed_refuse_like_quantize():
    from plugins.common.quantize import quantize_blocks_with_transposed, quantize_with_transposed

    with pytest.raises(ValueError, match=r"cols = 200.*\(1, 128\)"):
        quantize_with_transposed(torch.randn(256, 200))  # a ragged `out` needs pad_cols
    x = torch.randn(256, 256)
    x[130, 5] = float("nan")
    with pytest.raises(ValueError, match=r"^quantize_with_transposed: x has non-finite.*"
                                         r"row tile 130"):
        quantize_with_transposed(x)
    with pytest.raises(ValueError, match=r"quantize_blocks_with_transposed: x has non-finite.*"
                                         r"row tile 1, col tile 0"):
        quantize_blocks_with_transposed(x)
    (_, scales), (_, scales_t) = quantize_with_transposed(x, check_finite=False)
    assert torch.isinf(scales[130, 0]) and torch.isinf(scales_t[5, 1])
    assert int(torch.isinf(scales).sum()) == int(torch.isinf(scales_t).sum()) == 1
