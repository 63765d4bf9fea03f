"""A benchmark's result and its markdown tables."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Config:
    name: str  # short label, e.g. "A"
    description: str
    times_s: list[float] | None  # None: dropped, the reason is in the notes


@dataclass(frozen=True)
class Table:
    """A table of its own (not timings), printed under the benchmark's heading."""

    title: str
    header: list[str]
    rows: list[list[str]]
    right: frozenset[int] = frozenset()  # right-aligned (numeric) column indices


@dataclass(frozen=True)
class Result:
    benchmark: str
    configs: list[Config]  # the first is the baseline the ratios divide by; may be empty
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _row(benchmark: str, config: Config, baseline_median: float | None) -> str:
    if config.times_s is None:
        return f"| {benchmark} | {config.name}: {config.description} | dropped | | | |"
    t = sorted(config.times_s)
    median = statistics.median(t)
    q1, _, q3 = statistics.quantiles(t, n=4)
    ratio = f"{median / baseline_median:.2f}" if baseline_median else ""
    return (f"| {benchmark} | {config.name}: {config.description} | {_ms(median)} "
            f"| {_ms(q1)}–{_ms(q3)} | {len(t)} | {ratio} |")


def _table(table: Table) -> list[str]:
    lines = [f"{table.title}:", "", "| " + " | ".join(table.header) + " |",
             "|" + "|".join("---:" if i in table.right else "---"
                            for i in range(len(table.header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    return lines


def markdown(machine: dict[str, str], results: list[Result]) -> str:
    lines = ["# megaseek benchmarks", ""]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    timed = [result for result in results if result.configs]
    if timed:
        lines += ["", "Repetitions of a benchmark's configurations are interleaved in one run; "
                  "the ratio is each median over the first configuration's.", "",
                  "| benchmark | configuration | median ms | p25–p75 ms | n | ratio |",
                  "|---|---|---:|---:|---:|---:|"]
    for result in timed:
        base = result.configs[0].times_s
        base_median = statistics.median(base) if base else None
        lines += [_row(result.benchmark, c, base_median) for c in result.configs]
    for result in results:
        if result.tables:
            lines += ["", f"## {result.benchmark}"]
        for table in result.tables:
            lines += [""] + _table(table)
        if result.notes:
            lines += ["", f"Notes on {result.benchmark}:", ""]
            lines += [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"
