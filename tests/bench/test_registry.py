"""`python -m bench`'s registry and its one entry point: every benchmark module's functions
are listed, `--list` prints them, unmet needs are skipped with the reason, and a run stores
its own JSON and regenerates results.md from every stored result."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import torch

from bench import runner
from bench.__main__ import main
from bench.registry import BENCHMARKS, NEEDS

BENCH = Path(runner.__file__).parent


def benchmark_functions() -> set[str]:
    """"module:function" for every top-level `run` / `run_*` function in bench/*.py."""
    found = set()
    for path in BENCH.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and (node.name == "run" or
                                                      node.name.startswith("run_")):
                found.add(f"bench.{path.stem}:{node.name}")
    return found - {"bench.runner:run", "bench.runner:run_one"}  # the runner's own


def test_registry_lists_every_benchmark_function():
    assert sorted(b.function for b in BENCHMARKS.values()) == sorted(benchmark_functions())
    for name, benchmark in BENCHMARKS.items():
        assert benchmark.name == name and benchmark.needs in NEEDS
        assert benchmark.description and "\n" not in benchmark.description


def test_list(capsys):
    assert main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for benchmark in BENCHMARKS.values():
        assert any(line.split()[:3] == [benchmark.name, "needs", benchmark.needs]
                   for line in lines), benchmark.name


def test_gpu_benchmark_without_a_gpu_is_skipped_with_the_reason(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine
    assert main(["--out", str(tmp_path), "gpu_fp8"]) == 0
    assert "gpu_fp8: skipped: needs a CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "results" / "gpu_fp8.json").exists()  # no number, not even a note
    assert "- gpu_fp8 (needs gpu): " in (tmp_path / "results.md").read_text()


def test_smoke_run_regenerates_results_and_keeps_the_others(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    kept = tmp_path / "results" / "cpu_step.json"
    shutil.copy(BENCH / "results" / "cpu_step.json", kept)
    (tmp_path / "results.md").write_text("stale\n")
    before = kept.read_bytes()

    assert main(["--smoke", "--out", str(tmp_path), "fp8_saved_bytes"]) == 0
    assert "fp8_saved_bytes: stored" in capsys.readouterr().out
    assert kept.read_bytes() == before
    record = json.loads((tmp_path / "results" / "fp8_saved_bytes.json").read_text())
    assert record["smoke"] and record["tables"][0]["rows"]
    assert {"machine", "date", "torch", "megatron-core"} <= set(record["machine"])
    text = (tmp_path / "results.md").read_text()
    assert "stale" not in text and "## fp8_saved_bytes" in text and "smoke run" in text
    cpu_step = json.loads(before)["configs"][0]
    assert f"| cpu_step | A: {cpu_step['description']} | " in text


def test_committed_results_md_is_what_the_json_files_generate(tmp_path):
    shutil.copytree(BENCH / "results", tmp_path / "results")
    assert runner.regenerate(tmp_path).read_text() == (BENCH / "results.md").read_text()
