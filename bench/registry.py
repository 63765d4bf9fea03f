"""Every benchmark `python -m bench` knows: its name, its function, what it needs, and a
line on what it measures."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from bench.result import Result

NEEDS = {
    "cpu": "any machine",
    "gpu": "a CUDA GPU (or --smoke: tiny shapes, on the CPU too)",
}


@dataclass(frozen=True)
class Benchmark:
    name: str
    # "module:function", called with `smoke`. Imported only when run, so listing the
    # benchmarks or running the GPU ones does not import the others' Megatron stack.
    function: str
    needs: str  # a key of NEEDS
    description: str

    def load(self) -> Callable[[bool], Result]:
        module, function = self.function.split(":")
        return getattr(importlib.import_module(module), function)


BENCHMARKS = {b.name: b for b in (
    Benchmark("cpu_step", "bench.cpu_step:run", "cpu",
              "dense GPT training step on CPU: targeted CPU fixes vs a global TorchFunctionMode"),
    Benchmark("mla_saved_bytes", "bench.mla:run_saved_bytes", "cpu",
              "bytes one MLA layer saves for backward, per --recompute-modules choice"),
    Benchmark("mla_cpu_time", "bench.mla:run_cpu_time", "cpu",
              "MLA attention forward + backward on CPU: megaseek's vs Megatron-Core's"),
    Benchmark("fp8_saved_bytes", "bench.fp8:run", "cpu",
              "activation bytes FP8 linears and the FP8 SwiGLU MLP keep vs BF16"),
    Benchmark("moe_dispatch_bytes", "bench.moe:run_dispatch_bytes", "cpu",
              "MoE dispatch bytes per token on 4 gloo ranks: FP8 vs BF16, two-hop vs flat"),
    Benchmark("moe_layer_cpu_time", "bench.moe:run_layer_cpu_time", "cpu",
              "MoE layer forward + backward on CPU: DeepSeekMoE vs Megatron-Core's MoELayer"),
    Benchmark("ema_cpu_step", "bench.ema:run", "cpu",
              "dense GPT training step on CPU with and without the host EMA of the weights"),
    Benchmark("dualpipe_bubble", "bench.dualpipe:run_bubble", "cpu",
              "pipeline bubble of 1F1B, interleaved 1F1B, DualPipeV and DualPipe in real "
              "Megatron runs on 2 gloo ranks, and DualPipeV's recorded timeline"),
    Benchmark("dualpipe_layout", "bench.dualpipe:run_layout", "cpu",
              "DualPipeV bubble on 4 gloo ranks: equal stages against a layout balanced "
              "by FLOPs (--pipeline-model-parallel-layout), measured and simulated"),
    Benchmark("dualpipe_chunks", "bench.dualpipe:run_chunks", "cpu",
              "F, B, W and F&B times of a DualPipeV MLA+MoE chunk with EP=2 (4 gloo ranks)"),
    Benchmark("checkpoint_checksums", "bench.checkpoint:run", "cpu",
              "torch_dist save and load with and without megaseek's checksum manifest; "
              "CRC-32, BLAKE2b and SHA-256 throughput"),
    Benchmark("gpu_fp8", "bench.gpu_fp8:run", "gpu",
              "FP8 GEMMs, linears and quantization vs BF16 at DeepSeek-V3's shapes"),
    Benchmark("gpu_layer", "bench.gpu_layer:run", "gpu",
              "DeepSeek-V3-shaped MLA + MoE decoder layer: FP8 vs BF16 vs Megatron's MoELayer"),
    Benchmark("gpu_moe", "bench.gpu_moe:run", "gpu",
              "MoE layer vs Megatron-Core's, and the experts' grouped GEMMs, on a GPU"),
)}


def unmet_need(benchmark: Benchmark, smoke: bool) -> str | None:
    """Why `benchmark` cannot run on this machine, or None."""
    if benchmark.needs == "gpu" and not smoke:
        import torch

        if not torch.cuda.is_available():
            return ("needs a CUDA GPU and this machine has none "
                    "(`python -m bench --smoke` runs its tiny shapes on the CPU)")
    return None


def listing() -> str:
    """`python -m bench --list`: one line a benchmark."""
    width = max(map(len, BENCHMARKS))
    lines = [f"{b.name:<{width}}  needs {b.needs}  {b.description}" for b in BENCHMARKS.values()]
    return "\n".join(lines + ["", "needs: " + "; ".join(f"{k}: {v}" for k, v in NEEDS.items())])
