"""What the GPU benchmarks share: the device, its description, device-side timing, and
Megatron's model-parallel state on one rank of that device.

On a CPU-only machine the same functions run (perf_counter timing, gloo with megaseek's
CPU fixes), so the benchmarks' smoke modes exercise every code path without a GPU.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import subprocess
import sys
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from typing import Callable

import torch


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "unknown"


def describe(device: torch.device) -> dict[str, str]:
    """The accelerator and the versions that decide its speed (added to bench.machine's)."""
    info = {"device": str(device), "triton": _version("triton")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update({
            "gpu": f"{p.name}, sm{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                   f"{p.total_memory / 2**30:.0f} GiB, L2 {p.L2_cache_size / 2**20:.0f} MiB",
            "cuda (torch build)": str(torch.version.cuda),
            "driver": _driver(),
        })
    return info


def failure(error: BaseException) -> str:
    """One line naming an error, for a table cell; the whole message goes to the notes."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"


def log(label: str, times: dict[str, list[float] | str]) -> None:
    """One progress line per measurement on stderr: what a run cut short still shows."""
    parts = [f"{k} {median(t) * 1e3:.3f} ms" if isinstance(t, list) else f"{k} failed"
             for k, t in times.items()]
    print(f"  {label}: " + ", ".join(parts), file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(calls: dict[str, Callable[[int], object]], reps: int, warmup: int,
                     device: torch.device) -> dict[str, list[float] | str]:
    """Seconds per call for each configuration, `reps` each, or the error that stopped it.

    Configurations take turns (round r starts at the r-th), so drifts in clocks or load hit
    all alike and ratios are measured side by side. Each call gets its running index, so
    it can rotate among several input sets (inputs that fit in L2 would time the cache).
    On CUDA every call is bracketed by CUDA events and nothing synchronizes until the end:
    the host runs ahead and the times are the device's (launch gaps of work that cannot
    keep the queue full included). On the CPU, perf_counter around each call.
    """
    names = list(calls)
    errors: dict[str, str] = {}
    count = dict.fromkeys(names, 0)

    def call(name: str):
        out = calls[name](count[name])
        count[name] += 1
        return out

    for _ in range(warmup):
        for name in names:
            if name not in errors:
                try:
                    call(name)
                except Exception as error:  # noqa: BLE001  (reported in the table)
                    errors[name] = failure(error)
                    traceback.print_exc()
    synchronize(device)
    live = [n for n in names if n not in errors]
    marks: dict[str, list] = {name: [] for name in live}
    for r in range(reps):
        k = r % max(len(live), 1)
        for name in live[k:] + live[:k]:
            if name in errors:
                continue
            try:
                if device.type == "cuda":
                    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                    start.record()
                    call(name)
                    end.record()
                    marks[name].append((start, end))
                else:
                    start = time.perf_counter()
                    call(name)
                    marks[name].append(time.perf_counter() - start)
            except Exception as error:  # noqa: BLE001
                errors[name] = failure(error)
                traceback.print_exc()
    synchronize(device)
    times: dict[str, list[float] | str] = {}
    for name in names:
        if name in errors:
            times[name] = errors[name]
        elif device.type == "cuda":
            times[name] = [s.elapsed_time(e) / 1e3 for s, e in marks[name]]
        else:
            times[name] = marks[name]
    return times


def time_graphed(calls: dict[str, Callable[[int], object]], per_graph: int, reps: int,
                 warmup: int, device: torch.device) -> dict[str, list[float] | str]:
    """Seconds per call with the host's launch overhead taken out, for short kernels.

    On CUDA each configuration's `per_graph` calls (running indices 0..per_graph-1, to
    rotate inputs) are captured in one CUDA graph, after `warmup` calls on a side stream;
    the replays take turns as in `time_interleaved`, and each replay's time is divided by
    `per_graph`. A call that synchronizes with the host cannot be captured: its error is
    reported. On the CPU, `time_interleaved`.
    """
    if device.type != "cuda":
        return time_interleaved(calls, reps, warmup, device)
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
    replays = time_interleaved({n: (lambda i, g=g: g.replay()) for n, g in graphs.items()},
                               reps, 1, device)
    times: dict[str, list[float] | str] = dict(errors)
    for name, t in replays.items():
        times[name] = t if isinstance(t, str) else [s / per_graph for s in t]
    return {name: times[name] for name in calls}


def median(times: list[float] | str | None) -> float | None:
    return statistics.median(times) if isinstance(times, list) and times else None


def spread(times: list[float]) -> tuple[float, float]:
    """(p25, p75) of a timing list."""
    if len(times) < 2:
        return times[0], times[0]
    q1, _, q3 = statistics.quantiles(sorted(times), n=4)
    return q1, q3


def free(device: torch.device) -> None:
    """Give cached blocks back between cases, so one large case does not starve the next
    (modules in reference cycles, as Megatron's, wait for the garbage collector)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@contextlib.contextmanager
def failure_recorded(into: dict, key: str, device: torch.device):
    """Runs the block; an exception is printed and stored as `into[key]` (the table says
    why, and the next case goes on); cached GPU memory is given back either way."""
    try:
        yield
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        into[key] = failure(error)
    finally:
        free(device)


def megatron_on(device: torch.device):
    """TP = PP = EP = 1 on a one-rank group for `device` (bench.single_rank)."""
    from bench.single_rank import megatron_single_rank

    return megatron_single_rank(device)
