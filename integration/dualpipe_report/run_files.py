"""A run's timeline files (`--pipeline-timeline DIR`, format in
`plugins.dualpipe.recorder`) read back as a `Timeline` of one step, and simulated
timelines written in that format.
"""

from __future__ import annotations

import json
from pathlib import Path

from plugins.dualpipe.program import Pipeline
from plugins.dualpipe.recorder import cell_record, header_record, path_of, read_records
from plugins.dualpipe.simulator import Span, Timeline


def write_run(directory: Path, steps: list[Timeline]) -> None:
    """Write (simulated) timelines as a run's files, `steps[k]` as step k."""
    pipeline = steps[0].pipeline
    Path(directory).mkdir(parents=True, exist_ok=True)
    for rank in range(pipeline.ranks):
        lines = [json.dumps(header_record(pipeline, rank))]
        for step, timeline in enumerate(steps):
            lines += [json.dumps(cell_record(step, s.cell, s.start, s.end))
                      for s in timeline.rows[rank]]
        path_of(directory, rank).write_text("\n".join(lines) + "\n")


def read_run(directory: Path, step: int | None = None) -> tuple[Timeline, int]:
    """The timeline of one step of a run (the last step every rank finished, unless
    `step` is given) and that step's number. Each rank's cells must be its program's, in
    order: anything else means the files and the schedule disagree (ValueError)."""
    first = path_of(directory, 0)
    if not first.exists():
        raise ValueError(f"no {first.name} in {directory}")
    header, _ = read_records(first)
    pipeline = Pipeline(header["schedule"], header["ranks"], header["microbatches"],
                        header["split_backward"])
    pipeline.check()
    programs = [pipeline.program(rank) for rank in range(pipeline.ranks)]
    records = []
    for rank in range(pipeline.ranks):
        if not path_of(directory, rank).exists():
            raise ValueError(f"no {path_of(directory, rank).name} in {directory}")
        records.append(read_records(path_of(directory, rank))[1])
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
