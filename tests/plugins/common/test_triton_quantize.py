"""The one-pass Triton quantizer (plugins.common.triton_quantize), run by Triton's interpreter
on the CPU, against plugins.common.quantize.quantize: the same codes and the same scales,
bit for bit, and the same errors.

The inputs are random over ~8 decades plus tiles where the last bit decides: all zeros,
subnormal inputs (for float32 and bf16 with the scale on its 2^-126 floor), values on the
midpoints between E4M3 neighbours (ties) and the input dtype's neighbours of those, and an
amax whose amax / scale rounds above 448 (the clamp). Shapes include ragged ones (rows or
cols not a multiple of the program's chunk) and non-contiguous inputs.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import types

import pytest
import torch

from plugins.common import quantize as torch_ops
from plugins.common.quantize import (pad_to_tiles, quantize, quantize_blocks_transposed,
                                     quantize_transposed, requantize_transposed)
from tests.helpers import paths
from tests.helpers.multirank import run_ranks

pytest.importorskip("triton")

# (name, block or kind, shape of x). Kinds: "transposed" is quantize_transposed(x);
# "padded" the same with pad_rows (ragged rows); "requantized" is
# requantize_transposed(*quantize(x, (1, 128)), pad_rows=True): from x in FP8;
# "blocks transposed" is quantize_blocks_transposed(x): x^T in 128x128 blocks (Dgrad's W^T).
CASES = [
    ("1x128 one tile", (1, 128), (1, 128)),
    ("1x128 ragged rows", (1, 128), (37, 256)),
    ("1x128", (1, 128), (130, 384)),
    ("128x128 one tile", (128, 128), (128, 128)),
    ("128x128", (128, 128), (256, 384)),
    ("128x1 ragged cols", (128, 1), (256, 200)),
    ("128x1", (128, 1), (128, 97)),
    ("transposed ragged", "transposed", (128, 70)),
    ("transposed", "transposed", (256, 384)),
]
# Column-major x (stride (1, rows)); the name says so.
CASES += [("1x128 strided", (1, 128), (64, 256)), ("128x128 strided", (128, 128), (128, 256)),
          ("transposed strided", "transposed", (256, 64))]
CASES += [("padded", "padded", (200, 70)), ("padded whole", "padded", (256, 64)),
          ("requantized", "requantized", (200, 256)), ("requantized whole", "requantized", (128, 384))]
CASES += [("blocks transposed", "blocks transposed", (256, 384)),
          ("blocks transposed ragged", "blocks transposed", (200, 256)),
          ("blocks transposed strided", "blocks transposed", (128, 256))]
TRANSPOSED = ("transposed", "padded", "requantized")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RUNS = list(itertools.product(CASES, DTYPES, (False, True)))  # (case, dtype, power_of_two)
RUN_IDS = [f"{name}-{str(dtype)[6:]}{'-pow2' if p2 else ''}" for (name, _, _), dtype, p2 in RUNS]


def e4m3_values() -> torch.Tensor:
    return torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448


def ties(dtype) -> torch.Tensor:
    """Midpoints between neighbouring E4M3 values (exact in every input dtype) and the next
    value of dtype either side, both signs; quantized with scale 1 or 3 they test rounding."""
    v = e4m3_values()
    mid = ((v[:-1] + v[1:]) / 2).to(dtype)
    up = torch.nextafter(mid, torch.full_like(mid, 1000))
    down = torch.nextafter(mid, torch.zeros_like(mid))
    both = torch.cat([mid, up, down])
    return torch.cat([both, -both])


def clamped_amax(dtype) -> float:
    """An amax a of dtype for which a / (a / 448) > 448 in float32: quantize's clamp acts."""
    a = torch.arange(256, 512, 2.0 ** -6).to(dtype).unique().float()
    return a[a / (a / 448) > 448][0].item()


def special_tiles(n: int, dtype) -> list[torch.Tensor]:
    """Tiles of n values where the last bit decides, as float32."""
    g = torch.Generator().manual_seed(1)
    t = ties(dtype).float()
    tiny = 1e-39 if dtype != torch.float16 else 1e-6  # subnormal in dtype
    tiles = [torch.zeros(n), tiny * torch.randn(n, generator=g)]
    for scale in (1.0, 3.0):  # amax 448 * scale; with scale 3 the division is not trivial
        for start in range(0, len(t), n - 1):
            chunk = t[start:start + n - 1]
            chunk = chunk.repeat(-(-(n - 1) // len(chunk)))[:n - 1]  # the last one, repeated
            tiles.append(torch.cat([torch.tensor([448.0]), chunk]) * scale)
    a = clamped_amax(dtype)
    tiles.append(torch.cat([torch.tensor([a]), (torch.rand(n - 1, generator=g) * 2 - 1) * a]))
    return tiles


def make_input(block, shape, dtype, seed=0) -> torch.Tensor:
    """Random values over ~8 decades, with the special tiles from tile 1 on."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    x = torch.randn(shape, generator=g) * torch.exp(3 * torch.randn(shape, generator=g))
    x = x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    r, c = block
    per_row = cols // c
    for t, values in enumerate(special_tiles(r * c, dtype), start=1):
        i, j = divmod(t, per_row)
        if i < rows // r:
            x[i * r:(i + 1) * r, j * c:(j + 1) * c] = values.reshape(r, c)
    return x.to(dtype)


def case_input(name, block, shape, dtype) -> torch.Tensor:
    if block in TRANSPOSED:  # the special tiles are x^T's 1x128 tiles
        x = make_input((1, 128), shape[::-1], dtype).t().contiguous()  # [rows, cols]
    elif block == "blocks transposed":  # x's 128x128 blocks are x^T's, transposed
        x = make_input((128, 128), shape, dtype)
    else:
        x = make_input(block, shape, dtype)
    return x.t().contiguous().t() if "strided" in name else x  # same values, column-major


def quantize_both(tq, x, block, power_of_two):
    """(the kernel's (q, scales), the reference's) for x in a case."""
    p2 = dict(power_of_two_scales=power_of_two)
    if block == "transposed":
        return (tq.quantize_transposed(x, **p2),
                quantize(x.t().contiguous().cpu(), (1, 128), **p2))
    if block == "padded":
        x_pad = torch.cat([x.cpu(), x.new_zeros(-x.shape[0] % 128, x.shape[1]).cpu()])
        return (tq.quantize_transposed(x, pad_rows=True, **p2),
                quantize(x_pad.t().contiguous(), (1, 128), **p2))
    if block == "blocks transposed":  # the reference: W^T built, padded and quantized
        return (tq.quantize_blocks_transposed(x, **p2),
                quantize(pad_to_tiles(x.cpu(), rows=128).t().contiguous(), (128, 128), **p2))
    if block == "requantized":  # the reference: plugins.common.quantize's torch ops
        cache = quantize(x.cpu(), (1, 128), **p2)
        return (tq.requantize_transposed(*(t.to(x.device) for t in cache), pad_rows=True, **p2),
                requantize_transposed(*cache, pad_rows=True, **p2))
    return (tq.quantize(x, block, power_of_two_scales=power_of_two),
            quantize(x.cpu(), block, power_of_two_scales=power_of_two))


# The fused quantizers: x and x^T from one read of x. (name, kind, shape of x). Kinds:
# "rows" quantize_with_transposed(x) with the special tiles along x's rows, "cols" the same
# with them along x's columns (x^T's tiles), "padded" with pad_cols (a ragged `out`), "blocks"
# quantize_blocks_with_transposed(x) (a weight as W and W^T).
FUSED_CASES = [
    ("with transposed", "rows", (256, 256)),
    ("with transposed ragged", "rows", (200, 256)),
    ("with transposed one token", "rows", (1, 128)),
    ("with transposed strided", "rows", (128, 256)),
    ("with transposed cols", "cols", (256, 384)),
    ("with transposed cols ragged", "cols", (130, 256)),
    ("with transposed padded", "padded", (130, 200)),
    ("blocks with transposed", "blocks", (256, 384)),
    ("blocks with transposed ragged", "blocks", (200, 256)),
    ("blocks with transposed strided", "blocks", (128, 256)),
]
FUSED_RUNS = list(itertools.product(FUSED_CASES, DTYPES, (False, True)))
FUSED_IDS = [f"{name}-{str(dtype)[6:]}{'-pow2' if p2 else ''}"
             for (name, _, _), dtype, p2 in FUSED_RUNS]


def fused_input(name, kind, shape, dtype) -> torch.Tensor:
    if kind == "cols":  # the special tiles are x^T's 1x128 tiles
        x = make_input((1, 128), shape[::-1], dtype).t().contiguous()
    else:
        x = make_input((128, 128) if kind == "blocks" else (1, 128), shape, dtype)
    return x.t().contiguous().t() if "strided" in name else x


def fused(quantizer, x, kind, **kw):
    """quantizer's ((q, scales), (q_t, scales_t)) for a fused case (quantizer: the kernel's
    module or plugins.common.quantize)."""
    if kind == "blocks":
        return quantizer.quantize_blocks_with_transposed(x, **kw)
    return quantizer.quantize_with_transposed(x, pad_cols=kind == "padded", **kw)


def fused_formula(x, kind, power_of_two):
    """What the fused quantizers must give, from `quantize` on explicitly padded and
    transposed copies of x (on the CPU)."""
    p2 = dict(power_of_two_scales=power_of_two)
    x = x.cpu()
    if kind == "blocks":
        padded = pad_to_tiles(x, rows=128)
        return (quantize(padded, (128, 128), **p2),
                quantize(padded.t().contiguous(), (128, 128), **p2))
    return (quantize(pad_to_tiles(x, cols=128), (1, 128), **p2),
            quantize(pad_to_tiles(x, rows=128).t().contiguous(), (1, 128), **p2))


def gemm_ready(scales, block) -> bool:
    """Whether scales are laid out as torch._scaled_mm reads them (ScaledBlas.cpp's
    check_size_stride: a dim of size 1 may have any stride): 1x128 outer-dim-major
    (stride (1, rows)), 128x128 row-major."""
    rows, k = scales.shape
    want = (1, rows) if block == (1, 128) else (k, 1)
    return all(size <= 1 or stride == w for size, stride, w in zip(scales.shape,
                                                                     scales.stride(), want))


def fused_verdict(got, want) -> str:
    """'ok' when got's four tensors are want's, bit for bit, else what differs."""
    for (q, scales), (q_ref, scales_ref), what in zip(got, want, ("x", "x^T")):
        if q.shape != q_ref.shape or scales.shape != scales_ref.shape:
            return f"{what}: shapes {tuple(q.shape)}, {tuple(scales.shape)}"
        differ = (bits(q).cpu() != bits(q_ref).cpu()).sum().item()
        same_scales = torch.equal(scales.cpu(), scales_ref.cpu())
        if differ or not same_scales:
            return f"{what}: {differ} codes differ, scales {'equal' if same_scales else 'differ'}"
    return "ok"


def bits(q):
    return q.view(torch.uint8)


def with_bad_values(block, bad):
    """x with `bad` in two tiles, and the reference's error message."""
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(3))
    x[130, 5] = bad
    x[3, 200] = bad
    with pytest.raises(ValueError) as want:
        quantize_transposed(x) if block == "transposed" else quantize(x, block)
    return x, str(want.value)


def unchecked(quantizer, x, block):
    """check_finite=False: (q, scales) with no error."""
    if block == "transposed":
        return quantizer.quantize_transposed(x, check_finite=False)
    return quantizer.quantize(x, block, check_finite=False)


def interpreted_checks(rank: int, world_size: int) -> dict:
    """Everything that runs the kernel, in one process with TRITON_INTERPRET=1."""
    from plugins.common import triton_quantize as tq

    qz = types.SimpleNamespace(quantize=quantize, quantize_transposed=quantize_transposed)
    out = {"software_casts": tq._SOFTWARE_CASTS, "identical": {}, "errors": [],
           "unchecked_scales": []}
    for (name, block, shape), dtype, p2 in RUNS:
        got, want = quantize_both(tq, case_input(name, block, shape, dtype), block, p2)
        differ = (bits(got[0]) != bits(want[0])).sum().item()
        same_scales = torch.equal(got[1], want[1])
        out["identical"][(name, dtype, p2)] = (
            "ok" if differ == 0 and same_scales else
            f"{differ} codes differ, scales {'equal' if same_scales else 'differ'}")

    for block in [(1, 128), (128, 128), (128, 1), "transposed"]:
        for bad in (float("inf"), float("-inf"), float("nan")):
            x, want = with_bad_values(block, bad)
            try:
                if block == "transposed":
                    tq.quantize_transposed(x)
                else:
                    tq.quantize(x, block)
                got = "no error"
            except ValueError as e:
                got = str(e)
            out["errors"].append((block, bad, got, want))
            got_scales = unchecked(tq, x, block)[1]
            out["unchecked_scales"].append(torch.equal(got_scales, unchecked(qz, x, block)[1])
                                           and int(torch.isinf(got_scales).sum()) == 2)

    out["fused"], out["fused_layout"] = {}, {}
    for (name, kind, shape), dtype, p2 in FUSED_RUNS:
        x = fused_input(name, kind, shape, dtype)
        got = fused(tq, x, kind, power_of_two_scales=p2)
        torch_result = fused(torch_ops, x, kind, power_of_two_scales=p2)
        verdicts = (fused_verdict(got, fused_formula(x, kind, p2)),
                    fused_verdict(torch_result, fused_formula(x, kind, p2)))
        out["fused"][(name, dtype, p2)] = verdicts
        block = (128, 128) if kind == "blocks" else (1, 128)
        out["fused_layout"][(name, dtype, p2)] = [
            gemm_ready(scales, block) for result in (got, torch_result) for _, scales in result]
    out["fused_errors"], out["fused_unchecked_infs"] = [], []
    for kind in ("rows", "blocks"):
        for bad in (float("inf"), float("-inf"), float("nan")):
            x, _ = with_bad_values((1, 128), bad)
            messages = []
            for quantizer in (tq, torch_ops):
                try:
                    fused(quantizer, x, kind)
                    messages.append("no error")
                except ValueError as e:
                    messages.append(str(e))
            out["fused_errors"].append((kind, bad, *messages))
            got = fused(tq, x, kind, check_finite=False)
            want = fused(torch_ops, x, kind, check_finite=False)
            out["fused_unchecked_infs"].append(
                [int(torch.isinf(s).sum()) for _, s in got]
                if all(torch.equal(s, s_ref) for (_, s), (_, s_ref) in zip(got, want))
                else "scales differ")

    # The interpreter's own casts (the workaround's reasons to exist): float32 -> E4M3 on
    # ties, bf16 -> float32 on subnormals (x / 2^-126 lands in E4M3's normal range).
    x = torch.cat([torch.tensor([448.0]), ties(torch.float32)[:127]]).reshape(1, 128)
    y = (torch.arange(1, 129) * 2.0 ** -133).to(torch.bfloat16).reshape(1, 128)  # [1, 128]
    for name, t in (("e4m3", x), ("bf16", y)):
        q, _ = tq._launch(t, (1, 128), False, transpose=False, software_casts=False)
        differ = bits(q) != bits(quantize(t, (1, 128))[0])
        out[f"interpreter_{name}_cast_differs"] = differ.sum().item()
    return out


@pytest.fixture(scope="module")
def interpreted():
    with pytest.MonkeyPatch.context() as mp:
        # The interpreter is chosen when the kernel is defined: set it for the spawned process.
        mp.setenv("TRITON_INTERPRET", "1")
        return run_ranks(interpreted_checks, 1, timeout=600)[0]


def test_the_inputs_hold_the_special_tiles():
    x = make_input((1, 128), (37, 256), torch.float32)
    scales = quantize(x, (1, 128))[1]
    assert scales.flatten()[1] == 2.0 ** -126  # all zeros
    assert scales.flatten()[2] == 2.0 ** -126  # tiny: amax / 448 below the floor
    # ties: 756 values, 6 tiles at scale 1 and 6 at scale 3, then the clamp's tile
    assert scales.flatten()[3] == 1.0 and scales.flatten()[9] == 3.0
    a = torch.tensor(clamped_amax(torch.bfloat16))  # float32
    assert a.to(torch.bfloat16) == a and a / (a / 448) > 448


def test_runs_interpreted(interpreted):
    assert interpreted["software_casts"]


@pytest.mark.parametrize("case,dtype,power_of_two", RUNS, ids=RUN_IDS)
def test_bit_identical_to_quantize(interpreted, case, dtype, power_of_two):
    assert interpreted["identical"][(case[0], dtype, power_of_two)] == "ok"


def test_non_finite_raises_like_quantize(interpreted):
    assert len(interpreted["errors"]) == 12
    for block, bad, got, want in interpreted["errors"]:
        assert got == want, (block, bad)
        assert "2 of" in got  # both bad tiles counted, the first one named


def test_unchecked_bad_tiles_get_scale_inf_like_quantize(interpreted):
    assert interpreted["unchecked_scales"] == [True] * 12


@pytest.mark.parametrize("case,dtype,power_of_two", FUSED_RUNS, ids=FUSED_IDS)
def test_fused_bit_identical_to_quantize(interpreted, case, dtype, power_of_two):
    """x and x^T from one read: the kernel's four tensors, and plugins.common.quantize's,
    are `quantize`'s of x padded and of x^T padded, bit for bit."""
    assert interpreted["fused"][(case[0], dtype, power_of_two)] == ("ok", "ok")


@pytest.mark.parametrize("case,dtype,power_of_two", FUSED_RUNS, ids=FUSED_IDS)
def test_fused_scales_come_in_the_gemms_layout(interpreted, case, dtype, power_of_two):
    assert interpreted["fused_layout"][(case[0], dtype, power_of_two)] == [True] * 4


def test_fused_non_finite_raises_like_the_torch_ops(interpreted):
    assert len(interpreted["fused_errors"]) == 6
    for kind, bad, got, want in interpreted["fused_errors"]:
        assert got == want, (kind, bad)
        first = "row tile 3, col tile 1" if kind == "rows" else "row tile 0, col tile 1"
        assert "non-finite" in got and "2 of" in got and first in got
    # check_finite=False: the two bad tiles' scales are inf, in x's and in x^T's tiles.
    assert interpreted["fused_unchecked_infs"] == [[2, 2]] * 6


def test_interpreter_cast_still_needs_the_workaround(interpreted):
    # Fails once Triton's interpreter casts float32 -> float8e4nv to nearest even and
    # bf16 subnormals -> float32 exactly: then drop `_SOFTWARE_CASTS` and what it selects
    # from plugins/common/triton_quantize.py.
    assert interpreted["interpreter_e4m3_cast_differs"] > 0
    assert interpreted["interpreter_bf16_cast_differs"] > 0


@pytest.mark.parametrize("block,shape", [((128, 128), (100, 256)), ((1, 128), (256, 200)),
                                         ((128, 1), (64, 256))])
def test_indivisible_shape_raises_like_quantize_before_launching(block, shape):
    from plugins.common import triton_quantize as tq

    x = torch.randn(shape)
    with pytest.raises(ValueError) as want:
        quantize(x, block)
    with pytest.raises(ValueError) as got:
        tq.quantize(x, block)
    assert str(got.value) == str(want.value)
    assert "not divisible" in str(got.value)


def test_input_checks_like_quantize():
    from plugins.common import triton_quantize as tq

    with pytest.raises(TypeError, match="quantize: x has dtype torch.float64"):
        tq.quantize(torch.zeros(128, 128, dtype=torch.float64), (1, 128))
    with pytest.raises(ValueError, match="quantize: x must be 2-D"):
        tq.quantize(torch.zeros(128), (1, 128))
    with pytest.raises(ValueError, match=r"block \(64, 64\) is not one of"):
        tq.quantize(torch.zeros(128, 128), (64, 64))
    with pytest.raises(ValueError, match=r"quantize_transposed: rows = 100.*\(128, 1\)"):
        tq.quantize_transposed(torch.zeros(100, 256))
    q, scales = tq.quantize(torch.zeros(0, 256), (1, 128))  # nothing to launch
    assert q.shape == (0, 256) and scales.shape == (0, 2)
    q, scales = tq.quantize_transposed(torch.zeros(128, 0))
    assert q.shape == (0, 128) and scales.shape == (0, 1)


def test_cpu_quantize_does_not_touch_triton():
    """On the CPU, quantize runs (and gives its usual result) with Triton unimportable,
    and never imports the kernel's module."""
    script = """if True:
        import sys
        import torch
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        from plugins.common.quantize import (pad_to_tiles, quantize, quantize_blocks_transposed,
                                     quantize_transposed, requantize_transposed)
        x = torch.randn(256, 256)
        for block in [(1, 128), (128, 128), (128, 1)]:
            q, s = quantize(x, block)
            assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        from plugins.common.quantize import (quantize_blocks_with_transposed,
                                             quantize_with_transposed)
        for fused in (quantize_with_transposed, quantize_blocks_with_transposed):
            (q, s), (q_t, s_t) = fused(x)
            assert q.shape == q_t.shape == x.shape and q_t.dtype == torch.float8_e4m3fn
        assert "plugins.common.triton_quantize" not in sys.modules
        print("ok")
    """
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=paths.REPO, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


def test_compiles_for_sm90():
    """No GPU needed: Triton compiles the kernel for sm90 down to a cubin (the float8
    conversions and stores included), with the instructions bit-identity rests on."""
    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from plugins.common import triton_quantize as tq

    if tq._SOFTWARE_CASTS:
        pytest.skip("TRITON_INTERPRET=1 in this process")
    if "nvidia" not in backends:
        pytest.skip("this Triton has no NVIDIA backend")
    launches = [((1, 128), False, False), ((128, 128), False, False), ((128, 1), True, False),
                ((128, 1), True, True), ((128, 128), True, False)]  # (block, transpose, from FP8)
    for block, transpose, from_fp8 in launches:
        for p2 in (False, True):
            block_r, block_c, num_warps = tq.LAUNCH[block]
            constants = dict(stride_c=1, TILE_R=block[0], TILE_C=block[1], BLOCK_R=block_r,
                             BLOCK_C=block_c, POWER_OF_TWO=p2, TRANSPOSE=transpose,
                             FROM_FP8=from_fp8, SOFTWARE_CASTS=False)
            signature = {"x": "*u8" if from_fp8 else "*bf16", "q": "*u8", "scales": "*fp32",
                         "src_scales": "*fp32", "rows": "i32", "cols": "i32",
                         "out_rows": "i32", "stride_r": "i32",
                         **dict.fromkeys(constants, "constexpr")}
            aligned = {(i,): [["tt.divisibility", 16]] for i in range(8)}  # as a launch would
            kernel = triton.compile(ASTSource(tq._quantize_tiles, signature, constants, aligned),
                                    target=GPUTarget("cuda", 90, 32),
                                    options=dict(num_warps=num_warps, enable_fp_fusion=False))
            ptx = kernel.asm["ptx"]
            assert kernel.asm["cubin"]
            assert "cvt.rn.satfinite.e4m3x2.f32" in ptx  # round to nearest even, as torch
            assert "div.rn.f32" in ptx  # IEEE division (scales; values unless power of two)
            assert "div.full" not in ptx and "div.approx" not in ptx
            assert ".ftz" not in ptx  # subnormal inputs (tiny tiles) are not flushed
            assert "ld.global.v4" in ptx and "st.global.v4" in ptx  # 16-byte accesses


def test_fused_compiles_for_sm90():
    """As `test_compiles_for_sm90`, for the fused kernel (x and x^T from one read)."""
    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from plugins.common import triton_quantize as tq

    if tq._SOFTWARE_CASTS:
        pytest.skip("TRITON_INTERPRET=1 in this process")
    if "nvidia" not in backends:
        pytest.skip("this Triton has no NVIDIA backend")
    for square, p2 in itertools.product((False, True), (False, True)):
        constants = dict(stride_c=1, SQUARE=square, POWER_OF_TWO=p2, SOFTWARE_CASTS=False)
        ints = ("rows", "cols", "q_rows", "q_cols", "out_rows", "stride_r", "s_stride_r",
                "s_stride_c", "t_stride_r", "t_stride_c")
        signature = {"x": "*bf16", "q": "*u8", "scales": "*fp32", "q_t": "*u8",
                     "scales_t": "*fp32", **dict.fromkeys(ints, "i32"),
                     **dict.fromkeys(constants, "constexpr")}
        aligned = {(i,): [["tt.divisibility", 16]] for i in range(10)}
        kernel = triton.compile(
            ASTSource(tq._quantize_with_transposed, signature, constants, aligned),
            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, enable_fp_fusion=False))
        ptx = kernel.asm["ptx"]
        assert kernel.asm["cubin"]
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
        assert "div.rn.f32" in ptx
        assert "div.full" not in ptx and "div.approx" not in ptx
        assert ".ftz" not in ptx


def software_launch(tq, x, block, power_of_two):
    """The kernel's result for a case with the interpreter's integer conversions."""
    if block == "blocks transposed":
        return tq._launch(x, (128, 128), power_of_two, True, software_casts=True,
                          out_rows=x.shape[0] + -x.shape[0] % 128)
    if block not in TRANSPOSED:
        return tq._launch(x, block, power_of_two, False, software_casts=True)
    out_rows = x.shape[0] + (-x.shape[0] % 128 if block != "transposed" else 0)
    src_scales = None
    if block == "requantized":
        x, src_scales = (t.to(x.device) for t in quantize(x.cpu(), (1, 128),
                                                          power_of_two_scales=power_of_two))
    return tq._launch(x, (128, 1), power_of_two, True, software_casts=True, out_rows=out_rows,
                      src_scales=src_scales)


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype,power_of_two", RUNS, ids=RUN_IDS)
def test_cuda_matches_cpu(case, dtype, power_of_two, monkeypatch):
    """On a GPU, quantize goes through the kernel (hardware E4M3 conversion) and gives the
    CPU's torch result; so does the kernel's integer rounding (SOFTWARE_CASTS)."""
    from plugins.common import triton_quantize as tq

    if tq.available(torch.device("cuda")) is not None:
        pytest.skip(tq.available(torch.device("cuda")))
    name, block, shape = case
    x = case_input(name, block, shape, dtype).cuda()  # .cuda() keeps the strides
    got, want = quantize_both(tq, x, block, power_of_two)
    software = software_launch(tq, x, block, power_of_two)
    for q, scales in (got, software):
        assert torch.equal(bits(q).cpu(), bits(want[0]))
        assert torch.equal(scales.cpu(), want[1])
    if isinstance(block, tuple):  # and plugins.common.quantize.quantize launches the kernel
        launched = []
        monkeypatch.setattr(tq, "_launch", lambda *a, **k: launched.append(a) or software)
        quantize(x, block, power_of_two_scales=power_of_two)
        assert len(launched) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("block", [(1, 128), (128, 128), (128, 1), "transposed"])
def test_cuda_non_finite_raises_like_quantize(block):
    from plugins.common import triton_quantize as tq

    if tq.available(torch.device("cuda")) is not None:
        pytest.skip(tq.available(torch.device("cuda")))
    for bad in (float("inf"), float("-inf"), float("nan")):
        x, want = with_bad_values(block, bad)
        with pytest.raises(ValueError) as got:
            if block == "transposed":
                tq.quantize_transposed(x.cuda())
            else:
                quantize(x.cuda(), block)
        assert str(got.value) == want


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype,power_of_two", FUSED_RUNS, ids=FUSED_IDS)
def test_cuda_fused_matches_cpu(case, dtype, power_of_two, monkeypatch):
    """On a GPU, the fused quantizers go through the kernel (hardware E4M3 conversion), one
    launch each, and give the CPU's torch result in the GEMMs' scale layout; so does the
    kernel's integer rounding (SOFTWARE_CASTS)."""
    from plugins.common import triton_quantize as tq

    if tq.available(torch.device("cuda")) is not None:
        pytest.skip(tq.available(torch.device("cuda")))
    name, kind, shape = case
    x = fused_input(name, kind, shape, dtype).cuda()  # .cuda() keeps the strides
    want = fused_formula(x, kind, power_of_two)
    got = fused(torch_ops, x, kind, power_of_two_scales=power_of_two)
    software = tq._launch_with_transposed(x, kind == "blocks", power_of_two,
                                          pad_cols=kind == "padded", software_casts=True)
    block = (128, 128) if kind == "blocks" else (1, 128)
    for result in (got, software):
        assert fused_verdict(result, want) == "ok"
        assert all(gemm_ready(scales, block) for _, scales in result)
    launched = []
    monkeypatch.setattr(tq, "_launch_with_transposed",
                        lambda *a, **k: launched.append(a) or software)
    fused(torch_ops, x, kind, power_of_two_scales=power_of_two)
    assert len(launched) == 1
