"""The GPU benchmarks' smoke mode (`python -m bench --smoke gpu_fp8 gpu_layer gpu_moe`): tiny
shapes on whatever device there is (the CPU in CI, where only the `emulated` FP8 backend
runs). Every section runs, every table has its rows, every number is finite, and the tables
can be rebuilt from the JSON file's raw numbers alone. Also the measuring parts that only
a GPU exercises in full: the quantization recorder, the profiler's counts and families."""

from __future__ import annotations

import json
import math
import re
import statistics
import types
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from bench import fp8_calls, gpu_fp8, gpu_layer, gpu_moe, profiling
from bench.__main__ import main
from bench.result import Table

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
NAMES = ("gpu_fp8", "gpu_layer", "gpu_moe")
GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu")
    assert main(["--smoke", "--out", str(out), *NAMES]) == 0
    records = {name: json.loads((out / "results" / f"{name}.json").read_text())
               for name in NAMES}
    assert all(record["smoke"] for record in records.values())
    return (out / "results.md").read_text(), {k: r["raw"] for k, r in records.items()}


def check_cells(table, label_columns: int, allowed=()) -> None:
    """Every cell past the labels holds finite numbers (or one of `allowed`)."""
    for row in table.rows:
        assert len(row) == len(table.header), (table.title, row)
        for cell in row[label_columns:]:
            if cell in allowed:
                continue
            assert "failed" not in cell and "nan" not in cell and "inf" not in cell, cell
            numbers = [float(n) for n in NUMBER.findall(cell)]
            assert numbers and all(math.isfinite(n) for n in numbers), cell


def check_times(times, reps: int = 3) -> None:
    assert isinstance(times, list), times  # a string is the error that stopped it
    assert len(times) == reps and all(math.isfinite(t) and t > 0 for t in times), times


def misread_by_pytorch_layout(row) -> bool:
    """The GEMMs whose 128x128 B scales PyTorch's own layout hands cuBLAS unpadded, with
    k/128 not a multiple of 4: cuBLAS reads them wrongly (torch 2.11, an H100 and an H200,
    2026-11-26); the `torch` backend pads them (`plugins.fp8.backends._cublas_aligned`)."""
    reduction = row["dims"][2]
    return row["pass"] != "Wgrad" and (reduction // 128) % 4 != 0


def test_fp8_linear_figures(smoke):
    text, raw = smoke
    raw = raw["gpu_fp8"]
    assert "## gpu_fp8" in text
    setup = gpu_fp8.SMOKE
    assert raw["backend"] == ("torch" if GPU else "emulated")
    assert [r["weight"] for r in raw["linear"]] == [s.weight for s in setup.shapes]
    for row in raw["linear"]:
        for name in ("bf16", "fp8", "weight per step"):
            check_times(row["times_s"][name])
            waits = row["host_waits"][name]
            assert isinstance(waits, int) and waits >= 0, waits
            launches = row["launches"][name]
            if GPU:
                assert launches["total"] == launches["kernels"] + launches["copies"] >= 1
            else:
                assert launches is None  # nothing is queued on a device
        # The quantizations as the linear called them: x in forward, dy in backward (the
        # tensors they read), W and W^T once per step; each call timed every round.
        m, (n, k) = setup.tokens, row["weight"]
        calls = row["quantize_calls"]
        assert {c["phase"] for c in calls} == {"forward", "backward", "step"}
        assert any(c["phase"] == "forward" and c["reads"].endswith(f"[{m}, {k}]") for c in calls)
        assert any(c["phase"] == "backward" and c["reads"].endswith(f"[{m}, {n}]") for c in calls)
        assert any(c["phase"] == "step" and c["reads"].endswith(f"[{n}, {k}]") for c in calls)
        for c in calls:
            assert c["bytes"] > 0
            check_times(c["times_s"])
    for entry, row in zip(raw["graphed"], raw["linear"]):
        check_times(entry["times_s"]["bf16"])
        fp8 = entry["times_s"]["fp8"]
        if row["host_waits"]["fp8"]:  # a wait cannot be captured: the cell says so
            assert fp8 == f"not captured: {row['host_waits']['fp8']} host waits per call"
        else:
            check_times(fp8)
    check_times(raw["copy"]["times_s"])

    linear, launches, quantize, gemm, errors = gpu_fp8.result(raw).tables
    assert [r[:2] for r in linear.rows] == [[s.module, f"[{s.out}, {s.inp}]"]
                                            for s in setup.shapes]
    medians = [{k: statistics.median(t) for k, t in r["times_s"].items()} for r in raw["linear"]]
    assert [r[7] for r in linear.rows] == ["YES" if t["fp8"] > t["bf16"] else "no"
                                           for t in medians]
    check_cells(linear, 2, allowed=("YES", "no"))
    assert len(launches.rows) == len(setup.shapes)
    check_cells(launches, 2, allowed=() if GPU else ("- (no device)",))
    assert [r[1] for r in quantize.rows] == ["-"] + ["fwd+bwd, W held",
                                                     "W + W^T, once per step"] * len(setup.shapes)
    check_cells(Table(quantize.title, quantize.header, quantize.rows[1:]), 2)
    assert len(gemm.rows) == len(errors.rows) == 3 * len(setup.shapes)


def test_fp8_gemm_figures(smoke):
    _, raw = smoke
    raw = raw["gpu_fp8"]
    live = [i for i in gpu_fp8.SMOKE.gemm_impls if i not in raw["unavailable"]]
    if not GPU:
        assert live == ["emulated"]
    for row in raw["gemm"]:
        for name in ["bf16", *live]:
            check_times(row["times_s"][name])
        for impl, error in row["max_rel_error"].items():
            if impl == "scaled_mm" and misread_by_pytorch_layout(row):
                continue
            assert isinstance(error, float) and error < 2e-3, (impl, row)
    _, _, _, gemm, errors = gpu_fp8.result(raw).tables
    assert [r[:2] for r in gemm.rows] == [[f"[{s.out}, {s.inp}]", p] for s in gpu_fp8.SMOKE.shapes
                                          for p in gpu_fp8.PASSES]
    assert len(gemm.header) == 4 + len(live)
    check_cells(gemm, 3)
    check_cells(errors, 3)


def test_layer_figures(smoke):
    text, raw = smoke
    raw = raw["gpu_layer"]
    assert "## gpu_layer" in text
    layer = raw["layer"]
    assert list(layer["times_s"]) == ["A", "B", "B1", "C"]
    for times in layer["times_s"].values():
        check_times(times)
    errors = layer["max_rel_error_vs_A"]
    # C: the same weights and routing in Megatron's MoELayer; B: the same layer in FP8
    # (its weights and expert bias A's own: else its routing differs, and so does a
    # quarter or more of its output).
    assert max(errors["C"].values()) < (1e-3 if GPU else 1e-5), errors
    assert max(errors["B"].values()) < 0.15, errors
    for key, p in layer["profiles"].items():
        assert p["total"] > 0 and abs(sum(p["families"].values()) - p["total"]) < 1e-9, key
        assert (p["launches"] is None) != GPU
    for family in ("FP8 GEMM",) if GPU else ():
        assert layer["profiles"]["B"]["families"][family] > 0
    assert layer["profiles"]["A"]["families"].get("attention", 0) > 0

    steps, families = gpu_layer.result(raw).tables
    assert [r[0].split(":")[0] for r in steps.rows] == ["A", "B", "B1", "C"]
    check_cells(steps, 1, allowed=() if GPU else ("- (no device)",))
    assert families.header == ["family", "A", "B", "B1", "C"] and families.rows[-1][0] == "total"
    check_cells(families, 1)


def test_moe_tables(smoke):
    text, raw = smoke
    raw = raw["gpu_moe"]
    assert "## gpu_moe" in text
    layer, grouped = raw["layer"], raw["grouped"]
    assert not layer["dropped"]
    assert list(layer["times_s"]) == ["A", "B", "C"]
    for times in layer["times_s"].values():
        check_times(times)
    # Same weights and routing: the layers agree (FP32 in the smoke run on the CPU).
    for errors in layer["max_rel_error_vs_A"].values():
        assert set(errors) == {"output", "input grad", "router grad", "w1 grad", "w2 grad"}
        assert max(errors.values()) < (1e-5 if not GPU else 2e-2), errors
    for times in grouped["times_s"].values():
        check_times(times)

    layers, experts = gpu_moe.result(raw).tables
    assert [r[0][:2] for r in layers.rows] == ["A:", "B:", "C:"]
    assert len(experts.rows) == 5
    check_cells(layers, 1)
    check_cells(experts, 1)


# --------------------------------------------------------------------- the measuring parts


def test_quantize_recorder_times_the_outermost_call_and_counts_its_bytes():
    """Each quantizing function of the given modules is timed where it is called, once per
    call however deeply it calls others, with the bytes of its tensors in and out; calls
    are matched across rounds by their order in a phase; the modules are restored."""
    module = types.ModuleType("fake_quantizers")

    def quantize(t):
        return t.to(torch.float16), torch.ones(t.shape[0])

    def quantize_twice(t):
        return module.quantize(t), module.quantize(t)

    module.quantize, module.quantize_twice = quantize, quantize_twice
    module.dequantize = lambda t: t  # not a quantizer
    recorder = fp8_calls.QuantizeRecorder(torch.device("cpu"), modules=(module,))
    x = torch.zeros(4, 8)
    with recorder.installed():
        assert module.dequantize is not None and module.quantize is not quantize
        for _ in range(3):
            recorder.start_round("forward")
            module.quantize(x)
            recorder.set_phase("backward")
            module.quantize_twice(x)
            module.dequantize(x)
    assert module.quantize is quantize and module.quantize_twice is quantize_twice
    calls = recorder.summary()
    assert [(c["phase"], c["function"], c["reads"]) for c in calls] == [
        ("forward", "quantize", "float32[4, 8]"), ("backward", "quantize_twice", "float32[4, 8]")]
    one = 4 * 8 * 4 + 4 * 8 * 2 + 4 * 4  # float32 in, float16 and 4 float32 scales out
    assert [c["bytes"] for c in calls] == [one, one + 4 * 8 * 2 + 4 * 4]
    for c in calls:
        check_times(c["times_s"])


def test_fp8_linear_held_quantizes_its_weight_once_per_step():
    """gpu_fp8's FP8 linear takes W and W^T from the cache (no weight quantization in its
    forward + backward); the per-step call quantizes each once, as a step's first
    micro-batch does."""
    g = torch.Generator().manual_seed(0)
    x, w = (torch.randn(256, 256, generator=g, requires_grad=True) for _ in range(2))
    cache = fp8_calls.weight_cache()
    fp8_calls.quantize_weight_for_step(cache, w)
    linear = fp8_calls.fp8_linear_held(fp8_calls.backend(), cache)
    for _ in range(2):
        gpu_fp8.fwd_bwd(linear, x, w, torch.randn(256, 256, generator=g))
    assert (cache.quantizations, cache.transposed_quantizations) == (1, 1)
    fp8_calls.quantize_weight_for_step(cache, w)
    assert (cache.quantizations, cache.transposed_quantizations) == (2, 2)


def test_fp8_linear_as_timed_waits_for_nothing():
    """gpu_fp8 times the FP8 linear as a module runs it (inf/NaN into device-side flags):
    no host sync per call or in the per-step weight quantization, so what it times is
    what training runs, and a CUDA graph can capture it."""
    from tests.helpers.host_syncs import device_waits

    g = torch.Generator().manual_seed(0)
    sets = [tuple(torch.randn(256, 256, generator=g, requires_grad=r) for r in (True, True, False))]
    calls, _, _ = gpu_fp8._linear_calls(sets, fp8_calls.backend())
    with device_waits() as waits:
        calls["weight per step"](0)
        calls["fp8"](0)
    assert waits == []


def test_host_waits_count_the_calls_syncs_only():
    """`.item()` and `bool()` inside the profiled call count (each a wait on a GPU);
    what the profiler does after the calls does not."""
    t = torch.ones(3)

    def call():
        t.sum().item()
        bool(t.all())

    p = profiling.profiled(call, torch.device("cpu"), calls=2)
    assert profiling.host_waits(p) == 2
    assert profiling.launches(p) is None  # nothing queued on a device
    assert profiling.host_waits(profiling.profiled(lambda: t + 1, torch.device("cpu"))) == 0


def test_launches_count_kernels_copies_and_fills_only():
    """A GPU trace's kernels, copies and fills are the queued work; ranges mirrored on the
    GPU's timeline and synchronizations are not (events as torch.profiler has them)."""
    def event(name, kind):
        return SimpleNamespace(name=name, activity_type=kind, device_type=None)

    events = [event("nvjet_sm90_tst_128x256", "kernel"), event("_quantize_tiles", "kernel"),
              event("Memcpy DtoD (Device -> Device)", "gpu_memcpy"),
              event("Memset (Device)", "gpu_memset"),
              event(profiling.CALL, "gpu_user_annotation"),
              event("Stream Sync", "cuda_sync"), event("aten::mm", "cpu_op"),
              event("cudaLaunchKernel", "cuda_runtime")] * 2
    counted = profiling.launches(profiling.Profile(events, calls=2, on_device=True))
    assert counted == {"kernels": 2, "copies": 2, "total": 4}


def _gpu_trace(linked: bool):
    """A GPU step's trace as torch.profiler gives it: an FP8 GEMM launched by
    aten::_scaled_mm under the FP8 linear, a copy of its scales, a BF16 GEMM; kernels tied to
    their ops by correlation id (`linked`) or only through the ops' kernel lists."""
    def op(id_, name, parent=None, kernels=()):
        return SimpleNamespace(id=id_, name=name, device_type=DeviceType.CPU, cpu_parent=parent,
                               linked_correlation_id=0, activity_type="cpu_op",
                               kernels=[SimpleNamespace(name=k) for k in kernels])

    def kernel(name, launched_by, microseconds):
        k = SimpleNamespace(id=0, name=name, device_type=DeviceType.CUDA, activity_type="kernel",
                            time_range=SimpleNamespace(start=10.0, end=10.0 + microseconds))
        if linked:
            k.linked_correlation_id = launched_by
        return k

    linear = op(1, "FP8Linear")
    events = [linear, op(2, "aten::_scaled_mm", linear, ["nvjet_sm90_qqtst"]),
              op(3, "aten::copy_", linear, ["elementwise_kernel"]),
              op(4, "aten::mm", None, ["nvjet_sm90_tst"]),
              kernel("nvjet_sm90_qqtst", 2, 300.0), kernel("elementwise_kernel", 3, 20.0),
              kernel("nvjet_sm90_tst", 4, 400.0), kernel("nvjet_sm90_qqtst", 2, 300.0)]
    return profiling.Profile(events, calls=2, on_device=True)


@pytest.mark.parametrize("linked", [True, False], ids=["correlation-ids", "kernel-lists"])
def test_device_time_by_family_on_a_gpu_trace(linked):
    """Each kernel's time goes to the family of its name or of the op that launched it;
    per call; the total is the sum of the families."""
    timed = profiling.device_time(_gpu_trace(linked), top=2)
    assert timed["families"] == pytest.approx({"FP8 GEMM": 300e-6, "BF16 GEMM": 200e-6,
                                               "copy / fill": 10e-6})
    assert timed["total"] == pytest.approx(510e-6)
    assert [(t["name"], t["count"]) for t in timed["top"]] == [("nvjet_sm90_qqtst", 1),
                                                               ("nvjet_sm90_tst", 0.5)]


@pytest.mark.parametrize("name, launched_by, family", [
    ("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NTN", ["aten::mm"], "BF16 GEMM"),
    ("nvjet_sm90_qqtst_128x128", ["aten::_scaled_mm"], "FP8 GEMM"),
    ("_block_scaled_gemm", ["FP8Linear"], "FP8 GEMM"),
    ("_quantize_tiles", ["FP8LinearBackward"], "FP8 quantization"),
    ("cutlass3x_sm90_tensorop_gemm_grouped", ["aten::_grouped_mm"], "grouped GEMM"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", ["aten::_efficient_attention_forward"],
     "attention"),
    ("Memcpy DtoD (Device -> Device)", [], "copy / fill"),
    ("void at::native::elementwise_kernel<128, 2>", ["aten::copy_", "aten::_scaled_mm"],
     "copy / fill"),
    ("void at::native::vectorized_elementwise_kernel<4, MulFunctor>", ["aten::mul"],
     "elementwise / reduction"),
    ("void at::native::radixSortKVInPlace", ["aten::sort"], "routing / permutation"),
    ("void at::native::vectorized_elementwise_kernel<4, MulFunctor>",
     ["aten::mul", "autograd::engine::evaluate_function: ScaledDotProductAttentionBackward"],
     "elementwise / reduction"),  # its own name first
    ("void at::native::unrolled_elementwise_kernel", ["aten::add", "aten::_scaled_mm"],
     "elementwise / reduction"),
    ("some_kernel", ["aten::add", "aten::_scaled_mm"], "FP8 GEMM"),  # else the ops above
    ("aten::mm", ["aten::mm", "MyAttentionFunction"], "BF16 GEMM"),  # an op, on the CPU
])
def test_kernel_families(name, launched_by, family):
    assert profiling.family(name, launched_by) == family
