"""Interleaved timing: configurations take turns, so drifts in machine load hit all alike."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Callable


def interleaved(step: Callable[[], None],
                configs: dict[str, Callable[[], AbstractContextManager]],
                reps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per `step()` for each configuration, `reps` each.

    A configuration is a context it enters around the step (entering is not timed).
    Round r runs every configuration once, starting from the r-th, so none is always
    first (after a switch) or last.
    """
    names = list(configs)
    for _ in range(warmup):
        for name in names:
            with configs[name]():
                step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            with configs[name]():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return times
