"""The DualPipe and DualPipeV pipeline schedules as Megatron schedules, not implemented yet.

Will replace the forward-backward function Megatron picks in
`get_forward_backward_func` (1F1B or interleaved) with DualPipe's bidirectional
schedule, which overlaps the forward and backward chunks of two micro-batch streams, or
its single-direction V variant. Nothing here is registered until it works.
"""
