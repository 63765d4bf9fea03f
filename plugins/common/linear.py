"""A linear layer whose weight is whole on every tensor-parallel rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from plugins.common.wgrad import sink_for, wgrad_store
from plugins.common.wgrad_autograd import split_backward


class ReplicatedLinear(MegatronModule):
    """y = x W^T with W whole on every TP rank (MLA's down-projections).

    Under sequence parallelism each rank sees a different sequence shard, so the weight's
    gradient is partial: `sequence_parallel` on the weight makes Megatron all-reduce it
    across the TP group, as it does for layer-norm weights.
    """

    def __init__(self, input_size: int, output_size: int, *, config, init_method, **unused):
        super().__init__(config)
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size,
                                                     dtype=config.params_dtype))
        if config.perform_initialization:
            with tensor_parallel.get_cuda_rng_tracker().fork(
                    tensor_parallel.random.get_data_parallel_rng_tracker_name()):
                init_method(self.weight)
        self.weight.sequence_parallel = config.sequence_parallel
        self.deferred_wgrads = wgrad_store(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sink = sink_for(self, self.weight)
        if sink is None:
            return F.linear(x, self.weight)
        return split_backward(sink, F.linear, x, self.weight)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True),
                                                   prefix, {}, sharded_offsets)
