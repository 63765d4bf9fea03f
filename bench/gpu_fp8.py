"""gpu_fp8: block-scaled FP8 GEMMs, linears and quantization on a GPU (issue 4).

(a) GEMM      Fprop, Dgrad and Wgrad of a linear with weight [N, K] and M tokens, FP8
              operands quantized beforehand (not timed), for each FP8 implementation, side
              by side with BF16 torch.matmul (cuBLAS). Target: >= 1.7x BF16. Each FP8
              result is compared with the `emulated` backend on the same operands.
(b) linear    plugins.fp8.linear.fp8_linear forward + backward, quantization included,
              side by side with BF16 F.linear forward + backward. Target: >= 1.5x.
(c) quantize  plugins.common.quantize's quantizations of a linear (x, W, and Wgrad's dy^T and
              x^T, the latter re-tiled from the FP8 cache; and the fused ones fp8_linear
              calls: x or dy and their transposes from one read, W and W^T from one read)
              as achieved GB/s (bytes read + written) over a device-to-device copy's,
              measured in the same run.
              Target: >= 80%.

    Fprop   y  = x  @ W^T   A = x  [M, K] 1x128    B = W   [N, K] 128x128
    Dgrad   dx = dy @ W     A = dy [M, N] 1x128    B = W^T [K, N] 128x128
    Wgrad   dW = dy^T @ x   A = dy^T [N, M] 1x128  B = x^T [K, M] 1x128 (K = tokens)

`python -m bench gpu_fp8` on a GPU; `--smoke` runs tiny shapes on the CPU (only the
`emulated` backend can run there), so CI exercises the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from bench import device as dev
from bench import machine, timing
from bench.result import Result, Table

NAME = "gpu_fp8"
ACTIVATION, WEIGHT = (1, 128), (128, 128)
PASSES = ("Fprop", "Dgrad", "Wgrad")
GEMM_TARGET, LINEAR_TARGET, QUANTIZE_TARGET = 1.7, 1.5, 0.8
GRAPHED_CALLS = 20  # calls per CUDA graph where launch overhead is taken out

# FP8 implementations: the plugin's backends, and torch._scaled_mm called with the scale
# layouts of PyTorch's own tests, to tell a layout problem in the `torch` backend apart
# from what cuBLAS's block-scaled GEMM can do. With 128x128 B scales and k/128 not a
# multiple of 4 that layout is misread by cuBLAS (torch 2.11; the smoke shapes have such
# GEMMs): its error there is large by design, and the `torch` backend pads instead.
IMPLS = {
    "torch": "FP8 `torch` backend",
    "scaled_mm": "torch._scaled_mm, PyTorch's scale layout",
    "triton": "FP8 `triton` backend",
    "emulated": "FP8 `emulated` backend",
}


@dataclass(frozen=True)
class Setup:
    tokens: int  # M
    weights: tuple[tuple[int, int], ...]  # (N, K): each linear's weight [N, K]
    quantize: tuple[tuple[str, tuple[int, int], object], ...]  # label, shape, `_quantizer` kind
    copy_elements: int  # bf16 elements of the bandwidth probe's copy
    impls: tuple[str, ...]
    dtype: torch.dtype
    sets: int  # input sets rotated through, so repeated calls do not time the L2 cache
    warmup: int  # >= 1: a shape's first call autotunes the triton kernel (seconds)
    reps: int


# DeepSeek-V3's linear shapes (hidden 7168, expert ffn 2048, q_lora 1536, 128 heads x 192
# = 24576, dense ffn 18432, attention output 16384 = 128 x 128) at 4096 tokens.
FULL = Setup(
    tokens=4096,
    weights=((7168, 2048), (2048, 7168), (7168, 16384), (24576, 1536), (7168, 18432)),
    quantize=(("activation 1x128", (4096, 7168), ACTIVATION),
              ("weight 128x128", (7168, 2048), WEIGHT),
              ("Wgrad dy^T 1x128", (4096, 7168), "transposed"),
              ("Wgrad x^T from the FP8 cache", (4096, 7168), "requantized"),
              ("x and x^T 1x128, one read", (4096, 7168), "with transposed"),
              ("W and W^T 128x128, one read", (7168, 2048), "blocks with transposed")),
    copy_elements=2**29, impls=("torch", "scaled_mm", "triton"), dtype=torch.bfloat16,
    sets=3, warmup=5, reps=30)
SMOKE = Setup(
    tokens=256, weights=((256, 384), (384, 256)),
    quantize=(("activation 1x128", (256, 384), ACTIVATION), ("weight 128x128", (384, 256), WEIGHT),
              ("Wgrad dy^T 1x128", (200, 384), "transposed"),
              ("Wgrad x^T from the FP8 cache", (200, 384), "requantized"),
              ("x and x^T 1x128, one read", (200, 384), "with transposed"),
              ("W and W^T 128x128, one read", (384, 256), "blocks with transposed")),
    copy_elements=2**20, impls=("torch", "scaled_mm", "triton", "emulated"),
    dtype=torch.bfloat16, sets=2, warmup=1, reps=3)


# --------------------------------------------------------------------------- implementations


def scaled_mm_reference(a, b) -> torch.Tensor:
    """C = A @ B^T through torch._scaled_mm with the scale layouts PyTorch's tests use
    (test/test_matmul_cuda.py, test_scaled_mm_vs_emulated_block_wise): 1x128 scales
    "outer-dim-major", 128x128 scales of B transposed. FP32 output, as the backends."""
    scale_a = a.scales.t().contiguous().t()        # [M, K/128], strides (1, M)
    if b.block == ACTIVATION:
        scale_b = b.scales.t().contiguous()         # [K/128, N], strides (N, 1)
    else:
        scale_b = b.scales.t()                      # [K/128, N/128], strides (1, K/128)
    return torch._scaled_mm(a.q, b.q.t(), scale_a=scale_a, scale_b=scale_b,
                            out_dtype=torch.float32)


def gemm_fn(impl: str):
    from plugins.fp8 import backends

    return scaled_mm_reference if impl == "scaled_mm" else backends.BACKENDS[impl]


def why_unavailable(impl: str) -> str | None:
    from plugins.fp8 import backends

    if impl in ("torch", "scaled_mm"):
        return backends.torch_scaled_available()
    if impl == "triton":
        try:
            from plugins.fp8.triton_gemm import available
        except ImportError as error:
            return dev.failure(error)
        return available()
    return None


def _quantized(t: torch.Tensor, block):
    from plugins.fp8 import backends
    from plugins.common.quantize import quantize

    return backends.Operand(*quantize(t, block), block)


def gemm_operands(pass_: str, x, w, dy):
    """(BF16 product of the pass, FP8 A, FP8 B) for the GEMM C = A @ B^T the pass runs."""
    if pass_ == "Fprop":
        return partial(torch.matmul, x, w.t()), _quantized(x, ACTIVATION), _quantized(w, WEIGHT)
    if pass_ == "Dgrad":
        return (partial(torch.matmul, dy, w), _quantized(dy, ACTIVATION),
                _quantized(w.t().contiguous(), WEIGHT))
    return (partial(torch.matmul, dy.t(), x), _quantized(dy.t().contiguous(), ACTIVATION),
            _quantized(x.t().contiguous(), ACTIVATION))


def gemm_dims(pass_: str, m: int, n: int, k: int) -> tuple[int, int, int]:
    """(rows of C, cols of C, reduction) of each pass for weight [n, k] and m tokens."""
    return {"Fprop": (m, n, k), "Dgrad": (m, k, n), "Wgrad": (n, k, m)}[pass_]


def fwd_bwd(linear, x, w, dy) -> None:
    torch.autograd.grad(linear(x, w), (x, w), dy)


# --------------------------------------------------------------------------- measuring


def _random(shape, setup: Setup, device, g, requires_grad=False):
    t = torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(setup.dtype)
    return t.requires_grad_(requires_grad)


def measure_gemms(setup: Setup, device, available: dict[str, str | None]) -> list[dict]:
    from plugins.fp8 import backends

    g = torch.Generator(device).manual_seed(0)
    m, rows = setup.tokens, []
    live = [i for i in setup.impls if available[i] is None]
    for n, k in setup.weights:
        sets = [(_random((m, k), setup, device, g), _random((n, k), setup, device, g),
                 _random((m, n), setup, device, g)) for _ in range(setup.sets)]
        for pass_ in PASSES:
            row = {"weight": [n, k], "pass": pass_, "dims": gemm_dims(pass_, m, n, k)}
            with dev.failure_recorded(row, "error", device):  # the row says why
                ops = [gemm_operands(pass_, *s) for s in sets]
                calls = {"bf16": lambda i, ops=ops: ops[i % len(ops)][0]()}
                for impl in live:
                    calls[impl] = lambda i, f=gemm_fn(impl), ops=ops: f(*ops[i % len(ops)][1:])
                row["times_s"] = timing.interleaved(calls, setup.reps, setup.warmup, device)
                timing.log(f"gemm [{n}, {k}] {pass_}", row["times_s"])
                # Agreement with the exact block-scaled product, on the first input set.
                ref, row["max_rel_error"] = backends.emulated_gemm(*ops[0][1:]), {}
                for impl in (i for i in live if isinstance(row["times_s"][i], list)):
                    try:
                        got = gemm_fn(impl)(*ops[0][1:]).float()
                        if impl == "triton":  # what the autotuner chose for this shape
                            from plugins.fp8.triton_gemm import tuned_config

                            row["triton_config"] = tuned_config()
                        row["max_rel_error"][impl] = (
                            (got - ref).abs().max() / ref.abs().max()).item()
                    except Exception as error:  # noqa: BLE001
                        row["max_rel_error"][impl] = dev.failure(error)
                del ops, ref
            rows.append(row)
        del sets
        dev.free(device)
    return rows


CACHED_W = " + cached W"  # suffix of the runs with the FP8 weight held (--fp8-cache-weights)


def measure_linears(setup: Setup, device, available: dict[str, str | None]) -> list[dict]:
    """Each FP8 backend as called by default, and with its FP8 weight (W and W^T) from the
    cache (quantized before timing, as for every micro-batch of a step but the first)."""
    from plugins.fp8.linear import fp8_linear
    from plugins.fp8.weight_cache import quantize_weight, quantize_weight_transposed

    g = torch.Generator(device).manual_seed(1)
    m, rows = setup.tokens, []
    live = [i for i in setup.impls if available[i] is None and i != "scaled_mm"]
    for n, k in setup.weights:
        row = {"weight": [n, k], "tokens": m}
        with dev.failure_recorded(row, "error", device):  # the row says why
            sets = [(_random((m, k), setup, device, g, True),
                     _random((n, k), setup, device, g, True),
                     _random((m, n), setup, device, g)) for _ in range(setup.sets)]
            held = [(quantize_weight(w.detach()), quantize_weight_transposed(w.detach()))
                    for _, w, _ in sets]
            calls = {"bf16": lambda i, s=sets: fwd_bwd(F.linear, *s[i % len(s)])}
            for impl in live:
                calls[impl] = lambda i, s=sets, f=partial(fp8_linear, backend=impl): \
                    fwd_bwd(f, *s[i % len(s)])
                calls[impl + CACHED_W] = lambda i, s=sets, h=held, impl=impl: fwd_bwd(
                    partial(fp8_linear, backend=impl, weight_fp8=h[i % len(s)][0],
                            weight_fp8_t=lambda w_t=h[i % len(s)][1]: w_t),
                    *s[i % len(s)])
            row["times_s"] = timing.interleaved(calls, setup.reps, setup.warmup, device)
            timing.log(f"linear [{n}, {k}] fwd+bwd", row["times_s"])
            del sets, held, calls
        rows.append(row)
    return rows


def quantize_kernel_runs(device: torch.device) -> bool:
    """Whether plugins.common.quantize goes through the Triton kernel on `device`."""
    if device.type != "cuda":
        return False
    try:
        from plugins.common import triton_quantize
    except ImportError:
        return False
    return triton_quantize.available(device) is None


def _quantizer(kind, check_finite: bool):
    """The call a linear makes for `kind`: a block (x or W), "transposed" (Wgrad's dy^T,
    ragged tokens padded), "requantized" (Wgrad's x^T from the FP8 cache (q, scales)),
    "with transposed" (x and x^T from one read, as fp8_linear quantizes x and dy) or
    "blocks with transposed" (W and W^T from one read, as the weight cache does)."""
    from plugins.common.quantize import (quantize, quantize_blocks_with_transposed,
                                         quantize_transposed, quantize_with_transposed,
                                         requantize_transposed)

    if kind == "with transposed":
        return partial(quantize_with_transposed, check_finite=check_finite)
    if kind == "blocks with transposed":
        return partial(quantize_blocks_with_transposed, check_finite=check_finite)
    if kind == "transposed":
        return partial(quantize_transposed, check_finite=check_finite, pad_rows=True)
    if kind == "requantized":
        return lambda cache: requantize_transposed(*cache, pad_rows=True)
    return partial(quantize, block=kind, check_finite=check_finite)


def _moved_bytes(kind, shape: tuple[int, int], dtype_bytes: int) -> int:
    """Read once, E4M3 bytes and float32 scales written once (the FP8 cache is read as
    bytes and scales too); the fused kinds write both orientations (tokens or rows padded
    to 128)."""
    elements = math.prod(shape)
    if kind in ("with transposed", "blocks with transposed"):
        rows, cols = shape
        padded = (rows + -rows % 128) * cols
        block = 128 if kind == "with transposed" else 128 * 128
        written = (elements if block == 128 else padded) + padded
        return elements * dtype_bytes + written + 4 * (written // block)
    tiles = elements // (kind[0] * kind[1] if isinstance(kind, tuple) else 128)
    read = elements + 4 * tiles if kind == "requantized" else elements * dtype_bytes
    return read + elements + 4 * tiles


def measure_quantize(setup: Setup, device) -> dict:
    """The quantizations as a linear calls them, each call timed alone (its launch and,
    where it checks for inf/NaN, its host sync included), and the same with no check in
    CUDA graphs (launch overhead out), against a copy's bandwidth (also in a graph)."""
    from plugins.common.quantize import quantize

    g = torch.Generator(device).manual_seed(2)
    src = torch.empty(setup.copy_elements, dtype=torch.bfloat16, device=device)
    src.normal_(generator=g)
    dst = torch.empty_like(src)
    graph_kernel = quantize_kernel_runs(device)
    per_call, graphed = {}, {"copy": lambda i: dst.copy_(src)}
    cases = []
    for label, shape, kind in setup.quantize:
        sets = [_random(shape, setup, device, g) for _ in range(setup.sets)]
        if kind == "requantized":
            sets = [quantize(x, ACTIVATION) for x in sets]
        cases.append({"label": label, "shape": list(shape), "kind": str(kind),
                      "bytes": _moved_bytes(kind, shape, setup.dtype.itemsize)})
        per_call[label] = lambda i, s=sets, f=_quantizer(kind, True): f(s[i % len(s)])
        if graph_kernel:
            graphed[f"kernel {label}"] = \
                lambda i, s=sets, f=_quantizer(kind, False): f(s[i % len(s)])
    times = timing.interleaved(per_call, setup.reps, setup.warmup, device)
    times.update(timing.graphed(graphed, GRAPHED_CALLS, setup.reps, setup.warmup, device))
    timing.log("quantize", times)
    return {"copy_bytes": 2 * setup.copy_elements * 2, "times_s": times, "cases": cases}


def measure(device: torch.device, setup: Setup) -> dict:
    """Every number of the benchmark, JSON-able (times in seconds, errors as strings)."""
    available = {impl: why_unavailable(impl) for impl in setup.impls}
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the emulated reference in true FP32
    try:
        sections = {}
        for key, fn in (("gemm", partial(measure_gemms, setup, device, available)),
                        ("linear", partial(measure_linears, setup, device, available)),
                        ("quantize", partial(measure_quantize, setup, device))):
            with dev.failure_recorded(sections, key, device):  # the others still run
                sections[key] = fn()
    finally:
        torch.set_float32_matmul_precision(precision)
    return {"device": machine.accelerator(device), "tokens": setup.tokens,
            "dtype": str(setup.dtype),
            "warmup": setup.warmup, "reps": setup.reps, "input_sets": setup.sets,
            "impls": list(setup.impls), "unavailable": {k: v for k, v in available.items() if v},
            **sections}


# --------------------------------------------------------------------------- tables


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def _short(cell: str, limit: int = 60) -> str:
    return cell if len(cell) <= limit else cell[:limit - 1] + "…"


def _error(e: float | str | None) -> str:
    if isinstance(e, float):
        return f"{e:.1e}"
    return _short(f"failed: {e}") if e else "-"


def _geomean(xs: list[float]) -> float | None:
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def _verdict(values: list[float], target: float, what: str) -> str:
    if not values:
        return f"{what}: no measurement"
    low, mean = min(values), _geomean(values)
    met = "met" if low >= target else "missed"
    return f"{what}: geometric mean {mean:.2f}, lowest {low:.2f} (target >= {target}: {met})"


def _linear_impl(key: str) -> str:
    impl, cached, _ = key.partition(CACHED_W)
    return IMPLS[impl] + (CACHED_W if cached else "")


def result(raw: dict) -> Result:
    impls = raw["impls"]
    notes = [f"Device: {raw['device'].get('gpu', raw['device']['device'])}; CUDA "
             f"{raw['device'].get('cuda (torch build)', '-')}, driver "
             f"{raw['device'].get('driver', '-')}, triton {raw['device']['triton']}.",
             f"{raw['tokens']} tokens, {raw['dtype']} inputs, {raw['input_sets']} input sets "
             f"rotated, {raw['warmup']} warm-up rounds then {raw['reps']} interleaved rounds; "
             "median per call (CUDA events on a GPU). x, W, dy ~ N(0, 1)."]
    notes += [f"{IMPLS[k]} not run: {v}" for k, v in raw["unavailable"].items()]
    failures: dict[str, str] = {}
    tables = []

    def cell(times, base=None, flops=None):
        if isinstance(times, str):
            failures.setdefault(times, "")
            return _short(f"failed: {times}")
        t = timing.median(times)
        parts = [_ms(t)]
        if flops:
            parts.append(f"{flops / t / 1e12:.3g} TFLOP/s")
        if base:
            parts.append(f"{base / t:.2f}x")
        return ", ".join(parts)

    def speed_cells(times_s, flops, speedups) -> list[str]:
        """BF16's cell, then each FP8 implementation's against it; collects the speedups."""
        base = timing.median(times_s["bf16"])
        cells = [cell(times_s["bf16"], None, flops)]
        for impl in speedups:
            cells.append(cell(times_s[impl], base, flops))
            t = timing.median(times_s[impl])
            if t and base:
                speedups[impl].append(base / t)
        return cells

    shown = [i for i in impls if i not in raw["unavailable"]]
    if isinstance(raw.get("gemm"), list):
        rows, err_rows, speedups = [], [], {i: [] for i in shown}
        for r in raw["gemm"]:
            mm, nn, kk = r["dims"]
            flops = 2 * mm * nn * kk
            label = [f"[{r['weight'][0]}, {r['weight'][1]}]", r["pass"], f"{mm}x{nn}x{kk}"]
            if "error" in r:
                rows.append(label + [cell(r["error"])] * (1 + len(shown)))
                err_rows.append(label + [_error(r["error"])] * len(shown))
                continue
            row = label + speed_cells(r["times_s"], flops, speedups)
            rows.append(row)
            err_rows.append(row[:3] + [_error(r["max_rel_error"].get(impl)) for impl in shown])
        tables.append(Table(
            "(a) FP8 GEMM (quantization not timed) vs BF16 torch.matmul: median, TFLOP/s, "
            "speedup over BF16", ["weight [N, K]", "pass", "GEMM MxNxK", "BF16 torch.matmul",
                                  *(IMPLS[i] for i in shown)], rows))
        tables.append(Table(
            "(a') FP8 GEMM vs the `emulated` backend on the same FP8 operands: "
            "max |C - C_emulated| / max |C_emulated|",
            ["weight [N, K]", "pass", "GEMM MxNxK", *(IMPLS[i] for i in shown)], err_rows))
        notes += [_verdict(v, GEMM_TARGET, f"(a) {IMPLS[i]} speedup over BF16")
                  for i, v in speedups.items()]
        chosen = [f"{'x'.join(map(str, r['dims']))}: {r['triton_config']}"
                  for r in raw["gemm"] if "triton_config" in r]
        if chosen:
            notes.append("(a) The `triton` backend's autotuned config per GEMM MxNxK (tuned "
                         "in the warm-up): " + "; ".join(chosen) + ".")
    elif "gemm" in raw:
        notes.append(f"(a) failed: {raw['gemm']}")

    if isinstance(raw.get("linear"), list):
        rows, speedups = [], {v: [] for i in shown if i != "scaled_mm" for v in (i, i + CACHED_W)}
        for r in raw["linear"]:
            n, k = r["weight"]
            flops = 3 * 2 * r["tokens"] * n * k
            if "error" in r:
                rows.append([f"[{n}, {k}]"] + [cell(r["error"])] * (1 + len(speedups)))
                continue
            rows.append([f"[{n}, {k}]", *speed_cells(r["times_s"], flops, speedups)])
        tables.append(Table(
            "(b) Linear forward + backward, quantization included: fp8_linear vs BF16 "
            "F.linear (median, TFLOP/s of the three GEMMs, speedup over BF16)",
            ["weight [N, K]", "BF16 F.linear",
             *(f"fp8_linear, {_linear_impl(i)}" for i in speedups)],
            rows))
        notes += [_verdict(v, LINEAR_TARGET, f"(b) fp8_linear with {_linear_impl(i)} speedup")
                  for i, v in speedups.items()]
        notes.append(f"(b) {CACHED_W.strip(' +')}: the weight's FP8 copies (W, and W^T for "
                     "Dgrad) made before timing, as --fp8-cache-weights holds them for every "
                     "micro-batch of a step but the first; without it W is quantized in "
                     "forward and W^T in backward.")
    elif "linear" in raw:
        notes.append(f"(b) failed: {raw['linear']}")

    if isinstance(raw.get("quantize"), dict):
        q = raw["quantize"]
        copy_t = timing.median(q["times_s"]["copy"])
        copy_bw = q["copy_bytes"] / copy_t if copy_t else None
        rows = [["device-to-device copy (bandwidth probe)", f"[{q['copy_bytes'] // 4}] bf16",
                 f"{q['copy_bytes'] / 1e6:.0f}", cell(q["times_s"]["copy"]),
                 f"{copy_bw / 1e9:.0f}" if copy_bw else "-", "1.00"]]
        fractions: dict[str, list[float]] = {}
        for case in q["cases"]:
            for what, key in (("as called", case["label"]),
                              ("kernel alone", f"kernel {case['label']}")):
                if key not in q["times_s"]:
                    continue
                times = q["times_s"][key]
                t = timing.median(times)
                bw = case["bytes"] / t if t else None
                if bw and copy_bw:
                    fractions.setdefault(what, []).append(bw / copy_bw)
                source = "e4m3 + scales" if case.get("kind") == "requantized" else "bf16"
                rows.append([f"{what} {case['label']}", f"[{case['shape'][0]}, "
                             f"{case['shape'][1]}] {source}", f"{case['bytes'] / 1e6:.1f}",
                             cell(times), f"{bw / 1e9:.0f}" if bw else "-",
                             f"{bw / copy_bw:.2f}" if bw and copy_bw else "-"])
        tables.append(Table(
            "(c) FP8 quantization: bytes read + written over time, against a device-to-device "
            "copy in the same run", ["case", "tensor", "MB moved", "median", "GB/s",
                                     "of copy GB/s"], rows, right=frozenset({2, 4, 5})))
        notes.append("(c) bytes moved: the input read once, E4M3 bytes and float32 scales "
                     "written once; the copy counts its read and its write. As called: "
                     "plugins.common.quantize's call with its inf/NaN check (none for x^T from "
                     "the cache), each call between its own CUDA events, so its launch and "
                     "the check's host sync count; a linear checks once per direction instead. "
                     "Kernel alone (the same call unchecked: plugins.common.triton_quantize) and "
                     f"the copy: {GRAPHED_CALLS} calls per CUDA graph, launch overhead out.")
        notes += [_verdict(v, QUANTIZE_TARGET, f"(c) {what}, fraction of copy bandwidth")
                  for what, v in fractions.items()]
    elif "quantize" in raw:
        notes.append(f"(c) failed: {raw['quantize']}")

    notes += [f"Error in full: {text}" for text in failures]
    return Result(NAME, [], notes, tables, raw=raw)


def run(smoke: bool = False) -> Result:
    """The registry's entry (which skips it without a GPU unless `smoke`): DeepSeek-V3's
    shapes, or tiny ones on whatever device there is."""
    return result(measure(dev.default_device(), SMOKE if smoke else FULL))
