"""Runs benchmarks from the registry, stores each result and regenerates results.md."""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from bench import machine, report, store
from bench.device import failure
from bench.registry import BENCHMARKS, unmet_need

BENCH_DIR = Path(__file__).parent


def default_out(smoke: bool) -> Path:
    # Smoke runs measure nothing: they go elsewhere, never over the stored measurements.
    return BENCH_DIR / "smoke" if smoke else BENCH_DIR


@dataclass(frozen=True)
class Outcome:
    benchmark: str
    status: str  # "stored", "skipped" or "failed"
    detail: str  # the JSON file, or why it was skipped or failed

    def __str__(self) -> str:
        return f"{self.benchmark}: {self.status}: {self.detail}"


def run_one(name: str, smoke: bool, out: Path) -> Outcome:
    """One benchmark: skipped with the reason where its needs are not met, its JSON file
    written where it ran, and nothing written where it failed (the last result stays)."""
    benchmark = BENCHMARKS[name]
    why = unmet_need(benchmark, smoke)
    if why:
        return Outcome(name, "skipped", why)
    start = time.perf_counter()
    try:
        result = benchmark.load()(smoke)
    except Exception as error:  # noqa: BLE001  (the other benchmarks still run)
        traceback.print_exc()
        return Outcome(name, "failed", failure(error))
    entry = store.record(result, machine.describe(), smoke, time.perf_counter() - start)
    path = store.save(out / "results", entry)
    return Outcome(name, "stored", f"{path} ({entry['wall_s']:.0f} s)")


def regenerate(out: Path) -> Path:
    """`out`/results.md from every JSON file in `out`/results, in the registry's order."""
    stored = store.load_all(out / "results")
    order = [*BENCHMARKS, *sorted(set(stored) - set(BENCHMARKS))]
    records = [stored[name] for name in order if name in stored]
    not_measured = [f"{b.name} (needs {b.needs}): {b.description}"
                    for b in BENCHMARKS.values() if b.name not in stored]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.md"
    path.write_text(report.markdown(records, not_measured))
    return path


def run(names: list[str], smoke: bool, out: Path) -> list[Outcome]:
    outcomes = []
    for name in names:
        print(f"{name}: running", file=sys.stderr, flush=True)
        outcomes.append(run_one(name, smoke, out))
        print(outcomes[-1], flush=True)
    print(f"regenerated {regenerate(out)}", flush=True)
    return outcomes
