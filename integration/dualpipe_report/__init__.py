"""Pictures and files of pipeline schedules, for `megaseek schedule` and the benchmarks:

- `picture.draw`: a `Timeline` (simulated, or a run's) drawn as the DeepSeek-V3 report
  draws its schedules;
- `run_files.read_run`: a run's `--pipeline-timeline DIR` files (written by the dualpipe
  plugin's `plugins.dualpipe.recorder`) read back as the `Timeline` of one step;
  `run_files.write_run` writes simulated timelines in that format.

The schedules and their simulator are the dualpipe plugin's (`plugins.dualpipe.program`,
`plugins.dualpipe.simulator`); this package only presents them.
"""
