"""The F&B overlap (`--overlap-moe-expert-parallel-comm`): in an F&B cell, the forward of
one model chunk and the backward of the other run at once, so that one chunk's MoE
dispatch or combine all-to-all is in flight while the other computes.

    run_together(forward, backward)   # forward here, backward on a second thread; joined

Blocking collectives and torch's CPU kernels release the GIL, so one half computes while
the other waits. Correct only because the halves share nothing that orders messages:

- Communicators: chunk 1 is built with its own copies of the groups MoE layers exchange
  tokens on (`chunk_process_groups`), so the two chunks' all-to-alls never interleave on
  one communicator. Every EP peer runs the same program (same pipeline rank), so each
  communicator still sees its chunk's collectives in one order on every rank. Groups of
  one rank need no copy; the plugin refuses larger tensor-, context- and expert-tensor-
  parallel groups, on which both chunks' layers would communicate.
- Pipeline messages: receives are posted before the cell, sends queued by each half and
  posted after it in the F-then-B order the peers expect (`schedule.Step`).
- Process-wide state Megatron's steps touch: the timers (`forward-compute` only in the
  forward, `backward-compute` only in the backward); `set_current_microbatch` and the
  first-micro-batch flag (per chunk); `MoEAuxLossAutoScaler`'s scale (a class attribute the
  forward sets and backward reads: the same value all step); the MoE metrics tracker and
  the rerun state machine (the forward only); the CPU random generator (dropout draws in
  the forward only; the plugin refuses recomputation, whose backward saves and restores
  the generator). The forward stays on the calling thread, with its thread-local state
  (grad mode, autocast, saved-tensor hooks); autograd needs none of it in the backward.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any, Callable

import torch

# The groups MoE layers exchange tokens on (ProcessGroupCollection's names): megaseek's
# layer all-to-alls on `ep`; Megatron's dispatchers on `ep` and `tp_ep`.
DUPLICATED = ("ep", "tp_ep")


def run_together(forward: Callable[[], None], backward: Callable[[], None]) -> None:
    """`forward()` on this thread while `backward()` runs on another; returns when both
    have, raising the first error (the backward's if both failed)."""
    failed: list[BaseException] = []

    def run_backward() -> None:
        try:
            backward()
        except BaseException as error:  # noqa: BLE001 (re-raised on the caller's thread)
            failed.append(error)

    # A daemon: a forward that fails leaves the backward waiting on its peers at most
    # until the process exits (peers fail the same way, or time out).
    worker = threading.Thread(target=run_backward, name="dualpipe-backward", daemon=True)
    worker.start()
    forward()
    worker.join()
    if failed:
        raise failed[0]


def chunk_process_groups(timeout: timedelta | None) -> Callable[[int, Any], Any]:
    """The placement's `process_groups` hook: chunk 0 keeps Megatron's groups; chunk 1 gets
    a copy of them whose `DUPLICATED` groups are new communicators over the same ranks
    (with `timeout`, Megatron's --distributed-timeout-minutes; None: torch's default)."""

    def for_chunk(chunk: int, given):
        if chunk == 0:
            return given
        from megatron.core.process_groups_config import ProcessGroupCollection

        base = given if given is not None else ProcessGroupCollection.use_mpu_process_groups()
        groups = dict(vars(base))  # the fields that are set
        for name in DUPLICATED:
            if groups.get(name) is not None:
                groups[name] = _duplicate(groups[name], timeout)
        return ProcessGroupCollection(**groups)

    return for_chunk


def _duplicate(group, timeout: timedelta | None):
    """A new communicator over `group`'s ranks. Collective over the world: every rank
    learns every rank's group and creates all of them, in one order (`new_group` asks
    that of every rank, members or not)."""
    dist = torch.distributed
    mine = dist.get_process_group_ranks(group)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    copy = None
    for ranks in sorted({tuple(r) for r in everyone}):
        created = dist.new_group(list(ranks), timeout=timeout, backend=dist.get_backend(group))
        if list(ranks) == mine:
            copy = created
    return copy
