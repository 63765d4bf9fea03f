"""Tests for the multi-rank harness in tests/helpers/multirank.py."""

import multiprocessing
import os
import time

import psutil
import pytest
import torch
import torch.distributed as dist

from tests.helpers import backend
from tests.helpers.multirank import RankFailed, run_ranks


# Rank functions must be module-level: spawn pickles them by name.
def _all_reduce(rank, world_size, base, scale=1.0):
    assert dist.get_rank() == rank and dist.get_world_size() == world_size
    t = torch.full((3,), float(base + rank), device=backend.device()) * scale
    dist.all_reduce(t)
    return rank, t.device.type, t.tolist()


def _raise_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank 1")
    return rank


def _block_rank_1(rank, world_size):
    if rank == 1:
        time.sleep(600)
    dist.barrier()
    return rank


def _exit_on_rank_1(rank, world_size):
    if rank == 1:
        os._exit(3)
    dist.barrier()  # blocks: rank 1 never joins
    return rank


def _expected_sum(world_size, base, scale):
    return scale * sum(base + r for r in range(world_size))


def _live_children():
    """Live processes under this one, minus multiprocessing's resource tracker and the
    fork server the ranks are forked from (both outlive a run by design); the ranks are
    the fork server's children, so they count."""
    def helper(p):  # ranks are forked from the server, so they share its command line
        command = " ".join(p.cmdline())
        return "resource_tracker" in command or (
            "forkserver" in command and p.ppid() == os.getpid())

    return [
        p for p in psutil.Process().children(recursive=True)
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and not helper(p)
    ]


def _tensors_on_the_device(rank, world_size):
    t = torch.arange(3.0, device=backend.device()) + rank
    return {"pair": (t, [t * 2]), "device": t.device.type}


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce_sums_and_keeps_rank_order(world_size):
    # The selected backend (gloo, or NCCL under `make test-gpu`: 4 ranks need 4 GPUs).
    out = run_ranks(_all_reduce, world_size, 10, scale=2.0)
    expected = _expected_sum(world_size, 10, 2.0)
    device = "cuda" if backend.selected() == "nccl" else "cpu"
    assert out == [(r, device, [expected] * 3) for r in range(world_size)]


def test_returned_tensors_come_back_on_the_cpu():
    out = run_ranks(_tensors_on_the_device, 2)
    for rank, r in enumerate(out):
        (t, [doubled]), where = r["pair"], r["device"]
        assert where == ("cuda" if backend.selected() == "nccl" else "cpu")
        assert t.device.type == doubled.device.type == "cpu"
        assert t.tolist() == [rank, rank + 1.0, rank + 2.0] and doubled.tolist() == (t * 2).tolist()


def test_rank_exception_is_reported_with_traceback():
    with pytest.raises(RankFailed) as info:
        run_ranks(_raise_on_rank_1, 2, timeout=60)
    msg = str(info.value)
    assert "rank 1 raised" in msg
    assert "ValueError: boom from rank 1" in msg
    assert "Traceback" in msg and "_raise_on_rank_1" in msg
    assert "1 of 2 ranks failed: [1]" in msg and "--- rank 0" not in msg


def test_timeout_kills_all_ranks():
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"timed out after 5s?") as info:
        run_ranks(_block_rank_1, 2, timeout=5)
    assert time.monotonic() - start < 30
    assert "ranks [0, 1] of 2 had not finished" in str(info.value)
    assert multiprocessing.active_children() == []
    assert _live_children() == []


def test_rank_dying_without_report_gives_exit_code_quickly():
    start = time.monotonic()
    with pytest.raises(RankFailed) as info:
        run_ranks(_exit_on_rank_1, 2, timeout=120)
    elapsed = time.monotonic() - start
    msg = str(info.value)
    assert "rank 1 exited with code 3" in msg
    # Rank 0, stuck in the barrier, is either killed or fails when gloo sees the peer gone.
    assert "ranks [0] were still running" in msg or "--- rank 0 raised" in msg
    assert elapsed < 30, elapsed
    assert multiprocessing.active_children() == []


@pytest.mark.gpu
def test_all_reduce_nccl():
    world_size = min(2, torch.cuda.device_count())
    out = run_ranks(_all_reduce, world_size, 1, backend="nccl")
    assert out == [(r, "cuda", [_expected_sum(world_size, 1, 1.0)] * 3) for r in range(world_size)]
