"""What each pipeline rank runs, in order: the cells of DualPipe, DualPipeV and the
schedules they are compared with.

One `Program` is shared by the real schedules (`schedule.py` runs its cells through
Megatron's forward and backward steps) and the simulator (`simulator.py` times the same
cells), so a picture of a schedule is a picture of what runs.

Words as the DeepSeek-V3 report uses them: F is a chunk's forward, B its backward (input
and weight gradients; with `split`, the input gradient only), W a deferred weight
gradient, F&B a forward of one chunk paired with a backward of the other, so that one's
communication can hide behind the other's computation.

Stages: a pipeline moves micro-batches through `stages` stages in one direction
(DualPipe has two directions, one entering at each end). `place(rank, chunk)` says which
(direction, stage) a rank's model chunk is.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class Cell:
    op: str  # "F", "B", "W", or "FB" (F on `chunk`, then/overlapped with `backward`)
    chunk: int  # the model chunk on this rank
    microbatch: int  # index within this chunk's direction (0 .. microbatches per direction)
    split: bool = False  # B only: the weight gradient waits for a later W
    backward: "Cell | None" = None  # FB only: its B half

    def parts(self) -> tuple["Cell", ...]:
        """The F and B of an F&B cell, else the cell itself."""
        if self.op == "FB":
            return (Cell("F", self.chunk, self.microbatch), self.backward)
        return (self,)


@dataclass(frozen=True)
class Pipeline:
    """A schedule on `ranks` pipeline ranks with `microbatches` micro-batches per step."""

    schedule: str
    ranks: int
    microbatches: int
    split_backward: bool = True  # B then W (zero-bubble) where the schedule puts W

    @property
    def directions(self) -> int:
        return 2 if self.schedule == "dualpipe" else 1

    @property
    def chunks(self) -> int:
        return 2 if self.schedule in ("dualpipe", "dualpipev") else 1

    @property
    def stages(self) -> int:
        """Stages in each direction."""
        return 2 * self.ranks if self.schedule == "dualpipev" else self.ranks

    @property
    def microbatches_per_direction(self) -> int:
        return self.microbatches // self.directions

    def place(self, rank: int, chunk: int) -> tuple[int, int]:
        """(direction, stage) of a rank's model chunk."""
        p = self.ranks
        if self.schedule == "dualpipev":  # a V: down the ranks, then back up
            return 0, (rank if chunk == 0 else 2 * p - 1 - rank)
        if self.schedule == "dualpipe":
            # Chunk 0 is the direction that enters nearer to this rank (the reference's
            # phases are written for it), chunk 1 the other.
            near = 0 if rank < p // 2 else 1
            direction = near if chunk == 0 else 1 - near
            return direction, (rank if direction == 0 else p - 1 - rank)
        return 0, rank

    def holder(self, direction: int, stage: int) -> tuple[int, int]:
        """(rank, chunk) that runs a stage of a direction."""
        for rank in range(self.ranks):
            for chunk in range(self.chunks):
                if self.place(rank, chunk) == (direction, stage):
                    return rank, chunk
        raise ValueError(f"no rank holds stage {stage} of direction {direction}")

    def global_microbatch(self, direction: int, microbatch: int) -> int:
        """DualPipe sends the first half of the micro-batches down, the second half up."""
        return direction * self.microbatches_per_direction + microbatch

    def program(self, rank: int, forward_only: bool = False) -> list[Cell]:
        if forward_only:  # every chunk-0 forward first: no chunk waits on a later one
            n = self.microbatches_per_direction
            return [Cell("F", c, i) for c in range(self.chunks) for i in range(n)]
        build = _BUILDERS[self.schedule]
        return build(self, rank)

    def check(self) -> None:
        """The constraints each schedule has on its sizes (ValueError naming them)."""
        p, n = self.ranks, self.microbatches
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; one of {', '.join(SCHEDULES)}")
        if p < 2:
            raise ValueError(f"{self.schedule} needs at least 2 pipeline ranks; got {p}")
        if self.schedule == "dualpipe" and p % 2:
            raise ValueError(f"dualpipe needs an even number of pipeline ranks; got {p}")
        smallest = self.smallest_microbatches(self.schedule, p)
        if n < smallest or (self.schedule == "dualpipe" and n % 2):
            raise ValueError(f"{self.schedule} on {p} pipeline ranks needs at least {smallest}"
                             f"{' (and an even number of)' if self.schedule == 'dualpipe' else ''}"
                             f" micro-batches per step; got {n}")

    @staticmethod
    def smallest_microbatches(schedule: str, ranks: int) -> int:
        return 2 * ranks if schedule in ("dualpipe", "dualpipev") else 1


class _Recorder:
    """Appends cells for a rank's model chunks, numbering each chunk's forwards and
    backwards in order and queueing split backwards for their W."""

    def __init__(self, split_backward: bool) -> None:
        self.cells: list[Cell] = []
        self.split_backward = split_backward
        self._forwards: dict[int, int] = {}
        self._backwards: dict[int, int] = {}
        self._deferred: deque[tuple[int, int]] = deque()

    def _next(self, counters: dict[int, int], chunk: int) -> int:
        index = counters.get(chunk, 0)
        counters[chunk] = index + 1
        return index

    def forward_cell(self, chunk: int) -> Cell:
        return Cell("F", chunk, self._next(self._forwards, chunk))

    def backward_cell(self, chunk: int, split: bool = False) -> Cell:
        split = split and self.split_backward
        cell = Cell("B", chunk, self._next(self._backwards, chunk), split=split)
        if split:
            self._deferred.append((chunk, cell.microbatch))
        return cell

    def F(self, chunk: int) -> None:
        self.cells.append(self.forward_cell(chunk))

    def B(self, chunk: int, split: bool = False) -> None:
        self.cells.append(self.backward_cell(chunk, split))

    def W(self) -> None:
        if self.split_backward:  # without the split there is nothing left to run
            chunk, microbatch = self._deferred.popleft()
            self.cells.append(Cell("W", chunk, microbatch))

    def FB(self, forward_chunk: int, backward_chunk: int) -> None:
        forward = self.forward_cell(forward_chunk)
        backward = self.backward_cell(backward_chunk)
        self.cells.append(Cell("FB", forward.chunk, forward.microbatch, backward=backward))


def _v_phases(ranks: int, rank: int, microbatches: int, split_backward: bool) -> list[Cell]:
    """DualPipeV's eight phases on `ranks` ranks (2 x ranks stages), for `rank`; chunk 0
    is stage `rank` (on the way down), chunk 1 stage 2 x ranks - 1 - rank (on the way
    back). DualPipe runs the same phases on each half of its ranks."""
    p, r, n = ranks, rank, microbatches
    last = r == p - 1  # turns the V around: its chunk 0 feeds its chunk 1 directly
    run = _Recorder(split_backward)

    # Phase 1, nF0: fill the way down.
    for _ in range(2 * (p - r - 1)):
        run.F(0)
    # Phase 2, nF0F1: a forward on the way down, one on the way back.
    for _ in range(r + 1):
        run.F(0)
        run.F(1)
    # Phase 3, nB1W1F1: the first backwards come back; their W fill the wait.
    for _ in range(p - r - 1):
        run.B(1, split=True)
        run.W()
        run.F(1)
    # Phase 4 (main), nF0B1F1B0: a forward of one chunk with a backward of the other.
    for i in range(n - 2 * p + r + 1):
        if i == 0 and last:  # not overlapped: B1 needs this very F0's output
            run.F(0)
            run.B(1)
        else:
            run.FB(0, 1)
        run.FB(1, 0)
    # Phase 5, nB1F1B0: no forwards left on the way down.
    for _ in range(p - r - 1):
        run.B(1)
        run.FB(1, 0)
    # Phase 6, nB1B0: drain; the second half splits its backwards.
    split = False
    for i in range(r + 1):
        if i == (r + 1) // 2 and r % 2 == 1:
            split = True
        run.B(1, split=split)
        if i == (r + 1) // 2 and r % 2 == 0:
            split = True
        run.B(0, split=split)
    # Phase 7, nWB0: a W while waiting for each last backward.
    for _ in range(p - r - 1):
        run.W()
        run.B(0, split=True)
    # Phase 8, nW: the remaining weight gradients.
    for _ in range(r + 1):
        run.W()
    return run.cells


def _dualpipev(pipeline: Pipeline, rank: int) -> list[Cell]:
    return _v_phases(pipeline.ranks, rank, pipeline.microbatches, pipeline.split_backward)


def _dualpipe(pipeline: Pipeline, rank: int) -> list[Cell]:
    # Ranks r and P-1-r play the same part, each for the direction entering nearer to it.
    half = pipeline.ranks // 2
    return _v_phases(half, min(rank, pipeline.ranks - 1 - rank),
                     pipeline.microbatches_per_direction, pipeline.split_backward)


def _one_f_one_b(pipeline: Pipeline, rank: int) -> list[Cell]:
    """Megatron's 1F1B: warm-up forwards, then one forward and one backward in turn."""
    p, r, n = pipeline.ranks, rank, pipeline.microbatches
    warmup = min(p - r - 1, n)
    run = _Recorder(split_backward=False)
    for _ in range(warmup):
        run.F(0)
    for _ in range(n - warmup):
        run.F(0)
        run.B(0)
    for _ in range(warmup):
        run.B(0)
    return run.cells


def _zb1p(pipeline: Pipeline, rank: int) -> list[Cell]:
    """Zero-bubble ZB-H1 (Qi et al. 2023): 1F1B with split backwards. Rank r holds back
    its first r weight gradients, so that its input gradients, which the ranks above wait
    for, run early; the held W fill the cool-down (one after each backward), where 1F1B
    idles. The bubble is (P-1)(F+B-2W) where W <= F and W <= B-W (tested)."""
    p, r, n = pipeline.ranks, rank, pipeline.microbatches
    warmup = min(p - r - 1, n)
    run = _Recorder(pipeline.split_backward)
    for _ in range(warmup):
        run.F(0)
    for i in range(n - warmup):
        run.F(0)
        run.B(0, split=True)
        if i >= r:  # the first r stay held
            run.W()
    for _ in range(warmup):
        run.B(0, split=True)
        run.W()
    for _ in range(min(r, n - warmup)):  # the rest of the held ones
        run.W()
    return run.cells


_BUILDERS: dict[str, Callable[[Pipeline, int], list[Cell]]] = {
    "1f1b": _one_f_one_b,
    "zb1p": _zb1p,
    "dualpipe": _dualpipe,
    "dualpipev": _dualpipev,
}
