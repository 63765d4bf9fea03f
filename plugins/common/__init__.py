"""Building blocks that several plugins use; not a plugin, and it imports none.

- `quantize`, `triton_quantize`, `tiles`: DeepSeek-V3's block-scaled E4M3 format (1x128
  and 128x128 tiles), which the fp8 plugin's GEMMs and the moe plugin's FP8 dispatch
  (`--moe-fp8-dispatch`) both speak;
- `linear.ReplicatedLinear`: a linear whose weight is whole on every tensor-parallel rank
  (MLA's down-projections);
- `experts.LocalExperts`: a rank's routed experts as stacked SwiGLU weights, the `experts`
  slot of the moe plugin's layer spec;
- `groups.process_groups`: Megatron's `pg_collection`, or parallel_state's groups without one;
- `flags.first_refused`: the start-up error for a Megatron flag a plugin's modules do not
  read, given a value of its own; `flags.weights_sharded_past_tp`: the GTP weight sharding
  a run's flags ask for (the fp8 GEMM and the wgrad deferral refuse it);
- `wgrad` (with `wgrad_autograd`, `wgrad_checks`, `parallel_linear`): Megatron's
  `--delay-wgrad-compute` without TE: the linears' weight-gradient GEMMs deferred to a
  schedule's W cell, `take_deferred_weight_gradients(model_chunk)`.

A plugin that changes how these compute does it by spec: the fp8 plugin maps
`ReplicatedLinear` and `LocalExperts` to FP8 subclasses of its own.
"""
