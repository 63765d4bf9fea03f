"""DeepSeek-V3's DualPipe and DualPipeV pipeline schedules as Megatron schedules.

`--plugins dualpipe --pipeline-schedule dualpipev|dualpipe` (plugin.py): Megatron builds
two model chunks per rank, placed by the registry's placement seam (DualPipeV: stages r
and 2P-1-r of 2P; DualPipe: stages r and P-1-r of P, each stage on two ranks; placement.py
starts a stage's second copy and the MTP stage's embedding copy from the first), and its
training loop calls the schedule (schedule.py) for training and evaluation. The cells
each rank runs come from program.py, which the simulator (simulator.py; drawn by
`megaseek schedule`, integration/dualpipe_report/) times as well.
`--delay-wgrad-compute` splits backwards into input and weight gradients
(plugins/common/wgrad.py); `--pipeline-timeline DIR` records a run's cells (recorder.py).
"""
