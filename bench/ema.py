"""ema_cpu_step: a dense GPT's CPU training step with and without the host EMA.

A  forward + backward + Adam step (bench.cpu_step's model and step);
B  A, then `HostEMA.step`: the owned weights copied to the host staging buffer and the
   update started on a worker thread (interval 1: an update after every step, so each
   step may wait for the previous update);
C  A, then the same update done synchronously (B's work without the overlap).
"""

from __future__ import annotations

import time

import integration  # noqa: F401  (first: makes megatron.training importable on 3.11)

from bench.cpu_step import build_model, make_step
from bench.result import Config, Result
from bench.single_rank import megatron_single_rank
from bench.timing import interleaved, median

DECAY = 0.999
WARMUP, REPS = 3, 30
SMOKE_WARMUP, SMOKE_REPS = 1, 3


class _WaitTimer:
    """Megatron's timer interface (start/stop), adding up the time B's steps wait."""

    def __init__(self) -> None:
        self.total, self.count, self._start = 0.0, 0, 0.0

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> None:
        self.total += time.perf_counter() - self._start
        self.count += 1


def run(smoke: bool = False) -> Result:
    from plugins.ema.ema import EMAConfig, HostEMA, owned_shards

    warmup, reps = (SMOKE_WARMUP, SMOKE_REPS) if smoke else (WARMUP, REPS)
    waits = _WaitTimer()
    with megatron_single_rank():
        model = build_model()
        step = make_step(model)
        step()  # allocates Adam's state
        background = HostEMA(owned_shards([model]), EMAConfig(DECAY), lambda: waits)
        synchronous = HostEMA(owned_shards([model]), EMAConfig(DECAY))
        iteration = [0]

        def with_background_ema(i):
            step()
            iteration[0] += 1
            background.step(iteration[0])

        def with_synchronous_ema(i):
            step()
            iteration[0] += 1
            synchronous.step(iteration[0])
            synchronous.wait()

        try:
            times = interleaved({"A": lambda i: step(), "B": with_background_ema,
                                 "C": with_synchronous_ema}, reps=reps, warmup=warmup)
        finally:
            background.close()
            synchronous.close()

    a, b = median(times["A"]), median(times["B"])
    overhead = (f"{(b - a) / a * 100:+.1f}% step time with the EMA (B vs A)" if a and b
                else "no time to compare (a configuration failed)")
    numel = background.ema.numel()
    return Result("ema_cpu_step", [
        Config("A", "training step", times["A"]),
        Config("B", "training step + host EMA, update on the worker thread", times["B"]),
        Config("C", "training step + host EMA, update done synchronously", times["C"]),
    ], [
        "bench.cpu_step's model and step (GPTModel, local spec, fp32, one rank); EMA "
        f"decay {DECAY}, interval 1; {warmup} warm-up rounds, then {reps} interleaved rounds.",
        f"{overhead}; B waited for the previous update {waits.count} times, "
        f"{waits.total * 1e3:.3f} ms in all.",
        f"Host memory of the EMA on this rank: {numel} FP32 values, EMA + staging buffer "
        f"{background.host_bytes / 2**20:.2f} MiB.",
    ])
