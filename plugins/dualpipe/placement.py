"""DualPipe's placement: the seam's `Placement` (upstream.seams.placement) with what the
schedules need of the chunks once Megatron has built them.

- DualPipe builds every stage on two ranks (rank r and P-1-r): the second copy starts
  from the first copy's weights, and only the first copy's tensors are the checkpoint's
  and count in the gradient norm (`_same_weights_as_first_copy`).
- DualPipeV's rank 0 (and DualPipe's ends) hold stage 0 and the MTP stage, each with a
  copy of the embedding, which Megatron ties by an all-reduce over a group of ranks and
  cannot tie on one rank (the seam makes that group the first pipeline rank alone): the
  MTP stage's copy starts from stage 0's, and `sum_embedding_copies` gives both the sum of
  their gradients after each backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import wraps
from typing import Any

from upstream.seams.placement import Placement


@dataclass(frozen=True)
class DualPipePlacement(Placement):
    """A `Placement` whose stages may be built twice (`copies` = 2, DualPipe) and whose
    MTP stage may share a rank with stage 0 (DualPipeV): see the module's docstring."""

    def chunk_built(self, rank: int, chunk: int, chunks: dict[int, Any]) -> None:
        holders = self.holders(self.stage(rank, chunk))
        if len(holders) > 1:
            _same_weights_as_first_copy(chunks[chunk], holders, rank)
        first, mtp = _embedding_copies(list(chunks.values()))
        if first is not None and mtp is not None and len(chunks) == self.chunks_per_rank:
            # After every copy of stage 0 holds the same weights (above): the MTP
            # stage's embedding starts from it, as Megatron's all-reduce would make it.
            mtp.embedding.word_embeddings.weight.data.copy_(
                first.embedding.word_embeddings.weight.data)


def _embedding_copies(chunks: list) -> tuple[Any, Any]:
    """This rank's chunk that embeds the input (stage 0) and its chunk that runs MTP on
    another stage (which keeps its own copy of the embedding), or None for either."""
    from megatron.core.utils import get_attr_wrapped_model

    models = [get_attr_wrapped_model(c, "pre_process", return_model_obj=True) for c in chunks]
    first = next((m for m in models if m.pre_process), None)
    mtp = next((m for m in models if getattr(m, "mtp_process", False) and not m.pre_process),
               None)
    return first, mtp


def sum_embedding_copies(chunks: list) -> None:
    """Where this rank holds both stage 0 and the MTP stage (DualPipeV's rank 0), both
    embedding copies take the sum of their gradients (first + MTP, the same bits on every
    rank), as Megatron's embedding all-reduce gives copies on two ranks. Call it on the
    gradient buffers before they are reduced across data-parallel ranks."""
    first, mtp = _embedding_copies(chunks)
    if first is None or mtp is None:
        return
    mine = first.embedding.word_embeddings.weight.main_grad
    other = mtp.embedding.word_embeddings.weight.main_grad
    total = mine + other
    mine.copy_(total)
    other.copy_(total)


def _same_weights_as_first_copy(model, holders: list[tuple[int, int]], rank: int) -> None:
    """A stage built by several ranks: every copy starts from the first copy's weights
    (Megatron seeds each pipeline rank's initialisation differently); only the first
    copy's tensors are the checkpoint's (the others are marked replicas, as Megatron marks
    data-parallel ones) and count in the gradient norm."""
    import torch
    from megatron.core import parallel_state

    group = parallel_state.get_pipeline_model_parallel_group()
    peers = torch.distributed.get_process_group_ranks(group)
    first = holders[0][0]
    for tensor in [*model.parameters(), *model.buffers()]:
        staged = tensor.data if tensor.device.type != "cpu" or not torch.cuda.is_available() \
            else tensor.data.cuda()
        if rank == first:
            for other, _ in holders[1:]:
                torch.distributed.send(staged, peers[other], group=group)
        else:
            torch.distributed.recv(staged, peers[first], group=group)
            tensor.data.copy_(staged)
    if rank != first:
        # Megatron counts a parameter marked shared once (its gradient norm skips it,
        # optimizer/clip_grads.py param_is_not_shared), as for tied embeddings.
        for parameter in model.parameters():
            parameter.shared = True
        sharded_state_dict = model.sharded_state_dict

        @wraps(sharded_state_dict)
        def as_replica(*args, **kwargs):
            return _marked_replica(sharded_state_dict(*args, **kwargs))

        model.sharded_state_dict = as_replica


def _marked_replica(state):
    """The same sharded state with every tensor and object marked as not the main replica
    (Megatron saves a shard from its main replica only)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    for value in nested_values(state):
        if isinstance(value, ShardedBase) and hasattr(value, "replica_id"):
            replica = value.replica_id
            value.replica_id = ((1, *replica[1:]) if isinstance(replica, tuple) and replica
                                else 1)
    return state
