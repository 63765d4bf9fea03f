"""ema_cpu_step: CPU training steps with and without the host EMA, on two models side by
side in one run: bench.cpu_step's tiny dense GPT, and the README demo's MLA + MoE model
(`megaseek demo --mla --moe`: its shapes, on one rank).

Per model:
A  forward + backward + Adam step (and the enabled plugins' after-step callbacks: the
   MoE router's bias update);
B  A, then `HostEMA.step`: the owned weights copied to the host staging buffer and the
   update started on a worker thread (interval 1: an update after every step, so each
   step may wait for the previous update, and that wait is timed);
C  A, then the same update done synchronously (B's work without the overlap).
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from dataclasses import dataclass
from typing import Callable

import integration  # noqa: F401  (first: makes megatron.training importable on 3.11)
import torch

from bench.cpu_step import build_model, make_step
from bench.result import Config, Result, Table
from bench.single_rank import megatron_single_rank
from bench.timing import interleaved, median

DECAY = 0.999
WARMUP, REPS = 3, 30
SMOKE_WARMUP, SMOKE_REPS = 1, 3
DEMO_VOCAB = 384  # the byte vocabulary (257) padded to 128s, as the demo's TP=1 run pads it


class _WaitTimer:
    """Megatron's timer interface (start/stop), adding up the time B's steps wait."""

    def __init__(self) -> None:
        self.total, self.count, self._start = 0.0, 0, 0.0

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> None:
        self.total += time.perf_counter() - self._start
        self.count += 1


def _demo_argv() -> list[str]:
    """The demo's model (`--preset tiny`) with MLA and MoE only, on one rank: TP = EP = 1,
    no MTP, no FP8 dispatch (one rank dispatches nothing), and the CPU flags a CPU launch
    adds."""
    from integration import demo, presets
    from upstream import cpu

    argv = presets.expand(["--preset", "tiny", *demo.TRAINING, "--plugins", "mla", "moe",
                           "--mtp-num-layers", "0", "--expert-model-parallel-size", "1",
                           "--tensor-model-parallel-size", "1"], announce=False)
    argv = [a for a in argv if a != "--moe-fp8-dispatch"]
    return cpu.with_cpu_arguments(argv)


@contextlib.contextmanager
def demo_mla_moe():
    """(model, args, plugins) for the demo's MLA + MoE model, its flags parsed and validated
    by Megatron with the plugins' flags, built from Megatron's block spec with the plugins
    attached as the launch path attaches them (`integration.hooks`: their fixes, their
    specs), which stay attached inside the block."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.training.argument_utils import core_transformer_config_from_args
    from megatron.training.arguments import parse_args, validate_args

    from integration import hooks
    from plugins import default_registry

    registry = default_registry()
    with hooks.megatron_run(registry) as run:
        saved, sys.argv = sys.argv, ["pretrain", *_demo_argv()]
        try:
            args = parse_args(extra_args_provider=registry.add_arguments)
        finally:
            sys.argv = saved
        with contextlib.redirect_stdout(io.StringIO()):  # Megatron's argument dump
            validate_args(args, {})
        plan = hooks.enable(run, model_only=True)
        config = core_transformer_config_from_args(args)
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                          normalization=args.normalization)
        tied = not args.untie_embeddings_and_output_weights
        yield GPTModel(config=config, transformer_layer_spec=spec, vocab_size=DEMO_VOCAB,
                       max_sequence_length=args.max_position_embeddings,
                       share_embeddings_and_output_weights=tied,
                       position_embedding_type=args.position_embedding_type,
                       rotary_base=args.rotary_base), args, plan


def make_demo_step(model, args, plan):
    """Forward, backward, Adam and the plugins' after-step callbacks on one fixed random
    micro-batch of the demo's shape."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    callbacks = [h.on_optimizer_step([model], optimizer)
                 for h in (p.run_hooks() for p in plan.plugins) if h.on_optimizer_step is not None]
    batch, seq = args.micro_batch_size, args.seq_length
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, DEMO_VOCAB, (batch, seq), generator=generator)
    labels = torch.randint(0, DEMO_VOCAB, (batch, seq), generator=generator)
    positions = torch.arange(seq).expand(batch, seq)
    iteration = [0]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(tokens, positions, attention_mask=None, labels=labels).mean().backward()
        optimizer.step()
        iteration[0] += 1
        for callback in callbacks:
            callback(iteration[0])

    return step


@dataclass
class _Measured:
    """One model's three configurations."""

    label: str
    step: Callable[[], None]
    background: object  # HostEMA updated on its worker
    synchronous: object  # HostEMA updated in the step
    waits: _WaitTimer
    per_rank_at_2: int  # values each of 2 ranks owns (DP=2; the demo: EP=2 as well)

    def calls(self, prefix: str) -> dict[str, Callable[[int], None]]:
        iteration = [0]

        def with_background_ema(i):
            self.step()
            iteration[0] += 1
            self.background.step(iteration[0])

        def with_synchronous_ema(i):
            self.step()
            iteration[0] += 1
            self.synchronous.step(iteration[0])
            self.synchronous.wait()

        return {f"{prefix}A": lambda i: self.step(), f"{prefix}B": with_background_ema,
                f"{prefix}C": with_synchronous_ema}


def _measured(label: str, model, step, ranks: int) -> _Measured:
    from plugins.ema.ema import EMAConfig, HostEMA, owned_shards

    step()  # allocates Adam's state
    waits = _WaitTimer()
    # On `ranks` ranks: dense weights split over DP, the demo's experts over EP (expert DP=1).
    per_rank = sum(-(-p.numel() // ranks) for p in model.parameters() if p.requires_grad)
    return _Measured(label, step, HostEMA(owned_shards([model]), EMAConfig(DECAY), lambda: waits),
                     HostEMA(owned_shards([model]), EMAConfig(DECAY)), waits, per_rank)


def _row(m: _Measured, times: dict, prefix: str, warmup: int) -> list[str]:
    a, b, c = (median(times[prefix + k]) for k in "ABC")
    mib = m.background.host_bytes / 2 ** 20
    overhead = f"{(b - a) / a * 100:+.1f}%" if a and b else "n/a"
    reps = len(times[prefix + "B"]) if isinstance(times[prefix + "B"], list) else 0
    return [m.label, f"{m.background.ema.numel():,}", f"{a * 1e3:.2f}" if a else "failed",
            f"{b * 1e3:.2f}" if b else "failed", overhead, f"{c * 1e3:.2f}" if c else "failed",
            f"{m.waits.count} of {reps + warmup}", f"{m.waits.total * 1e3:.3f}",
            f"{mib:.2f}", f"{m.per_rank_at_2 * 4 * 2 / 2 ** 20:.2f}"]


def run(smoke: bool = False) -> Result:
    warmup, reps = (SMOKE_WARMUP, SMOKE_REPS) if smoke else (WARMUP, REPS)
    with megatron_single_rank():
        tiny = build_model()  # before the plugins' specs are attached: a plain GPT
        with demo_mla_moe() as (demo_model, args, plugins):
            models = [_measured("tiny dense GPT", tiny, make_step(tiny), 2),
                      _measured("demo MLA + MoE", demo_model,
                                make_demo_step(demo_model, args, plugins), 2)]
            try:
                times = interleaved({**models[0].calls("tiny "), **models[1].calls("mla-moe ")},
                                    reps=reps, warmup=warmup)
            finally:
                for m in models:
                    m.background.close()
                    m.synchronous.close()

    describe = {"A": "training step", "B": "step + host EMA, update on the worker thread",
                "C": "step + host EMA, update done synchronously"}
    configs = [Config(f"{prefix}{k}", f"{m.label}: {describe[k]}", times[f"{prefix}{k}"])
               for prefix, m in (("tiny ", models[0]), ("mla-moe ", models[1])) for k in "ABC"]
    table = Table(
        "EMA cost per model (B and C against A; waits: B's steps that waited for the "
        "previous update, warm-up included)",
        ["model", "EMA values", "A ms", "B ms", "B vs A", "C ms", "waits", "waited ms",
         "host MiB, 1 rank", "host MiB per rank, 2 ranks"],
        [_row(models[0], times, "tiny ", warmup), _row(models[1], times, "mla-moe ", warmup)],
        right=frozenset(range(1, 10)))
    return Result("ema_cpu_step", configs, [
        "tiny: bench.cpu_step's model and step (GPTModel, local spec, fp32). demo MLA + MoE: "
        "`megaseek demo --mla --moe`'s model (4 layers, hidden 128, MLA with selective "
        "recomputation, 3 MoE layers of 16 experts top-4 and a shared expert) on one rank "
        f"(TP = EP = 1), one micro-batch of {args.micro_batch_size} x {args.seq_length} "
        "tokens, torch Adam, the MoE bias update after each step. EMA decay "
        f"{DECAY}, interval 1; {warmup} warm-up rounds, then {reps} interleaved rounds of "
        "all six configurations.",
        "Host memory: the EMA and its staging buffer, FP32. On one rank the EMA holds every "
        "weight; on 2 ranks (tiny: DP=2; the demo: TP=1, EP=2, DP=2) each rank keeps half "
        "of every dense weight (data parallelism splits it) and its own experts.",
    ], tables=[table])
