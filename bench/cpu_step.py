"""cpu_step: a dense GPT's training step on CPU, megaseek's targeted fixes vs a global mode.

A  `upstream.cpu.install()`: only the Megatron modules that call CUDA see `CpuTorch`
   as their `torch`; every other call goes straight to torch.
B  A plus a global `TorchFunctionMode` that rewrites `device='cuda'` keywords: the
   alternative the targeted fixes avoid, where every torch call detours through Python.
   (It cannot stand alone: `torch.cuda.current_device()` and the RNG calls are not torch
   functions, so no mode sees them; hence the fixes stay installed under it.)
Without any fix the step does not run at all (building the model already stops at the
CUDA RNG tracker), so there is no "no fixes" row.
"""

from __future__ import annotations

import integration  # noqa: F401  (first: makes megatron.training importable on 3.11)
import torch
from torch.overrides import TorchFunctionMode

from bench.result import Config, Result
from bench.single_rank import megatron_single_rank
from bench.timing import interleaved, median
from upstream.cpu_device import cpu_if_cuda

LAYERS, HIDDEN, HEADS = 2, 64, 4
VOCAB, SEQ, MICRO_BATCH = 512, 64, 4
WARMUP, REPS = 3, 30
SMOKE_WARMUP, SMOKE_REPS = 1, 3


class CudaToCpuMode(TorchFunctionMode):
    """Sees every torch call in the process and maps a CUDA `device=` keyword to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs = {**kwargs, "device": cpu_if_cuda(kwargs["device"])}
        return func(*args, **kwargs)


class CallCounter(TorchFunctionMode):
    """Counts the torch calls a global mode would intercept."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def build_model():
    """The dense GPT on this single rank (TP = PP = 1; bench.single_rank seeds the CUDA RNG
    tracker dropout forks)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                               use_cpu_initialization=True)
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(),
                    vocab_size=VOCAB, max_sequence_length=SEQ)


def make_step(model):
    """Forward, backward and Adam step on one fixed random micro-batch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=generator)
    position_ids = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(tokens, position_ids, attention_mask=None, labels=labels).mean()
        loss.backward()
        optimizer.step()

    return step


def under_global_mode(step) -> None:
    # Entering and leaving the mode is timed with the step: microseconds on milliseconds.
    with CudaToCpuMode():
        step()


def run(smoke: bool = False) -> Result:
    warmup, reps = (SMOKE_WARMUP, SMOKE_REPS) if smoke else (WARMUP, REPS)
    with megatron_single_rank():
        step = make_step(build_model())
        step()  # allocates Adam's state
        with CallCounter() as counter:
            step()
        times = interleaved({"A": lambda i: step(), "B": lambda i: under_global_mode(step)},
                            reps=reps, warmup=warmup)

    a, b = median(times["A"]), median(times["B"])
    extra = (f"{(b - a) * 1e6 / counter.calls:.1f} µs more per call than A" if a and b
             else "no time to compare (a configuration failed)")
    return Result("cpu_step", [
        Config("A", "targeted fixes (`upstream.cpu.install()`)", times["A"]),
        Config("B", "targeted fixes + global device-rewriting TorchFunctionMode", times["B"]),
    ], [
        f"GPTModel, local layer spec, {LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, "
        f"vocab {VOCAB}, seq {SEQ}, micro-batch {MICRO_BATCH}, fp32, default dropout; "
        f"step = forward + loss.mean() + backward + torch.optim.Adam; "
        f"{warmup} warm-up rounds, then {reps} interleaved rounds.",
        f"B's mode intercepts {counter.calls} torch calls per step: {extra}.",
        "Without any fix the step cannot run: building the model stops at "
        "megatron/core/tensor_parallel/random.py (CUDA RNG tracker).",
    ])
