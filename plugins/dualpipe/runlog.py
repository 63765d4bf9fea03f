"""The per-rank timeline files of a run (`--pipeline-timeline DIR`), written and read.

`DIR/timeline-rank{R}.jsonl`: a header line
    {"schedule": ..., "ranks": P, "microbatches": M, "rank": R, "split_backward": bool}
then one line per cell each training step ran, in the order the rank ran them:
    {"step": k, "op": "F"|"B"|"W"|"FB", "chunk": c, "microbatch": i, "split": bool,
     "start": seconds, "end": seconds}
with times from the step's start (every rank starts a step after a barrier, so times
compare across ranks). An F&B line names its forward; its backward half is the one the
rank's program pairs with it, which the reader takes from the program.
"""

from __future__ import annotations

import json
from pathlib import Path

from plugins.dualpipe.program import Pipeline
from plugins.dualpipe.simulator import Span, Timeline


def _path(directory: Path, rank: int) -> Path:
    return Path(directory) / f"timeline-rank{rank}.jsonl"


def path_of(directory, rank: int) -> Path:
    return _path(Path(directory), rank)


def header_record(pipeline: Pipeline, rank: int) -> dict:
    return {"schedule": pipeline.schedule, "ranks": pipeline.ranks,
            "microbatches": pipeline.microbatches, "rank": rank,
            "split_backward": pipeline.split_backward}


def cell_record(step: int, cell, start: float, end: float) -> dict:
    return {"step": step, "op": cell.op, "chunk": cell.chunk, "microbatch": cell.microbatch,
            "split": cell.split, "start": float(start), "end": float(end)}


def steps_recorded(path: Path) -> int:
    """How many steps a rank's file holds already (a resumed run appends)."""
    return len(_read_rank(Path(path))[1]) if Path(path).exists() else 0


def write_run(directory: Path, steps: list[Timeline]) -> None:
    """Write (simulated) timelines as a run's files, `steps[k]` as step k."""
    pipeline = steps[0].pipeline
    Path(directory).mkdir(parents=True, exist_ok=True)
    for rank in range(pipeline.ranks):
        lines = [json.dumps(header_record(pipeline, rank))]
        for step, timeline in enumerate(steps):
            lines += [json.dumps(cell_record(step, s.cell, s.start, s.end))
                      for s in timeline.rows[rank]]
        _path(directory, rank).write_text("\n".join(lines) + "\n")


def _read_rank(path: Path) -> tuple[dict, dict[int, list[dict]]]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} is empty")
    steps: dict[int, list[dict]] = {}
    for record in lines[1:]:
        steps.setdefault(record["step"], []).append(record)
    return lines[0], steps


def read_run(directory: Path, step: int | None = None) -> tuple[Timeline, int]:
    """The timeline of one step of a run (the last step every rank finished, unless
    `step` is given) and that step's number. Each rank's cells must be its program's, in
    order: anything else means the files and the schedule disagree (ValueError)."""
    first = _path(directory, 0)
    if not first.exists():
        raise ValueError(f"no {first.name} in {directory}")
    header, _ = _read_rank(first)
    pipeline = Pipeline(header["schedule"], header["ranks"], header["microbatches"],
                        header["split_backward"])
    pipeline.check()
    programs = [pipeline.program(rank) for rank in range(pipeline.ranks)]
    records = []
    for rank in range(pipeline.ranks):
        if not _path(directory, rank).exists():
            raise ValueError(f"no {_path(directory, rank).name} in {directory}")
        records.append(_read_rank(_path(directory, rank))[1])
    complete = [k for k in records[0]
                if all(len(steps.get(k, ())) == len(programs[rank])
                       for rank, steps in enumerate(records))]
    if step is None:
        if not complete:
            raise ValueError(f"no step in {directory} was finished by all {pipeline.ranks} ranks")
        step = max(complete)
    elif step not in complete:
        raise ValueError(f"step {step} is not complete on every rank; complete: {sorted(complete)}")
    rows = []
    for rank, program in enumerate(programs):
        row = []
        for position, (cell, record) in enumerate(zip(program, records[rank][step])):
            seen = (record["op"], record["chunk"], record["microbatch"], record["split"])
            if seen != (cell.op, cell.chunk, cell.microbatch, cell.split):
                raise ValueError(f"rank {rank}, step {step}, cell {position}: the file has "
                                 f"{seen}, the {pipeline.schedule} program runs {cell}")
            row.append(Span(cell, record["start"], record["end"]))
        rows.append(tuple(row))
    return Timeline(pipeline, tuple(rows)), step
