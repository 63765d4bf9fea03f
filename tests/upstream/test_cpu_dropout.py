"""Dropout under tensor parallelism on CPU draws as on GPU: inside the model-parallel RNG
fork each TP rank has its own stream; outside it, the ranks of a TP group agree. On NCCL
ranks (MEGASEEK_TEST_BACKEND=nccl) the same test checks Megatron's own CUDA tracker, the
behaviour the CPU fix copies."""

from __future__ import annotations

import torch

from tests.helpers.multirank import run_ranks


def dropout_masks(rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    import integration  # noqa: F401
    from upstream import cpu

    from megatron.core import parallel_state, tensor_parallel

    from tests.helpers.backend import device

    # CPU semantics on any machine when the tensors are on the CPU; Megatron's own on a GPU.
    patcher = cpu.install(force=True) if device().type == "cpu" else None
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
        torch.manual_seed(1234)  # what Megatron's _set_random_seed does first
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        ones = torch.ones(4096, device=device())
        with tensor_parallel.get_cuda_rng_tracker().fork():
            inside = torch.nn.functional.dropout(ones, p=0.5) > 0
        outside = torch.nn.functional.dropout(ones, p=0.5) > 0
        return inside, outside
    finally:
        parallel_state.destroy_model_parallel()
        if patcher is not None:
            patcher.undo()


def test_tp_ranks_draw_their_own_dropout_masks():
    (inside_0, outside_0), (inside_1, outside_1) = run_ranks(dropout_masks, 2)
    assert not torch.equal(inside_0, inside_1), "TP ranks drew the same mask in the TP region"
    assert torch.equal(outside_0, outside_1), "TP ranks disagree outside the TP region"
    # Both are real dropout masks (about half kept), not all-ones.
    for mask in (inside_0, inside_1, outside_0):
        assert 0.4 < mask.float().mean() < 0.6
