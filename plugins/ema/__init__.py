"""An exponential moving average of the weights kept in CPU memory, not implemented yet.

Will attach to the optimizer step (Megatron has no weight EMA) and update a CPU copy of
each rank's parameter shard asynchronously after every step, so that the EMA costs no
GPU memory and little step time, and save it with Megatron's checkpoints. Nothing here
is registered until it works.
"""
