"""The F&B overlap (`--overlap-moe-expert-parallel-comm` with the dualpipe schedules).

Oracle: the same cells run one half after the other. Per chunk the overlapped run does
the same computations in the same order (the forward draws the random generator on the
same thread as before, the backward draws none), so results are equal exactly on the CPU.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from plugins import PluginError
from tests.helpers import backend
from tests.helpers.multirank import run_ranks
from tests.helpers.plugin_args import enabled
from tests.plugins.dualpipe.test_pipeline import MLA_MOE_EP2

OVERLAP = ["--overlap-moe-expert-parallel-comm"]


# --- a cell's two halves on two threads and two communicators ---------------------------------

def _moe(x, weight, group):
    """A routed layer through megaseek's dispatch and combine: two fixed experts per token
    (of 4, 2 per rank), each expert `tokens @ weight`."""
    from plugins.moe.dispatch import combine, dispatch

    rows = torch.arange(x.shape[0], device=x.device)
    indices = torch.stack([rows % 4, (rows + 1) % 4], 1)
    gates = torch.full(indices.shape, 0.5, device=x.device)
    sent = dispatch(x, indices, 4, group, fp8=False)
    return combine(sent.tokens @ weight, sent, gates, group)


def _cell(rank, world_size, overlapped: bool):
    """One F&B cell: the forward of chunk 0 and the backward of chunk 1 (whose forward ran
    before), each on its chunk's communicator. Rank 1 starts its backward 0.5 s late, so
    rank 0's backward waits that long in an all-to-all."""
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection

    from plugins.dualpipe.overlap import chunk_process_groups, run_together

    given = ProcessGroupCollection(ep=dist.new_group([0, 1]))
    for_chunk = chunk_process_groups(None)
    chunk0, chunk1 = for_chunk(0, given), for_chunk(1, given)
    assert chunk0 is given and chunk1.ep is not given.ep
    assert dist.get_process_group_ranks(chunk1.ep) == [0, 1]

    torch.manual_seed(rank)  # drawn on the CPU, then moved: the same values on any device
    device = backend.device()
    x0, x1 = torch.randn(8, 16).to(device), torch.randn(8, 16).to(device).requires_grad_()
    w0, w1 = (torch.randn(16, 16).to(device).requires_grad_() for _ in range(2))
    loss1 = _moe(x1, w1, chunk1.ep).square().sum()
    seen: dict = {}

    def forward():
        seen["forward"] = threading.get_ident()
        seen["output"] = _moe(x0, w0, chunk0.ep).detach()
        started = time.perf_counter()
        while time.perf_counter() - started < 0.1:  # the chunk's other compute
            torch.randn(64, 64) @ torch.randn(64, 64)
        seen["computed"] = (started, time.perf_counter())

    def backward():
        seen["backward"] = threading.get_ident()
        if rank == 1:
            time.sleep(0.5)
        started = time.perf_counter()
        loss1.backward()
        if x1.is_cuda:  # on a GPU backward() returns with its kernels queued: wait for them
            torch.cuda.synchronize()
        seen["backward_ran"] = (started, time.perf_counter())

    if overlapped:
        run_together(forward, backward)
    else:
        forward()
        backward()
    return {"output": seen["output"], "grads": (x1.grad, w1.grad),
            "threads_differ": seen["forward"] != seen["backward"],
            "computed": seen["computed"], "backward_ran": seen["backward_ran"]}


def test_the_forward_computes_while_the_other_chunks_all_to_all_is_in_flight():
    sequential = run_ranks(_cell, 2, False)
    overlapped = run_ranks(_cell, 2, True)
    tol = backend.tolerance(gpu=(1e-6, 1e-6), why="combine's backward scatters rows with "
                            "atomic adds on CUDA, so the gradients' summation order varies")
    for alone, together in zip(sequential, overlapped):
        backend.assert_close(together["output"], alone["output"], tol)
        for a, b in zip(alone["grads"], together["grads"]):
            backend.assert_close(b, a, tol)
    rank0 = overlapped[0]
    assert rank0["threads_differ"] and not sequential[0]["threads_differ"]
    (compute_start, compute_end), (backward_start, backward_end) = (rank0["computed"],
                                                                    rank0["backward_ran"])
    # Rank 0's backward sat in chunk 1's all-to-all for rank 1's 0.5 s; the forward's
    # compute ran inside that wait, not after it (as it does one after the other).
    assert backward_end - backward_start > 0.4
    assert backward_start < compute_start and compute_end < backward_end


def test_an_error_in_either_half_reaches_the_caller():
    from plugins.dualpipe.overlap import run_together

    def fail():
        raise ValueError("backward failed")

    with pytest.raises(ValueError, match="backward failed"):
        run_together(lambda: None, fail)


# Through Megatron's loop: tests/plugins/dualpipe/test_pipeline.py's MLA+MoE test runs
# DualPipeV with and without the overlap from one checkpoint and asserts equal losses.


# --- refusals ----------------------------------------------------------------------------------

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "1",
        "--global-batch-size", "8", "--untie-embeddings-and-output-weights",
        "--pipeline-model-parallel-size", "2", "--num-experts", "4",
        "--expert-model-parallel-size", "2", "--plugins", "dualpipe",
        "--pipeline-schedule", "dualpipev"] + OVERLAP


@pytest.fixture
def four_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")


def test_a_valid_overlap_configuration_is_accepted(four_ranks, monkeypatch):
    args, plugins = enabled(BASE, monkeypatch)
    assert [p.name for p in plugins] == ["dualpipe"]
    names = [fix.name for fix in plugins[0].fixes()]
    assert names == ["moe-a2a-overlap-in-dualpipe"]


@pytest.mark.parametrize("extra, named", [
    (["--expert-model-parallel-size", "1"], r"needs --expert-model-parallel-size 2 or more"),
    (["--tensor-model-parallel-size", "2"], r"needs --tensor-model-parallel-size 1 \(got 2\)"),
    (["--context-parallel-size", "2"], r"needs --context-parallel-size 1 \(got 2\)"),
    (["--expert-tensor-parallel-size", "2"], r"needs --expert-tensor-parallel-size 1"),
    (["--recompute-granularity", "selective"], r"cannot be combined with --recompute-granularity"),
    (["--overlap-param-gather"], r"cannot be combined with --overlap-param-gather"),
], ids=["no-ep", "tp", "cp", "etp", "recompute", "param-gather"])
def test_refused_at_start_up_naming_the_flag(extra, named, four_ranks, monkeypatch):
    with pytest.raises(PluginError, match=r"--overlap-moe-expert-parallel-comm.*" + named):
        enabled(BASE + extra, monkeypatch)


def test_megatron_refuses_what_the_fix_lifts_without_it(patcher):
    """What `upstream.overlap` lifts: Megatron's config refuses the flag with its default
    token dispatcher and an fp32 model."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from upstream.overlap import OVERLAP_CONFIG
    from upstream.patching import apply_fixes

    def config():
        return TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                                 num_moe_experts=4, expert_model_parallel_size=2,
                                 overlap_moe_expert_parallel_comm=True)

    with pytest.raises(AssertionError, match="alltoall/flex token dispatcher"):
        config()
    apply_fixes([OVERLAP_CONFIG], patcher)
    assert config().overlap_moe_expert_parallel_comm
    assert not OVERLAP_CONFIG.still_needed()
