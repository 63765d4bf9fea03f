"""The benchmarks `python -m bench` knows: name -> function returning a `bench.report.Result`."""

from bench import cpu_step

BENCHMARKS = {
    "cpu_step": cpu_step.run,
}
