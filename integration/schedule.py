"""`megaseek schedule`: a pipeline schedule simulated in unit time, or a real run's
timeline, with its bubble against DeepSeek's formula.

    megaseek schedule --schedule {1f1b,zb1p,dualpipe,dualpipev} --pp P --microbatches M
                      [--f F --b B --w W --fb FB] [--png FILE] [--json]
    megaseek schedule --from-run DIR [--step K] [--png FILE] [--json]

`--pp` counts pipeline ranks, as Megatron's --pipeline-model-parallel-size (DualPipeV
runs 2P stages on them). Durations are one chunk's, as in DeepSeek's table: B a whole
backward, W its weight part, FB a forward and a backward overlapped. The defaults are
the report's figures' (F = B-W = W = 1, F&B = F + B), where the formula is exact.
"""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction

from integration.refusals import Parser, refuse
from plugins.dualpipe.program import SCHEDULES, Pipeline
from plugins.dualpipe.simulator import (Durations, Timeline, mean_durations, params_per_device,
                                        peak_activations, published_bubble, simulate)


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="megaseek schedule", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", choices=SCHEDULES)
    parser.add_argument("--pp", type=int, help="pipeline ranks")
    parser.add_argument("--microbatches", type=int, help="micro-batches per step")
    for flag, default in (("--f", "1"), ("--b", "2")):
        parser.add_argument(flag, type=Fraction, default=Fraction(default))
    # None where not given (W: 1), so a duration the schedule has no cell for is refused.
    parser.add_argument("--w", type=Fraction)
    parser.add_argument("--fb", type=Fraction)
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


def _report(timeline: Timeline, durations: Durations, measured: bool, as_json: bool) -> None:
    pipeline = timeline.pipeline
    bubbles = [_number(b) for b in timeline.bubbles()]
    params = params_per_device(pipeline)
    peaks = [peak_activations([span.cell for span in row]) for row in timeline.rows]
    if as_json:
        print(json.dumps({"schedule": pipeline.schedule, "pp": pipeline.ranks,
                          "devices": pipeline.ranks, "microbatches": pipeline.microbatches,
                          "bubble": bubbles, "params_per_device": params,
                          "peak_activations": peaks}))
        return
    formula = _number(published_bubble(pipeline.schedule, pipeline.stages, durations))
    d = durations
    kind = "measured (seconds)" if measured else "simulated (unit time)"
    print(f"{pipeline.schedule} on {pipeline.ranks} ranks ({pipeline.stages} stages per "
          f"direction), {pipeline.microbatches} micro-batches, {kind}")
    print(f"{'mean ' if measured else ''}durations: F={_number(d.F)} B={_number(d.B)} "
          f"W={_number(d.W)} F&B={_number(d.fb)}; step span {_number(timeline.makespan)}")
    print(f"{'device':>6} {'bubble':>10} {'formula':>10} {'params':>7} {'activations':>12}")
    for rank in range(pipeline.ranks):
        print(f"{rank:>6} {bubbles[rank]:>10} {formula:>10} {params[rank]:>6}x {peaks[rank]:>12}")
    print("bubble: idle time (span minus busy); formula: DeepSeek's table with these "
          "durations; params in stages (1/PP of the model); activations in (micro-batch, "
          "stage) forward outputs held for their backward")


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
        timeline = simulate(_pipeline(args), durations)
        _check_durations_apply(args, timeline)
        title = (f"{timeline.pipeline.schedule}, --pp {timeline.pipeline.ranks}, "
                 f"{timeline.pipeline.microbatches} micro-batches (simulated)")
    _report(timeline, durations, bool(args.from_run), args.json)
    if args.png:
        from integration.dualpipe_report.picture import draw

        draw(timeline, args.png, durations, title)
