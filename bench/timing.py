"""Timing, once for every benchmark: configurations measured in turns, and the summaries
(median, quartiles) the tables report.

Configurations take turns (round r starts at the r-th), so drifts in clocks or machine load
hit all alike and ratios are measured side by side.
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from typing import Callable

import torch

from bench.device import failure

CPU = torch.device("cpu")
Times = list[float] | str  # seconds per call, or the error that stopped the configuration


def median(times: Times | None) -> float | None:
    return statistics.median(times) if isinstance(times, list) and times else None


def quartiles(times: list[float]) -> tuple[float, float]:
    """(p25, p75) of a timing list."""
    if len(times) < 2:
        return times[0], times[0]
    q1, _, q3 = statistics.quantiles(sorted(times), n=4)
    return q1, q3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def log(label: str, times: dict[str, Times]) -> None:
    """One progress line per measurement on stderr: what a run cut short still shows."""
    parts = [f"{k} {median(t) * 1e3:.3f} ms" if isinstance(t, list) else f"{k} failed"
             for k, t in times.items()]
    print(f"  {label}: " + ", ".join(parts), file=sys.stderr, flush=True)


def interleaved(calls: dict[str, Callable[[int], object]], reps: int, warmup: int,
                device: torch.device = CPU) -> dict[str, Times]:
    """Seconds per call for each configuration, `reps` each, or the error that stopped it.

    Each call gets its running index, so it can rotate among several input sets (inputs
    that fit in L2 would time the cache). On CUDA every call is bracketed by CUDA events
    and nothing synchronizes until the end: the host runs ahead and the times are the
    device's (launch gaps of work that cannot keep the queue full included). On the CPU,
    perf_counter around each call.
    """
    names = list(calls)
    errors: dict[str, str] = {}
    count = dict.fromkeys(names, 0)
    marks: dict[str, list] = {name: [] for name in names}
    cuda = device.type == "cuda"

    def call(name: str, timed: bool) -> None:
        """One call; an error is printed and ends that configuration (the table says why)."""
        if name in errors:
            return
        try:
            if timed and cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                calls[name](count[name])
                end.record()
                marks[name].append((start, end))
            elif timed:
                start = time.perf_counter()
                calls[name](count[name])
                marks[name].append(time.perf_counter() - start)
            else:
                calls[name](count[name])
            count[name] += 1
        except Exception as error:  # noqa: BLE001  (reported in the table)
            errors[name] = failure(error)
            traceback.print_exc()

    for _ in range(warmup):
        for name in names:
            call(name, timed=False)
    synchronize(device)
    live = [n for n in names if n not in errors]
    for r in range(reps):
        k = r % max(len(live), 1)
        for name in live[k:] + live[:k]:
            call(name, timed=True)
    synchronize(device)
    if cuda:
        marks = {n: [s.elapsed_time(e) / 1e3 for s, e in m] for n, m in marks.items()}
    return {name: errors.get(name, marks[name]) for name in names}


def graphed(calls: dict[str, Callable[[int], object]], per_graph: int, reps: int,
            warmup: int, device: torch.device) -> dict[str, Times]:
    """Seconds per call with the host's launch overhead taken out, for short kernels.

    On CUDA each configuration's `per_graph` calls (running indices 0..per_graph-1, to
    rotate inputs) are captured in one CUDA graph, after `warmup` calls on a side stream;
    the replays take turns as in `interleaved`, and each replay's time is divided by
    `per_graph`. A call that synchronizes with the host cannot be captured: its error is
    reported. On the CPU, `interleaved`.
    """
    if device.type != "cuda":
        return interleaved(calls, reps, warmup, device)
    graphs, errors = {}, {}
    for name, fn in calls.items():
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for i in range(warmup):
                    fn(i)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(per_graph):
                    fn(i)
            graphs[name] = graph
        except Exception as error:  # noqa: BLE001  (reported in the table)
            errors[name] = failure(error)
            traceback.print_exc()
    replays = interleaved({n: (lambda i, g=g: g.replay()) for n, g in graphs.items()},
                          reps, 1, device)
    times: dict[str, Times] = dict(errors)
    for name, t in replays.items():
        times[name] = t if isinstance(t, str) else [s / per_graph for s in t]
    return {name: times[name] for name in calls}
