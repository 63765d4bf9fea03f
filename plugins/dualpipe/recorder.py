"""`--pipeline-timeline DIR`: the cells each training step ran on this rank, and when.

`DIR/timeline-rank{R}.jsonl`: a header line
    {"schedule": ..., "ranks": P, "microbatches": M, "rank": R, "split_backward": bool}
then one line per cell each training step ran, in the order the rank ran them:
    {"step": k, "op": "F"|"B"|"W"|"FB", "chunk": c, "microbatch": i, "split": bool,
     "start": seconds, "end": seconds}
with times from the step's start (every rank starts a step after a barrier, so times
compare across ranks). An F&B line names its forward; its backward half is the one the
rank's program pairs with it, which a reader takes from the program.

The schedule writes these files (`TimelineRecorder`); `megaseek schedule --from-run DIR`
reads and draws them (`integration.dualpipe_report`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from plugins.dualpipe.program import Cell, Pipeline


def path_of(directory, rank: int) -> Path:
    return Path(directory) / f"timeline-rank{rank}.jsonl"


def header_record(pipeline: Pipeline, rank: int) -> dict:
    return {"schedule": pipeline.schedule, "ranks": pipeline.ranks,
            "microbatches": pipeline.microbatches, "rank": rank,
            "split_backward": pipeline.split_backward}


def cell_record(step: int, cell: Cell, start: float, end: float) -> dict:
    return {"step": step, "op": cell.op, "chunk": cell.chunk, "microbatch": cell.microbatch,
            "split": cell.split, "start": float(start), "end": float(end)}


def read_records(path) -> tuple[dict, dict[int, list[dict]]]:
    """A rank's file: its header and, per step, its cell records in the order it ran them."""
    path = Path(path)
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} is empty")
    steps: dict[int, list[dict]] = {}
    for record in lines[1:]:
        steps.setdefault(record["step"], []).append(record)
    return lines[0], steps


def steps_recorded(path) -> int:
    """How many steps a rank's file holds already (a resumed run appends)."""
    return len(read_records(path)[1]) if Path(path).exists() else 0


class TimelineRecorder:
    """Appends this rank's cells of one training step to its file; with `directory` None
    (no --pipeline-timeline, or a rank that does not record) it records nothing."""

    def __init__(self, directory: str | None, pipeline: Pipeline, rank: int, pp_group) -> None:
        self.file = None
        if directory is None:
            return
        os.makedirs(directory, exist_ok=True)
        path = path_of(directory, rank)
        self.step = steps_recorded(path)
        self.file = open(path, "a")
        if self.step == 0 and self.file.tell() == 0:
            self.file.write(json.dumps(header_record(pipeline, rank)) + "\n")
        torch.distributed.barrier(group=pp_group)
        self.start = time.perf_counter()

    def now(self) -> float:
        if self.file is not None and torch.cuda.is_available():
            torch.cuda.synchronize()  # a cell's time is its device time
        return time.perf_counter()

    def add(self, cell: Cell, started: float) -> None:
        if self.file is not None:
            record = cell_record(self.step, cell, started - self.start, self.now() - self.start)
            self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
