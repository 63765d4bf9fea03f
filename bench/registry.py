"""The benchmarks `python -m bench` knows: name -> function returning a `bench.report.Result`."""

from bench import cpu_step, fp8, gpu_fp8, gpu_moe, mla, moe

BENCHMARKS = {
    "cpu_step": cpu_step.run,
    "mla_saved_bytes": mla.run_saved_bytes,
    "mla_cpu_time": mla.run_cpu_time,
    "fp8_saved_bytes": fp8.run,
    "moe_dispatch_bytes": moe.run_dispatch_bytes,
    "moe_layer_cpu_time": moe.run_layer_cpu_time,
    # GPU only (without CUDA they return a note); `python -m bench.gpu` also writes JSON.
    "gpu_fp8": gpu_fp8.run,
    "gpu_moe": gpu_moe.run,
}
