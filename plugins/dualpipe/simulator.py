"""Times the cells of a `Pipeline` (the very cells the real schedules run) in unit time.

Durations are one chunk's, as DeepSeek's table defines them: F a forward, B a whole
backward (input and weight gradients), W its weight part, FB a forward and a backward
overlapped. A split backward is a cell of B - W, its deferred weight gradient a cell of
W. Communication is free. Each rank runs its program in order; a cell starts when the
rank is free and every cell it needs has ended:

    F(d, s, i) needs F(d, s-1, i)                      (s > 0)
    B(d, s, i) needs B(d, s+1, i), or F(d, s, i) on the last stage
    W(d, s, i) needs B(d, s, i)
    FB needs what both its halves need.

Figures per device, in the units of DeepSeek's table (PP = stages of one direction):
- bubble: the step's span minus the device's busy time (its idle time).
- params: model chunks held, in units of one stage (1/PP of the model). DualPipe holds
  every stage twice (2x, the model twice over its PP devices); DualPipeV's 2x is two
  stages of a PP-stage pipeline on each of PP/2 devices: the model once, which is 1x
  of a 1F1B over those same PP/2 devices.
- activations: the peak number of (micro-batch, stage) forward outputs a device keeps
  for their backward: +1 when a forward ends, -1 when its input-gradient backward ends
  (W's saved inputs are not counted, as in the table). The forward half of an F&B cell
  counts before its backward half frees: the +1 of DualPipe's PP+1.

Uneven stages (a `--pipeline-model-parallel-layout`, or measured stage times): one weight
a stage scales every cell of that stage (`stage_weights`); the durations are then a mean
stage's. An F&B cell pairs two stages: F x w_forward + B x w_backward, times FB / (F + B)
where an overlapped FB is given. Weights of 1 change nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType
from typing import Union

from plugins.dualpipe.layout import EMBEDDING, LAYER, LOSS, MTP, StageLayout
from plugins.dualpipe.program import Cell, Pipeline

Time = Union[Fraction, float]


@dataclass(frozen=True)
class Durations:
    """One chunk's times; FB defaults to F + B (no overlap gained)."""

    F: Time = Fraction(1)
    B: Time = Fraction(2)
    W: Time = Fraction(1)
    FB: Time | None = None

    @property
    def fb(self) -> Time:
        return self.F + self.B if self.FB is None else self.FB

    def of(self, cell: Cell) -> Time:
        if cell.op == "B":
            return self.B - self.W if cell.split else self.B
        return {"F": self.F, "W": self.W, "FB": self.fb}[cell.op]


@dataclass(frozen=True)
class Span:
    cell: Cell
    start: Time
    end: Time


@dataclass(frozen=True)
class Timeline:
    """Every rank's cells in the order it ran them, with start and end times (a step
    starts at 0 on every rank)."""

    pipeline: Pipeline
    rows: tuple[tuple[Span, ...], ...]

    @property
    def makespan(self) -> Time:
        return max(span.end for row in self.rows for span in row)

    def busy(self, rank: int) -> Time:
        return sum((span.end - span.start for span in self.rows[rank]), Fraction(0))

    def bubbles(self) -> list[Time]:
        return [self.makespan - self.busy(rank) for rank in range(len(self.rows))]


def _key(pipeline: Pipeline, rank: int, cell: Cell) -> tuple:
    direction, stage = pipeline.place(rank, cell.chunk)
    return cell.op, direction, stage, cell.microbatch


def _needs(pipeline: Pipeline, rank: int, cell: Cell) -> list[tuple]:
    needs = []
    for part in cell.parts():
        op, direction, stage, i = _key(pipeline, rank, part)
        if op == "F" and stage > 0:
            needs.append(("F", direction, stage - 1, i))
        elif op == "B":
            last = stage == pipeline.stages - 1
            needs.append(("F", direction, stage, i) if last else ("B", direction, stage + 1, i))
        elif op == "W":
            needs.append(("B", direction, stage, i))
    return needs


# What a layout's letters cost when not given: a layer each, as the layout counts them.
LAYER_COSTS: Mapping[str, Time] = MappingProxyType(
    {EMBEDDING: Fraction(0), LAYER: Fraction(1), MTP: Fraction(1), LOSS: Fraction(0)})


def stage_weights(layout: StageLayout, costs: Mapping[str, Time] = LAYER_COSTS
                  ) -> tuple[Time, ...]:
    """Each stage's cost (the sum of its letters' `costs`) over the mean stage's, so the
    weights average 1 and the whole step's work is that of equal stages."""
    totals = [sum((costs[letter] for letter in stage), Fraction(0)) for stage in layout.stages]
    whole = sum(totals, Fraction(0))
    if whole <= 0:
        raise ValueError(f"the stages of {layout} cost nothing: give a transformer layer (t) "
                         "a cost above 0")
    return tuple(total * len(totals) / whole for total in totals)


def balanced_layout(pipeline: Pipeline, layers: int, costs: Mapping[str, Time],
                    durations: Durations = Durations(), mtp: int = 0) -> StageLayout:
    """The cut of `layers` transformer layers into the pipeline's stages (at least one a
    stage; the embedding opening the first, the MTP layers and the loss ending the last)
    whose simulated step is shortest with the letters' `costs`. Only the cuts whose
    busiest rank carries the least are simulated; the first shortest of them wins."""
    from itertools import combinations

    stages = pipeline.stages
    if layers < stages:
        raise ValueError(f"{layers} layers cannot give each of {stages} stages one")
    held = [[pipeline.place(rank, chunk)[1] for chunk in range(pipeline.chunks)]
            for rank in range(pipeline.ranks)]
    cuts = []
    for bounds in combinations(range(1, layers), stages - 1):
        counts = [b - a for a, b in zip((0, *bounds), (*bounds, layers))]
        letters = [LAYER * n for n in counts]
        letters[0] = EMBEDDING + letters[0]
        letters[-1] += MTP * mtp + LOSS
        cost = [sum((costs[x] for x in stage), Fraction(0)) for stage in letters]
        cuts.append((max(sum(cost[s] for s in mine) for mine in held), tuple(letters)))
    least = min(load for load, _ in cuts)
    best = None
    for load, letters in cuts:
        if load != least:
            continue
        layout = StageLayout(letters)
        span = simulate(pipeline, durations, stage_weights(layout, costs)).makespan
        if best is None or span < best[0]:
            best = (span, layout)
    return best[1]


def cell_time(pipeline: Pipeline, durations: Durations, rank: int, cell: Cell,
              weights: tuple[Time, ...] | None = None) -> Time:
    """`cell`'s duration on `rank`: `durations.of(cell)`, scaled by its stage's weight
    (the weights are per stage of a direction; DualPipe's two directions run the same
    stages)."""
    if weights is None:
        return durations.of(cell)

    def weight(part: Cell) -> Time:
        return weights[pipeline.place(rank, part.chunk)[1]]

    if cell.op == "FB":
        forward, backward = cell.parts()
        alone = durations.F + durations.B
        return (durations.fb * (weight(forward) * durations.F + weight(backward) * durations.B)
                / alone)
    return durations.of(cell) * weight(cell)


def simulate(pipeline: Pipeline, durations: Durations = Durations(),
             weights: tuple[Time, ...] | None = None) -> Timeline:
    """Run every rank's program as far as its dependencies allow, round after round,
    until all have ended (or none can move: a deadlock, a ValueError naming the cells).
    `weights`: one a stage (`pipeline.stages` of them) scaling its cells, None for equal
    stages."""
    pipeline.check()
    if weights is not None and len(weights) != pipeline.stages:
        raise ValueError(f"{pipeline.schedule} on {pipeline.ranks} ranks runs "
                         f"{pipeline.stages} stages; got {len(weights)} stage weights")
    programs = [pipeline.program(rank) for rank in range(pipeline.ranks)]
    ended: dict[tuple, Time] = {}  # (op, direction, stage, micro-batch) -> end time
    rows: list[list[Span]] = [[] for _ in programs]
    free = [Fraction(0)] * pipeline.ranks
    moved = True
    while moved:
        moved = False
        for rank, program in enumerate(programs):
            while len(rows[rank]) < len(program):
                cell = program[len(rows[rank])]
                needs = _needs(pipeline, rank, cell)
                if any(need not in ended for need in needs):
                    break
                start = max([free[rank]] + [ended[need] for need in needs])
                end = start + cell_time(pipeline, durations, rank, cell, weights)
                for part in cell.parts():
                    ended[_key(pipeline, rank, part)] = end
                rows[rank].append(Span(cell, start, end))
                free[rank] = end
                moved = True
    stuck = {rank: program[len(rows[rank])]
             for rank, program in enumerate(programs) if len(rows[rank]) < len(program)}
    if stuck:
        raise ValueError(f"{pipeline.schedule} deadlocks on {pipeline.ranks} ranks with "
                         f"{pipeline.microbatches} micro-batches; waiting: {stuck}")
    return Timeline(pipeline, tuple(tuple(row) for row in rows))


def params_per_device(pipeline: Pipeline) -> list[int]:
    """Stages held by each device (see the module docstring for the unit)."""
    return [pipeline.chunks] * pipeline.ranks


def peak_activations(cells: list[Cell]) -> int:
    """Largest number of forward outputs a rank holds for their backward, running
    `cells` in order."""
    alive = peak = 0
    for cell in cells:
        for part in cell.parts():  # an F&B's forward allocates before its backward frees
            alive += {"F": 1, "B": -1}.get(part.op, 0)
            peak = max(peak, alive)
    return peak


def published_bubble(schedule: str, stages: int, durations: Durations) -> Time:
    """The bubble column of DeepSeek's table; `stages` is its PP (stages per direction)."""
    d = durations
    if schedule == "1f1b":
        return (stages - 1) * (d.F + d.B)
    if schedule == "zb1p":
        return (stages - 1) * (d.F + d.B - 2 * d.W)
    return (Fraction(stages, 2) - 1) * (d.fb + d.B - 3 * d.W)


def mean_durations(timeline: Timeline) -> Durations:
    """One chunk's F, B (whole: a split one plus the mean W), W and F&B, averaged over a
    (measured) timeline's cells."""
    spans: dict[str, list] = {"F": [], "B": [], "W": [], "FB": []}
    splits = []
    for row in timeline.rows:
        for span in row:
            spans[span.cell.op].append(span.end - span.start)
            if span.cell.op == "B":
                splits.append(span.cell.split)

    def mean(values: list) -> Time:
        return sum(values) / len(values) if values else 0

    w = mean(spans["W"])
    b = mean([t + (w if split else 0) for t, split in zip(spans["B"], splits)])
    f = mean(spans["F"])
    return Durations(f, b, w, mean(spans["FB"]) if spans["FB"] else None)
