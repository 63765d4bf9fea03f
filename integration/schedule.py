"""`megaseek schedule`: a pipeline schedule simulated in unit time, or a real run's
timeline, with its bubble against DeepSeek's formula.

    megaseek schedule --schedule {1f1b,zb1p,dualpipe,dualpipev} --pp P --microbatches M
                      [--f F --b B --w W --fb FB] [--png FILE] [--json]
                      [--pipeline-model-parallel-layout LAYOUT [--layer-costs E=..,L=..]
                       | --stage-weights W0,W1,...]
    megaseek schedule --from-run DIR [--step K] [--png FILE] [--json]

`--pp` counts pipeline ranks, as Megatron's --pipeline-model-parallel-size (DualPipeV
runs 2P stages on them). Durations are one chunk's, as in DeepSeek's table: B a whole
backward, W its weight part, FB a forward and a backward overlapped. The defaults are
the report's figures' (F = B-W = W = 1, F&B = F + B), where the formula is exact.

Uneven stages: `--pipeline-model-parallel-layout` (Megatron's letters: E embedding, t
transformer layer, m MTP layer, L loss and head; `|` between stages, as many stages as
the schedule runs: 2P for DualPipeV, P otherwise) with `--layer-costs` (each letter's
relative cost; default t=1, m=1, E=0, L=0), or `--stage-weights` (one relative cost a
stage). Each stage's cells are scaled by its cost over the mean stage's, so the
durations given are a mean stage's and the step's work is that of equal stages.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from fractions import Fraction

from integration.refusals import Parser, refuse
from plugins.dualpipe.layout import LAYER, LAYOUT_FLAG, MTP, LayoutError, StageLayout
from plugins.dualpipe.program import SCHEDULES, Pipeline
from plugins.dualpipe.simulator import (LAYER_COSTS, Durations, Timeline, mean_durations,
                                        params_per_device, peak_activations, published_bubble,
                                        simulate, stage_weights)


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="megaseek schedule", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    # Megatron's names too, so a run's flags can be pasted.
    parser.add_argument("--schedule", "--pipeline-schedule", dest="schedule", choices=SCHEDULES)
    parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int,
                        help="pipeline ranks")
    parser.add_argument("--microbatches", type=int, help="micro-batches per step")
    for flag, default in (("--f", "1"), ("--b", "2")):
        parser.add_argument(flag, type=Fraction, default=Fraction(default))
    # None where not given (W: 1), so a duration the schedule has no cell for is refused.
    parser.add_argument("--w", type=Fraction)
    parser.add_argument("--fb", type=Fraction)
    parser.add_argument(LAYOUT_FLAG, "--layout", dest="layout", metavar="LAYOUT",
                        help="each stage's layers, as Megatron's flag: e.g. 'Et|tt|tt|tL'")
    parser.add_argument("--layer-costs", metavar="X=C,...",
                        help="with a layout: relative cost of E, t, m, L (default "
                             "t=1,m=1,E=0,L=0)")
    parser.add_argument("--stage-weights", metavar="W0,W1,...",
                        help="one relative cost a stage, instead of a layout")
    parser.add_argument("--png", help="draw the timeline into this PNG file")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--from-run", metavar="DIR", help="a run's --pipeline-timeline DIR")
    parser.add_argument("--step", type=int, help="with --from-run: the step to draw")
    return parser


def _pipeline(args: argparse.Namespace) -> Pipeline:
    for flag in ("schedule", "pp", "microbatches"):
        if getattr(args, flag) is None:
            refuse(f"--{flag} is required (or --from-run DIR)")
    p, n, schedule = args.pp, args.microbatches, args.schedule
    if p < 2:
        refuse(f"--pp must be at least 2 for {schedule}; got {p}")
    if schedule == "dualpipe" and p % 2:
        refuse(f"--pp must be even for dualpipe (one half per direction); got {p}, use {p + 1}")
    smallest = Pipeline.smallest_microbatches(schedule, p)
    if n < smallest:
        refuse(f"--microbatches must be at least {smallest} for {schedule} with --pp {p}; got {n}")
    if schedule == "dualpipe" and n % 2:
        refuse(f"--microbatches must be even for dualpipe (half per direction); got {n}, "
              f"use {n + 1}")
    return Pipeline(schedule, p, n)


def _durations(args: argparse.Namespace) -> Durations:
    w = Durations.W if args.w is None else args.w
    if args.f <= 0 or args.b <= 0:
        refuse("--f and --b must be above 0")
    if not 0 <= w <= args.b:
        refuse(f"--w must be between 0 and --b ({args.b}); got {w}")
    if args.fb is not None and args.fb <= 0:
        refuse(f"--fb must be above 0; got {args.fb}")
    return Durations(args.f, args.b, w, args.fb)


def _fraction(flag: str, text: str) -> Fraction:
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        refuse(f"{flag}: {text!r} is not a number")
    if value < 0:
        refuse(f"{flag}: {text} is below 0")
    return value


def _layer_costs(text: str | None) -> dict[str, Fraction]:
    """--layer-costs 'E=0.5,L=2': the letters given, the others at their defaults."""
    costs = dict(LAYER_COSTS)
    if text is None:
        return costs
    for item in text.split(","):
        letter, sep, value = item.partition("=")
        letter = letter.strip()
        if not sep or letter not in costs:
            refuse(f"--layer-costs {text}: give LETTER=COST pairs separated by commas, the "
                   f"letters {', '.join(costs)} (e.g. E=0.1,L=1.5)")
        costs[letter] = _fraction("--layer-costs", value.strip())
    return costs


def _weights(args: argparse.Namespace, pipeline: Pipeline) -> tuple[str, tuple | None]:
    """(what the printout says of the stages, each stage's weight or None if equal)."""
    if args.layer_costs is not None and args.layout is None:
        refuse(f"--layer-costs prices the letters of {LAYOUT_FLAG}: give a layout, or drop it")
    if args.stage_weights is not None:
        if args.layout is not None:
            refuse(f"--stage-weights and {LAYOUT_FLAG} both give the stages' costs: keep one")
        weights = tuple(_fraction("--stage-weights", w.strip())
                        for w in args.stage_weights.split(","))
        if len(weights) != pipeline.stages:
            refuse(f"--stage-weights {args.stage_weights} gives {len(weights)} stages; "
                   f"{pipeline.schedule} on --pp {pipeline.ranks} runs {pipeline.stages}: "
                   f"give {pipeline.stages} weights")
        if not sum(weights):
            refuse(f"--stage-weights {args.stage_weights}: every stage costs 0")
        mean = sum(weights) / len(weights)
        return f"stage weights {args.stage_weights}", tuple(w / mean for w in weights)
    if args.layout is None:
        return "equal stages", None
    try:
        with warnings.catch_warnings():  # megatron's import-time notes about TE and Apex
            warnings.simplefilter("ignore")
            layout = StageLayout.parse(args.layout)
        if pipeline.schedule in ("1f1b", "zb1p") and len(layout.stages) != pipeline.stages:
            raise LayoutError(f"{LAYOUT_FLAG} {layout} has {len(layout.stages)} stages; "
                              f"{pipeline.schedule} on --pp {pipeline.ranks} runs "
                              f"{pipeline.stages} (one a rank): give {pipeline.stages} stages "
                              "separated by '|'")
        # The layout's own layer counts: the simulator has no --num-layers to hold it to.
        layout.check(pipeline.stages, layout.count(LAYER), layout.count(MTP),
                     pipeline.schedule, pipeline.ranks)
    except LayoutError as error:
        refuse(str(error))
    costs = _layer_costs(args.layer_costs)
    try:
        weights = stage_weights(layout, costs)
    except ValueError as error:
        refuse(f"--layer-costs: {error}")
    said = ",".join(f"{letter}={_number(cost)}" for letter, cost in costs.items())
    return f"layout {layout}, costs {said}", weights


# The duration flags that time a kind of cell other than F and B (which every schedule has).
_CELL_FLAGS = (("w", "W", "separate weight-gradient (W) cell (its B is the whole "
                          "backward)"),
               ("fb", "FB", "overlapped forward-and-backward (F&B) cell"))


def _check_durations_apply(args: argparse.Namespace, timeline: Timeline) -> None:
    """A duration flag of a cell the simulated pipeline never runs would change nothing."""
    ops = {span.cell.op for row in timeline.rows for span in row}
    for dest, op, cell in _CELL_FLAGS:
        if getattr(args, dest) is not None and op not in ops:
            pipeline = timeline.pipeline
            refuse(f"--{dest} {_number(getattr(args, dest))}: {pipeline.schedule} with --pp "
                   f"{pipeline.ranks} and --microbatches {pipeline.microbatches} has no "
                   f"{cell}, so --{dest} would change nothing: drop it")


def _number(x) -> float | int:
    x = float(x)
    return int(x) if x.is_integer() else round(x, 6)


def _stages_held(pipeline, rank: int) -> str:
    """The stages a rank runs, its chunks in order (DualPipe: one of each direction)."""
    return ",".join(str(pipeline.place(rank, chunk)[1]) for chunk in range(pipeline.chunks))


def _report(timeline: Timeline, durations: Durations, measured: bool, as_json: bool,
            stages: str = "equal stages", weights: tuple | None = None) -> None:
    pipeline = timeline.pipeline
    bubbles = [_number(b) for b in timeline.bubbles()]
    busy = [_number(timeline.busy(rank)) for rank in range(pipeline.ranks)]
    params = params_per_device(pipeline)
    peaks = [peak_activations([span.cell for span in row]) for row in timeline.rows]
    if as_json:
        print(json.dumps({"schedule": pipeline.schedule, "pp": pipeline.ranks,
                          "devices": pipeline.ranks, "microbatches": pipeline.microbatches,
                          "stage_weights": [_number(w) for w in weights or
                                            [1] * pipeline.stages],
                          "busy": busy, "bubble": bubbles, "params_per_device": params,
                          "peak_activations": peaks}))
        return
    formula = _number(published_bubble(pipeline.schedule, pipeline.stages, durations))
    d = durations
    kind = "measured (seconds)" if measured else "simulated (unit time)"
    per = " per direction" if pipeline.directions == 2 else ""
    print(f"{pipeline.schedule} on {pipeline.ranks} ranks ({pipeline.stages} stages{per}), "
          f"{pipeline.microbatches} micro-batches, {kind}")
    cells = [("F", d.F), ("B", d.B)] + [("W", d.W)] * (pipeline.schedule != "1f1b") + [
        ("F&B", d.fb)] * (pipeline.chunks == 2)  # the cells this schedule runs
    print(f"{'mean ' if measured else ''}durations: "
          + " ".join(f"{name}={_number(value)}" for name, value in cells)
          + f"; step span {_number(timeline.makespan)}")
    if weights is not None:
        print(f"{stages}; stage weights (cost over the mean stage's, scaling the "
              "durations): " + " ".join(f"{_number(w):g}" for w in weights))
    print(f"{'device':>6} {'stages':>7} {'busy':>10} {'bubble':>10} {'formula':>10} "
          f"{'params':>7} {'activations':>12}")
    for rank in range(pipeline.ranks):
        print(f"{rank:>6} {_stages_held(pipeline, rank):>7} {busy[rank]:>10} "
              f"{bubbles[rank]:>10} {formula:>10} {params[rank]:>6}x {peaks[rank]:>12}")
    print("bubble: idle time (span minus busy); formula: DeepSeek's table with these "
          "durations (equal stages); params in stages (1/PP of the model); activations in "
          "(micro-batch, stage) forward outputs held for their backward")


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    if args.png:  # before any work, as every refusal
        from plugins.common.paths import unwritable_file

        problem = unwritable_file(args.png)
        if problem:
            refuse(f"--png {args.png}: {problem}")
        if not args.png.lower().endswith(".png"):
            # the drawing is always written as PNG: another suffix would misname the file
            refuse(f"--png {args.png}: the timeline is drawn as PNG; give a file name "
                   "ending in .png")
    if args.from_run:
        from integration.dualpipe_report.run_files import read_run

        if any(v is not None for v in (args.schedule, args.pp, args.microbatches)):
            refuse("--from-run reads --schedule, --pp and --microbatches from DIR; drop them")
        for flag, value in ((LAYOUT_FLAG, args.layout), ("--layer-costs", args.layer_costs),
                            ("--stage-weights", args.stage_weights)):
            if value is not None:
                refuse(f"{flag}: --from-run draws the cells as measured, each as long as it "
                       "ran; drop it")
        try:
            timeline, step = read_run(args.from_run, args.step)
        except (ValueError, OSError) as error:
            refuse(f"--from-run {args.from_run}: {error}")
        durations = mean_durations(timeline)
        title = f"{timeline.pipeline.schedule}, run {args.from_run}, step {step}"
    else:
        if args.step is not None:
            refuse("--step needs --from-run DIR")
        durations = _durations(args)
        pipeline = _pipeline(args)
        stages, weights = _weights(args, pipeline)
        timeline = simulate(pipeline, durations, weights)
        _check_durations_apply(args, timeline)
        title = (f"{timeline.pipeline.schedule}, --pp {timeline.pipeline.ranks}, "
                 f"{timeline.pipeline.microbatches} micro-batches (simulated)")
    if args.from_run:
        stages, weights = "as measured", None
    _report(timeline, durations, bool(args.from_run), args.json, stages, weights)
    if args.png:
        from integration.dualpipe_report.picture import draw

        draw(timeline, args.png, durations, title)
