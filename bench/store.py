"""The results as JSON, one file a benchmark (`<dir>/results/<name>.json`), so a run of
some benchmarks replaces their files and keeps the others'."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from bench.result import Config, Result, Table
from bench.timing import median, quartiles


def _config(config: Config) -> dict:
    """The numbers the table shows (and every repetition's time, for a later look)."""
    entry = {"name": config.name, "description": config.description}
    if isinstance(config.times_s, list):
        q1, q3 = quartiles(config.times_s)
        entry.update(median_s=median(config.times_s), p25_s=q1, p75_s=q3,
                     n=len(config.times_s), times_s=config.times_s)
    elif isinstance(config.times_s, str):
        entry["error"] = config.times_s
    return entry  # neither: dropped, the reason is in the notes


def _table(table: Table) -> dict:
    return {**asdict(table), "right": sorted(table.right)}


def record(result: Result, machine: dict[str, str], smoke: bool, wall_s: float) -> dict:
    """A benchmark's result with what it was measured on: the JSON file's content."""
    entry = {"benchmark": result.benchmark, "machine": machine, "smoke": smoke,
             "wall_s": round(wall_s, 1), "configs": [_config(c) for c in result.configs],
             "tables": [_table(t) for t in result.tables], "notes": result.notes}
    if result.raw is not None:
        entry["raw"] = result.raw
    return entry


def save(results_dir: Path, entry: dict) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{entry['benchmark']}.json"
    path.write_text(json.dumps(entry, indent=1, ensure_ascii=False) + "\n")
    return path


def load_all(results_dir: Path) -> dict[str, dict]:
    """Every stored result, by benchmark name."""
    entries = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    return {entry["benchmark"]: entry for entry in entries}
