"""The GPU benchmarks' smoke mode (`python -m bench --smoke gpu_fp8 gpu_moe`): tiny shapes
on whatever device there is (the CPU in CI, where only the `emulated` FP8 backend runs).
Every section runs, every table has its rows, every number is finite, and the tables can
be rebuilt from the JSON file's raw numbers alone."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from bench import gpu_fp8, gpu_moe
from bench.__main__ import main

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu")
    assert main(["--smoke", "--out", str(out), "gpu_fp8", "gpu_moe"]) == 0
    records = {name: json.loads((out / "results" / f"{name}.json").read_text())
               for name in ("gpu_fp8", "gpu_moe")}
    assert all(record["smoke"] for record in records.values())
    return (out / "results.md").read_text(), {k: r["raw"] for k, r in records.items()}


def check_cells(table, label_columns: int) -> None:
    for row in table.rows:
        assert len(row) == len(table.header), (table.title, row)
        for cell in row[label_columns:]:
            assert "failed" not in cell and "nan" not in cell and "inf" not in cell, cell
            numbers = [float(n) for n in NUMBER.findall(cell)]
            assert numbers and all(math.isfinite(n) for n in numbers), cell


def check_times(times) -> None:
    assert isinstance(times, list), times  # a string is the error that stopped it
    assert len(times) == 3 and all(math.isfinite(t) and t > 0 for t in times), times


def misread_by_pytorch_layout(row) -> bool:
    """The GEMMs whose 128x128 B scales PyTorch's own layout hands cuBLAS unpadded, with
    k/128 not a multiple of 4: cuBLAS reads them wrongly (torch 2.11, an H100 and an H200,
    2026-11-26); the `torch` backend pads them (`plugins.fp8.backends._cublas_aligned`)."""
    reduction = row["dims"][2]
    return row["pass"] != "Wgrad" and (reduction // 128) % 4 != 0


def test_fp8_tables(smoke):
    text, raw = smoke
    raw = raw["gpu_fp8"]
    assert "## gpu_fp8" in text
    setup = gpu_fp8.SMOKE
    live = [i for i in setup.impls if i not in raw["unavailable"]]
    if not torch.cuda.is_available():
        assert live == ["emulated"]

    assert len(raw["gemm"]) == 3 * len(setup.weights)
    for row in raw["gemm"]:
        for name in ["bf16", *live]:
            check_times(row["times_s"][name])
        for impl, error in row["max_rel_error"].items():
            if impl == "scaled_mm" and misread_by_pytorch_layout(row):
                continue
            assert isinstance(error, float) and error < 2e-3, (impl, row)
    for row in raw["linear"]:
        for name in ["bf16", *(i for i in live if i != "scaled_mm")]:
            check_times(row["times_s"][name])
    for name in ["copy", *(label for label, _, _ in setup.quantize)]:
        check_times(raw["quantize"]["times_s"][name])

    gemm, errors, linear, quantize = gpu_fp8.result(raw).tables
    assert [r[:2] for r in gemm.rows] == [[f"[{n}, {k}]", p] for n, k in setup.weights
                                          for p in gpu_fp8.PASSES]
    assert len(gemm.header) == 4 + len(live) and len(errors.rows) == len(gemm.rows)
    assert len(linear.rows) == len(setup.weights)
    labels = [r[0] for r in quantize.rows]
    assert labels[0] == "device-to-device copy (bandwidth probe)"
    for label, _, _ in setup.quantize:  # (and the kernel alone, where it runs: on a GPU)
        assert f"as called {label}" in labels
    for table, labels in ((gemm, 3), (errors, 3), (linear, 1), (quantize, 2)):
        check_cells(table, labels)


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
        assert max(errors.values()) < (1e-5 if not torch.cuda.is_available() else 2e-2), errors
    for times in grouped["times_s"].values():
        check_times(times)

    layers, experts = gpu_moe.result(raw).tables
    assert [r[0][:2] for r in layers.rows] == ["A:", "B:", "C:"]
    assert len(experts.rows) == 5
    check_cells(layers, 1)
    check_cells(experts, 1)
