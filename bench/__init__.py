"""megaseek's benchmarks: `python -m bench [NAME ...]` (see `bench.registry`)."""
