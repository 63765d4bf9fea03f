"""What a benchmark's function returns: its timed configurations, tables and notes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Config:
    name: str  # short label, e.g. "A"
    description: str
    # Seconds per repetition; a string is the error that stopped it; None: dropped, the
    # reason is in the notes.
    times_s: list[float] | str | None


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
    raw: dict | None = None  # every number behind the tables, JSON-able, where kept
