"""Point-to-point traffic of one pipeline step, planned from every rank's program.

Both ends know every rank's program, so each rank knows, per peer, the exact order in
which that peer will send it messages. Receives are posted in that order, which is what
NCCL needs (it matches a pair's messages by order, not by tag) and what gloo accepts; so
no message can be taken for another of the same shape. Sends are posted in the same
batch as the receives the next cell needs (DeepSeek's pattern: a send and the receive it
may be waiting behind never sit in different NCCL groups).
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

import torch

from plugins.dualpipe.program import Cell, Pipeline

# A message is named by what it carries: ("act", direction, stage, microbatch) is the
# output of that stage's forward; ("grad", direction, stage, microbatch) the gradient of
# that stage's input.
Message = tuple[str, int, int, int]


def sent_by(pipeline: Pipeline, rank: int, program: list[Cell]) -> list[tuple[int, Message]]:
    """(destination rank, message) for everything `rank` sends, in its program's order."""
    sends = []
    for cell in program:
        for part in cell.parts():
            direction, stage = pipeline.place(rank, part.chunk)
            if part.op == "F" and stage < pipeline.stages - 1:
                peer, _ = pipeline.holder(direction, stage + 1)
                message = ("act", direction, stage, part.microbatch)
            elif part.op == "B" and stage > 0:
                peer, _ = pipeline.holder(direction, stage - 1)
                message = ("grad", direction, stage, part.microbatch)
            else:
                continue
            if peer != rank:
                sends.append((peer, message))
    return sends


def needed_by(pipeline: Pipeline, rank: int, cell: Cell) -> list[tuple[int, Message]]:
    """(source rank, message) a cell cannot start without; local hand-overs excluded."""
    needs = []
    for part in cell.parts():
        direction, stage = pipeline.place(rank, part.chunk)
        if part.op == "F" and stage > 0:
            peer, _ = pipeline.holder(direction, stage - 1)
            message = ("act", direction, stage - 1, part.microbatch)
        elif part.op == "B" and stage < pipeline.stages - 1:
            peer, _ = pipeline.holder(direction, stage + 1)
            message = ("grad", direction, stage + 1, part.microbatch)
        else:
            continue
        if peer != rank:
            needs.append((peer, message))
    return needs


@dataclass
class _Posted:
    buffer: torch.Tensor
    source: int
    work: object


class Exchange:
    """One step's point-to-point traffic for one rank.

    `group` is the pipeline process group Megatron hands the schedule; `peers` maps
    pipeline ranks to global ranks; every message has `shape` and `dtype` on `device`.
    """

    def __init__(self, pipeline: Pipeline, rank: int, programs: list[list[Cell]],
                 group, peers: list[int], shape, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.pipeline, self.rank, self.group, self.peers = pipeline, rank, group, peers
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        # Per source, the messages it will send here, in its order, not yet posted.
        self._expected: dict[int, deque[Message]] = defaultdict(deque)
        for source in range(pipeline.ranks):
            if source != rank:
                for destination, message in sent_by(pipeline, source, programs[source]):
                    if destination == rank:
                        self._expected[source].append(message)
        self._posted: dict[Message, _Posted] = {}
        self._outgoing: list[tuple[int, torch.Tensor]] = []
        self._in_flight: list[tuple[object, torch.Tensor]] = []  # sends, kept alive

    def send(self, peer: int, tensor: torch.Tensor) -> None:
        """Queued; posted with the next `post`."""
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise RuntimeError(f"pipeline message of shape {tuple(tensor.shape)} and "
                               f"{tensor.dtype}; the pipeline sends {self.shape} {self.dtype}")
        self._outgoing.append((peer, tensor.contiguous()))

    def post(self, needs: list[tuple[int, Message]]) -> None:
        """Posts the queued sends, and receives up to each needed message (in its
        sender's order), in one batch."""
        ops = [torch.distributed.P2POp(torch.distributed.isend, tensor, self.peers[peer],
                                       self.group) for peer, tensor in self._outgoing]
        outgoing, self._outgoing = self._outgoing, []
        sent = [tensor for _, tensor in outgoing]
        receiving: list[Message] = []
        for source, message in needs:
            if message in self._posted:
                continue
            expected = self._expected[source]
            if message not in expected:
                raise RuntimeError(f"pipeline rank {self.rank} waits for {message} from "
                                   f"rank {source}, which never sends it")
            while True:
                upcoming = expected.popleft()
                buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                ops.append(torch.distributed.P2POp(torch.distributed.irecv, buffer,
                                                   self.peers[source], self.group))
                receiving.append(upcoming)
                self._posted[upcoming] = _Posted(buffer, source, None)
                if upcoming == message:
                    break
        if not ops:
            return
        try:
            works = torch.distributed.batch_isend_irecv(ops)
        except RuntimeError as error:  # gloo sends at once: a dead peer can fail the post
            if receiving:
                raise self._not_received(receiving[0], self._posted[receiving[0]].source,
                                         error) from error
            targets = sorted({peer for peer, _ in outgoing})
            raise RuntimeError(f"{self.pipeline.schedule}: pipeline rank {self.rank} could "
                               f"not send to pipeline rank(s) {targets}: {error}") from error
        if len(works) != len(ops):
            # A coalescing backend (NCCL) answers for the batch as a whole: waiting on it
            # only orders the device stream after it, so the host still runs on.
            per_op = [works] * len(ops)
        else:  # gloo: one request per operation; wait for exactly the one needed
            per_op = [[work] for work in works]
        for work, tensor in zip(per_op[:len(sent)], sent):
            self._in_flight.append((work, tensor))
        for work, message in zip(per_op[len(sent):], receiving):
            self._posted[message].work = work

    def receive(self, message: Message) -> torch.Tensor:
        posted = self._posted.pop(message)
        try:
            for work in posted.work:
                work.wait()
        except RuntimeError as error:  # a peer died or timed out: say who waited for what
            raise self._not_received(message, posted.source, error) from error
        return posted.buffer

    def _not_received(self, message: Message, source: int, error: Exception) -> RuntimeError:
        kind, direction, stage, microbatch = message
        what = "activation" if kind == "act" else "input gradient"
        return RuntimeError(
            f"{self.pipeline.schedule}: pipeline rank {self.rank} waited for the {what} "
            f"of stage {stage} (direction {direction}), micro-batch {microbatch}, from "
            f"pipeline rank {source} (global rank {self.peers[source]}), which did not "
            f"send it: {error}")

    def finish(self) -> None:
        """Posts what is still queued and waits for every send."""
        self.post([])
        for works, _ in self._in_flight:
            for work in works:
                work.wait()
        self._in_flight = []
        if self._posted:
            raise RuntimeError(f"pipeline messages received but never used: {sorted(self._posted)}")
