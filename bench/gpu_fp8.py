"""gpu_fp8: an FP8 linear against BF16 at DeepSeek-V3's shapes on a GPU (issue 22).

Each weight [N, K] (out, in) at M tokens, bf16, BF16 timed the same way in the same run:
(a) linear    fp8_linear forward + backward, quantization included, the weight's FP8 copies
              (W, W^T) held as `--fp8-cache-weights` holds them for every micro-batch, side
              by side with BF16 F.linear forward + backward; the once-per-step W/W^T
              quantization timed on its own and reported per step. Targets: >= 1.40x BF16
              at [7168, 16384], [7168, 18432], [18432, 7168]; >= 1.15x at the other
              expert/attention shapes; no module left in FP8 slower than BF16 (MLA's kv up
              [32768, 512] is the likely one to keep in BF16).
(b) launches  device work queued per linear forward + backward (torch.profiler: kernels,
              copies, fills), target <= 6 plus the once-per-step weight quantization; the
              host's waits for the GPU; both linears in CUDA graphs (launch overhead out)
              where the FP8 one waits for nothing.
(c) quantize  the quantizations the FP8 linear makes, as it makes them (in its forward and
              backward, each call between CUDA events), as bytes read + written over time
              against the same run's device-to-device copy. Target >= 85% of the copy.
(d) GEMM      Fprop, Dgrad and Wgrad alone, FP8 operands quantized beforehand: what the
              GEMMs allow the linear, checked against the `emulated` backend.

    Fprop   y  = x  @ W^T   A = x  [M, K] 1x128    B = W   [N, K] 128x128
    Dgrad   dx = dy @ W     A = dy [M, N] 1x128    B = W^T [K, N] 128x128
    Wgrad   dW = dy^T @ x   A = dy^T [N, M] 1x128  B = x^T [K, M] 1x128 (K = tokens)

`python -m bench gpu_fp8` on a GPU; `--smoke` runs tiny shapes on the CPU (the `emulated`
backend; nothing queued on a device, so no launch count), so CI exercises the same code.
The calls into plugins.fp8 are in bench.fp8_calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from bench import device as dev
from bench import fp8_calls, machine, profiling, timing
from bench.result import Result, Table

NAME = "gpu_fp8"
ACTIVATION, WEIGHT = (1, 128), (128, 128)
PASSES = ("Fprop", "Dgrad", "Wgrad")
LARGE, SMALL, KEEP = 1.40, 1.15, 1.0  # speedup targets over BF16 (issue 22)
LAUNCH_TARGET = 6  # device launches per FP8 linear forward + backward, W held
QUANTIZE_TARGET = 0.85  # of the copy's bandwidth

# FP8 implementations of the GEMM table: the plugin's backends, and torch._scaled_mm called
# with the scale layouts of PyTorch's own tests, to tell a layout problem in the `torch`
# backend apart from what cuBLAS's block-scaled GEMM can do. With 128x128 B scales and
# k/128 not a multiple of 4 that layout is misread by cuBLAS (torch 2.11; the smoke shapes
# have such GEMMs): its error there is large by design, and the `torch` backend pads.
IMPLS = {
    "torch": "FP8 `torch` backend",
    "scaled_mm": "torch._scaled_mm, PyTorch's scale layout",
    "triton": "FP8 `triton` backend",
    "emulated": "FP8 `emulated` backend",
}


@dataclass(frozen=True)
class Shape:
    module: str  # where DeepSeek-V3 has it
    out: int     # N
    inp: int     # K
    target: float  # speedup over BF16 the FP8 linear must reach

    @property
    def weight(self) -> list[int]:
        return [self.out, self.inp]


@dataclass(frozen=True)
class Setup:
    tokens: int  # M
    shapes: tuple[Shape, ...]
    copy_elements: int  # bf16 elements of the bandwidth probe's copy
    gemm_impls: tuple[str, ...]
    dtype: torch.dtype
    sets: int  # input sets rotated through, so repeated calls do not time the L2 cache
    warmup: int  # >= 1: the first calls compile the Triton kernels (seconds)
    reps: int


# DeepSeek-V3 (hidden 7168, expert ffn 2048, q_lora 1536, 128 heads x 192 = 24576, kv_lora
# 512 -> 128 x (128 + 128) = 32768, attention output 128 x 128 = 16384, dense ffn 18432).
DEEPSEEK_V3 = (
    Shape("expert fc2", 7168, 2048, SMALL),
    Shape("expert fc1 (gate or up half)", 2048, 7168, SMALL),
    Shape("MLA q down", 1536, 7168, SMALL),
    Shape("MLA q up", 24576, 1536, SMALL),
    Shape("MLA kv up", 32768, 512, KEEP),
    Shape("attention output", 7168, 16384, LARGE),
    Shape("dense fc2", 7168, 18432, LARGE),
    Shape("dense fc1 (gate or up half)", 18432, 7168, LARGE),
)
FULL = Setup(tokens=4096, shapes=DEEPSEEK_V3, copy_elements=2**29,
             gemm_impls=("torch", "scaled_mm"), dtype=torch.bfloat16, sets=3, warmup=5,
             reps=30)
SMOKE = Setup(tokens=256, shapes=(Shape("small", 384, 256, SMALL),
                                  Shape("large", 256, 384, LARGE)),
              copy_elements=2**20, gemm_impls=("torch", "scaled_mm", "triton", "emulated"),
              dtype=torch.bfloat16, sets=2, warmup=1, reps=3)


def _random(shape, setup: Setup, device, g, requires_grad=False):
    t = torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(setup.dtype)
    return t.requires_grad_(requires_grad)


def _linear_sets(setup: Setup, shape: Shape, device, seed: int):
    """`setup.sets` (x [M, K], W [N, K], dy [M, N]), x and W requiring grad."""
    g = torch.Generator(device).manual_seed(seed)
    m, n, k = setup.tokens, shape.out, shape.inp
    return [(_random((m, k), setup, device, g, True), _random((n, k), setup, device, g, True),
             _random((m, n), setup, device, g)) for _ in range(setup.sets)]


def fwd_bwd(linear, x, w, dy) -> None:
    torch.autograd.grad(linear(x, w), (x, w), dy)


# --------------------------------------------------------------------------- (a)-(c) linear


def _linear_calls(sets, backend: str) -> tuple[dict, list, list]:
    """({"bf16", "fp8", "weight per step"}: calls rotating over the input sets, the FP8
    linears, the per-step caches): BF16 and FP8 forward + backward, and the FP8 weights'
    once-per-step quantization. The FP8 linears' caches are filled here: each call finds W
    and W^T held."""
    # As an FP8 module runs: inf/NaN recorded in device-side flags, read once per step
    # by the plugin (not here), so no call waits for the GPU.
    flags = [fp8_calls.non_finite_flags() for _ in sets]
    held = [fp8_calls.weight_cache(f) for f in flags]
    for cache, (_, w, _) in zip(held, sets):
        fp8_calls.quantize_weight_for_step(cache, w)
    linears = [fp8_calls.fp8_linear_held(backend, cache, f) for cache, f in zip(held, flags)]
    per_step = [fp8_calls.weight_cache(f) for f in flags]  # their own: `held` stays full
    n = len(sets)
    return {
        "bf16": lambda i: fwd_bwd(F.linear, *sets[i % n]),
        "fp8": lambda i: fwd_bwd(linears[i % n], *sets[i % n]),
        "weight per step": lambda i: fp8_calls.quantize_weight_for_step(per_step[i % n],
                                                                        sets[i % n][1]),
    }, linears, per_step


def record_quantizations(sets, linears, per_step, reps: int, device) -> list[dict]:
    """Every quantization call of an FP8 forward + backward and of the per-step weight
    quantization, timed where it runs (bench.fp8_calls.QuantizeRecorder), `reps` times."""
    recorder = fp8_calls.QuantizeRecorder(device)
    with recorder.installed():
        for i in range(reps):
            x, w, dy = sets[i % len(sets)]
            recorder.start_round("forward")
            y = linears[i % len(sets)](x, w)
            recorder.set_phase("backward")
            torch.autograd.grad(y, (x, w), dy)
            recorder.start_round("step")
            fp8_calls.quantize_weight_for_step(per_step[i % len(sets)], w)
    timing.synchronize(device)
    return recorder.summary()


def measure_linear(setup: Setup, shape: Shape, backend: str, device) -> dict:
    row = {"module": shape.module, "weight": shape.weight, "tokens": setup.tokens,
           "target": shape.target}
    with dev.failure_recorded(row, "error", device):  # the row says why
        sets = _linear_sets(setup, shape, device, seed=1)
        calls, linears, per_step = _linear_calls(sets, backend)
        row["times_s"] = timing.interleaved(calls, setup.reps, setup.warmup, device)
        timing.log(f"linear {shape.weight} fwd+bwd", row["times_s"])
        row["launches"], row["host_waits"] = {}, {}
        for key, call in calls.items():
            try:
                p = profiling.profiled(partial(call, 0), device)
                row["launches"][key], row["host_waits"][key] = (profiling.launches(p),
                                                                profiling.host_waits(p))
            except Exception as error:  # noqa: BLE001  (the cell says why)
                row["launches"][key] = row["host_waits"][key] = dev.failure(error)
        row["quantize_calls"] = record_quantizations(sets, linears, per_step, setup.reps,
                                                     device)
    return row


def measure_graphed(setup: Setup, rows: list[dict], backend: str, device) -> list[dict]:
    """Both linears in CUDA graphs (one graph of `setup.sets` calls each): the time with
    the host's launch overhead out, where the FP8 linear waits for nothing on the host (a
    wait cannot be captured: the cell says so)."""
    out = []
    for shape, row in zip(setup.shapes, rows):
        entry = {"weight": shape.weight}
        with dev.failure_recorded(entry, "error", device):
            sets = _linear_sets(setup, shape, device, seed=1)
            calls, _, _ = _linear_calls(sets, backend)
            graphable = {"bf16": calls["bf16"]}
            waits = row.get("host_waits", {}).get("fp8")
            if waits == 0:
                graphable["fp8"] = calls["fp8"]
            entry["times_s"] = timing.graphed(graphable, len(sets), setup.reps, setup.warmup,
                                              device)
            if waits != 0:
                entry["times_s"]["fp8"] = (f"not captured: {waits} host waits per call"
                                           if isinstance(waits, int) else "not profiled")
            timing.log(f"graphed linear {shape.weight} fwd+bwd",
                       {k: v for k, v in entry["times_s"].items() if isinstance(v, list)})
        out.append(entry)
    return out


def measure_copy(setup: Setup, device) -> dict:
    """A device-to-device copy's time: the bandwidth the quantizations are held to."""
    g = torch.Generator(device).manual_seed(2)
    src = torch.empty(setup.copy_elements, dtype=torch.bfloat16, device=device)
    src.normal_(generator=g)
    dst = torch.empty_like(src)
    times = timing.interleaved({"copy": lambda i: dst.copy_(src)}, setup.reps, setup.warmup,
                               device)
    timing.log("copy", times)
    return {"bytes": 2 * src.numel() * src.element_size(), "times_s": times["copy"]}


# --------------------------------------------------------------------------- (d) GEMMs


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
    from plugins.common.quantize import quantize
    from plugins.fp8 import backends

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


def measure_gemms(setup: Setup, device, available: dict[str, str | None]) -> list[dict]:
    from plugins.fp8 import backends

    g = torch.Generator(device).manual_seed(0)
    m, rows = setup.tokens, []
    live = [i for i in setup.gemm_impls if available[i] is None]
    for shape in setup.shapes:
        n, k = shape.out, shape.inp
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


# --------------------------------------------------------------------------- measuring


def measure(device: torch.device, setup: Setup) -> dict:
    """Every number of the benchmark, JSON-able (times in seconds, errors as strings).
    The linear's figures first, the GEMMs next, the CUDA graphs last (a capture that
    fails must not cost the others)."""
    available = {impl: why_unavailable(impl) for impl in setup.gemm_impls}
    backend = fp8_calls.backend()
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the emulated reference in true FP32
    sections: dict = {}
    try:
        with dev.failure_recorded(sections, "copy", device):
            sections["copy"] = measure_copy(setup, device)
        with dev.failure_recorded(sections, "linear", device):
            sections["linear"] = []
            for shape in setup.shapes:
                sections["linear"].append(measure_linear(setup, shape, backend, device))
                dev.free(device)
        with dev.failure_recorded(sections, "gemm", device):
            sections["gemm"] = measure_gemms(setup, device, available)
        if isinstance(sections.get("linear"), list):
            with dev.failure_recorded(sections, "graphed", device):
                sections["graphed"] = measure_graphed(setup, sections["linear"], backend,
                                                      device)
    finally:
        torch.set_float32_matmul_precision(precision)
    return {"device": machine.accelerator(device), "tokens": setup.tokens,
            "dtype": str(setup.dtype), "backend": backend,
            "warmup": setup.warmup, "reps": setup.reps, "input_sets": setup.sets,
            "impls": list(setup.gemm_impls),
            "unavailable": {k: v for k, v in available.items() if v}, **sections}


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


def _launch_cell(count) -> str:
    if isinstance(count, str):
        return _short(f"failed: {count}")
    if count is None:
        return "- (no device)"
    return f"{count['total']} ({count['kernels']} kernels, {count['copies']} copies)"


class _Cells:
    """Table cells from timings; errors collected for the notes."""

    def __init__(self) -> None:
        self.failures: dict[str, str] = {}

    def time(self, times, base=None, flops=None) -> str:
        if isinstance(times, str):
            self.failures.setdefault(times, "")
            return _short(times if times.startswith("not ") else f"failed: {times}")
        t = timing.median(times)
        parts = [_ms(t)]
        if flops:
            parts.append(f"{flops / t / 1e12:.3g} TFLOP/s")
        if base:
            parts.append(f"{base / t:.2f}x")
        return ", ".join(parts)


def _linear_tables(raw: dict, cells: _Cells, notes: list[str]) -> list[Table]:
    rows, launch_rows, by_target = [], [], {}
    graphed = {tuple(g["weight"]): g for g in raw["graphed"]} \
        if isinstance(raw.get("graphed"), list) else {}
    fp8_launches = []
    slower = []
    for r in raw["linear"]:
        n, k = r["weight"]
        label = [r["module"], f"[{n}, {k}]"]
        if "error" in r:
            rows.append(label + [cells.time(r["error"])] * 7)
            launch_rows.append(label + [cells.time(r["error"])] * 5)
            continue
        times, flops = r["times_s"], 3 * 2 * r["tokens"] * n * k
        bf16, fp8 = timing.median(times["bf16"]), timing.median(times["fp8"])
        step = timing.median(times["weight per step"])
        ratio = bf16 / fp8 if bf16 and fp8 else None
        if ratio is not None:
            by_target.setdefault(r["target"], []).append(ratio)
            if ratio < 1:
                slower.append(f"{r['module']} [{n}, {k}]")
        met = "-" if ratio is None else ("met" if ratio >= r["target"] else "missed")
        rows.append(label + [
            cells.time(times["bf16"], None, flops), cells.time(times["fp8"], bf16, flops),
            f">= {r['target']:.2f}x: {met}", cells.time(times["weight per step"]),
            f"{bf16 / (fp8 + step):.2f}x" if bf16 and fp8 and step else "-",
            "-" if ratio is None else ("YES" if ratio < 1 else "no"),
            "-" if ratio is None else f"{ratio:.2f}"])
        launches, waits = r["launches"], r["host_waits"]
        if isinstance(launches.get("fp8"), dict):
            fp8_launches.append(launches["fp8"]["total"])
        g = graphed.get((n, k), {})
        g_times = g.get("times_s", {}) if "error" not in g else {}
        g_bf16 = timing.median(g_times.get("bf16"))
        launch_rows.append(label + [
            _launch_cell(launches.get("bf16")), _launch_cell(launches.get("fp8")),
            _launch_cell(launches.get("weight per step")),
            f"{waits.get('fp8', '-')} / {waits.get('weight per step', '-')}",
            "; ".join(filter(None, [
                f"BF16 {cells.time(g_times['bf16'])}" if "bf16" in g_times else None,
                f"FP8 {cells.time(g_times['fp8'], g_bf16)}" if "fp8" in g_times else None,
                f"failed: {_short(g['error'])}" if "error" in g else None])) or "-"])
    backend = raw["backend"]
    tables = [Table(
        f"(a) Linear forward + backward at {raw['tokens']} tokens, quantization included, W "
        f"and W^T held (quantized once per step): fp8_linear (`{backend}` backend) vs BF16 "
        "F.linear (median, TFLOP/s of the three GEMMs, speedup over BF16)",
        ["module", "weight [N, K]", "BF16 F.linear", "FP8 fp8_linear, W held", "target",
         "W + W^T quantization, once per step", "FP8 with that step's W quantization "
         "(1 micro-batch per step)", "FP8 slower than BF16", "speedup"], rows,
        right=frozenset({8})), Table(
        "(b) Device work queued per linear forward + backward (torch.profiler: kernel "
        "launches and copies/fills), the host's waits for the GPU, and both linears in CUDA "
        "graphs (the host's launch overhead out)",
        ["module", "weight [N, K]", "BF16 F.linear", "FP8 fp8_linear, W held",
         "+ W + W^T quantization, once per step", "host waits: FP8 fwd+bwd / per step",
         "in CUDA graphs (median per call, FP8 speedup over graphed BF16)"], launch_rows)]
    for target, ratios in sorted(by_target.items(), reverse=True):
        what = {LARGE: "the large shapes", SMALL: "the small shapes",
                KEEP: "MLA's kv up (FP8 only where not slower)"}.get(target, f"{target}x")
        notes.append(_verdict(ratios, target, f"(a) FP8 speedup over BF16 at {what}"))
    notes.append("(a) FP8 slower than BF16 (W held): " + (", ".join(slower) or "none") + ".")
    if fp8_launches:
        notes.append(f"(b) FP8 launches per forward + backward, W held: at most "
                     f"{max(fp8_launches)} (target <= {LAUNCH_TARGET}: "
                     f"{'met' if max(fp8_launches) <= LAUNCH_TARGET else 'missed'}).")
    notes.append("(a) W held: the FP8 weight cache (plugins.fp8.weight_cache) filled before "
                 "timing, as for every micro-batch of a step but the first. The once-per-step "
                 "column drops the cache and quantizes W and W^T as the first micro-batch "
                 "asks for them; the column after it adds that time to one FP8 forward + "
                 "backward (one micro-batch per step: the worst case).")
    return tables


def _quantize_table(raw: dict, notes: list[str]) -> Table | None:
    copy = raw.get("copy")
    if not isinstance(copy, dict) or not isinstance(raw.get("linear"), list):
        notes.append(f"(c) not measured: copy {copy!r:.80}")
        return None
    copy_t = timing.median(copy["times_s"])
    copy_bw = copy["bytes"] / copy_t if copy_t else None
    rows = [["device-to-device copy (bandwidth probe)", "-", "1", f"{copy['bytes'] / 1e6:.0f}",
             _ms(copy_t) if copy_t else "-", f"{copy_bw / 1e9:.0f}" if copy_bw else "-",
             "1.00", "-"]]
    fractions, lowest = [], []
    for r in raw["linear"]:
        if "quantize_calls" not in r:
            continue
        for phases, what in ((("forward", "backward"), "fwd+bwd, W held"),
                             (("step",), "W + W^T, once per step")):
            calls = [c for c in r["quantize_calls"] if c["phase"] in phases]
            if not calls:
                continue
            seconds = [timing.median(c["times_s"]) for c in calls]
            moved = sum(c["bytes"] for c in calls)
            t = sum(seconds)
            bw = moved / t if t else None
            frac = bw / copy_bw if bw and copy_bw else None
            per_call = [(c["bytes"] / s / copy_bw, c) for c, s in zip(calls, seconds)
                        if s and copy_bw]
            worst = min(per_call, key=lambda fc: fc[0], default=None)
            if frac is not None:
                fractions.append(frac)
                lowest.append(worst[0])
            rows.append([f"{r['module']} [{r['weight'][0]}, {r['weight'][1]}]", what,
                         str(len(calls)), f"{moved / 1e6:.1f}", _ms(t),
                         f"{bw / 1e9:.0f}" if bw else "-", f"{frac:.2f}" if frac else "-",
                         f"{worst[1]['function']}({worst[1]['reads']}) {worst[0]:.2f}"
                         if worst else "-"])
    notes.append(_verdict(fractions, QUANTIZE_TARGET,
                          "(c) quantization as called, fraction of copy bandwidth per linear"))
    notes.append(_verdict(lowest, QUANTIZE_TARGET,
                          "(c) quantization as called, its slowest call's fraction"))
    notes.append("(c) As called: each quantization function of plugins.fp8.linear and "
                 "plugins.fp8.weight_cache (bench.fp8_calls.quantizing_modules) timed where "
                 "the linear calls it, between CUDA events on its stream, so its launches and "
                 "any host wait inside it count; bytes: each input read once, each output "
                 "(E4M3 codes, float32 scales) written once. The copy counts its read and "
                 "its write.")
    return Table("(c) FP8 quantization as the linear calls it: bytes read + written over "
                 "time, against a device-to-device copy in the same run",
                 ["linear", "quantizations of", "calls", "MB moved", "time", "GB/s",
                  "of copy GB/s",
                  "slowest call: function(input) fraction"], rows,
                 right=frozenset({2, 3, 5, 6}))


def _gemm_tables(raw: dict, cells: _Cells, notes: list[str]) -> list[Table]:
    shown = [i for i in raw["impls"] if i not in raw["unavailable"]]
    rows, err_rows, speedups = [], [], {i: [] for i in shown}
    for r in raw["gemm"]:
        mm, nn, kk = r["dims"]
        flops = 2 * mm * nn * kk
        label = [f"[{r['weight'][0]}, {r['weight'][1]}]", r["pass"], f"{mm}x{nn}x{kk}"]
        if "error" in r:
            rows.append(label + [cells.time(r["error"])] * (1 + len(shown)))
            err_rows.append(label + [_error(r["error"])] * len(shown))
            continue
        base = timing.median(r["times_s"]["bf16"])
        row = label + [cells.time(r["times_s"]["bf16"], None, flops)]
        for impl in shown:
            row.append(cells.time(r["times_s"][impl], base, flops))
            t = timing.median(r["times_s"][impl])
            if t and base:
                speedups[impl].append(base / t)
        rows.append(row)
        err_rows.append(label + [_error(r["max_rel_error"].get(impl)) for impl in shown])
    notes += [f"(d) {IMPLS[i]} GEMM speedup over BF16: geometric mean "
              f"{_geomean(v):.2f}, lowest {min(v):.2f}" for i, v in speedups.items() if v]
    chosen = [f"{'x'.join(map(str, r['dims']))}: {r['triton_config']}"
              for r in raw["gemm"] if "triton_config" in r]
    if chosen:
        notes.append("(d) The `triton` backend's autotuned config per GEMM MxNxK: "
                     + "; ".join(chosen) + ".")
    return [Table(
        "(d) FP8 GEMM alone (quantization not timed) vs BF16 torch.matmul: median, TFLOP/s, "
        "speedup over BF16", ["weight [N, K]", "pass", "GEMM MxNxK", "BF16 torch.matmul",
                              *(IMPLS[i] for i in shown)], rows), Table(
        "(d') FP8 GEMM vs the `emulated` backend on the same FP8 operands: "
        "max |C - C_emulated| / max |C_emulated|",
        ["weight [N, K]", "pass", "GEMM MxNxK", *(IMPLS[i] for i in shown)], err_rows)]


def result(raw: dict) -> Result:
    d = raw["device"]
    notes = [f"Device: {d.get('gpu', d['device'])}; CUDA {d.get('cuda (torch build)', '-')}, "
             f"driver {d.get('driver', '-')}, triton {d['triton']}.",
             f"{raw['tokens']} tokens, {raw['dtype']} inputs, FP8 backend "
             f"`{raw['backend']}`, {raw['input_sets']} input sets rotated, {raw['warmup']} "
             f"warm-up rounds then {raw['reps']} interleaved rounds; median per call (CUDA "
             "events on a GPU). x, W, dy ~ N(0, 1)."]
    notes += [f"{IMPLS[k]} not run: {v}" for k, v in raw["unavailable"].items()]
    cells, tables = _Cells(), []
    for key, build in (("linear", lambda: _linear_tables(raw, cells, notes)),
                       ("copy", lambda: [t for t in [_quantize_table(raw, notes)] if t]),
                       ("gemm", lambda: _gemm_tables(raw, cells, notes))):
        if isinstance(raw.get(key), (list, dict)):
            tables += build()
        elif key in raw:
            notes.append(f"{key} failed: {raw[key]}")
    if "graphed" in raw and not isinstance(raw["graphed"], list):
        notes.append(f"graphed failed: {raw['graphed']}")
    notes += [f"Error in full: {text}" for text in cells.failures
              if not text.startswith("not ")]
    return Result(NAME, [], notes, tables, raw=raw)


def run(smoke: bool = False) -> Result:
    """The registry's entry (which skips it without a GPU unless `smoke`): DeepSeek-V3's
    shapes, or tiny ones on whatever device there is."""
    return result(measure(dev.default_device(), SMOKE if smoke else FULL))
