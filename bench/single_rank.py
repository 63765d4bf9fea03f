"""One rank with Megatron's model-parallel state: gloo with megaseek's CPU fixes, or NCCL
on a GPU."""

from __future__ import annotations

import contextlib
import warnings

import integration  # noqa: F401  (first: makes megatron.training importable on 3.11)
import torch
import torch.distributed as dist

from upstream import cpu


@contextlib.contextmanager
def megatron_single_rank(device: torch.device | None = None):
    """TP = PP = EP = 1 on a one-rank group: gloo with megaseek's CPU fixes, or NCCL when
    `device` is a GPU. Everything undone on exit."""
    from megatron.core import parallel_state, tensor_parallel

    on_gpu = device is not None and device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_gpu else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    fixes = None if on_gpu else cpu.install(force=True)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        with warnings.catch_warnings():  # "TE/Apex not installed" and deprecations
            warnings.simplefilter("ignore")
            yield
    finally:
        parallel_state.destroy_model_parallel()
        if fixes is not None:
            fixes.undo()
        dist.destroy_process_group()
