"""DualPipe and DualPipeV as Megatron forward-backward functions.

`forward_backward(schedule)` returns a function with the keyword interface of Megatron's
schedules (megatron/core/pipeline_parallel/schedules.py) that runs this rank's cells of
`Pipeline.program` in order, each forward and backward through Megatron's own
`forward_step` and `backward_step`, so the loss, its scaling and the MoE and MTP loss
scales are Megatron's. Each call is one `Step`, whose fields are Megatron's keywords:
`Step.run` is the step in four numbered phases, `Step.cell` one cell of the program.

Megatron's training loop reduces and logs the loss on the last pipeline rank
(training.py:2500, :4266) and broadcasts the token count from it (finalize_model_grads.py
:686). DualPipeV computes the loss on rank 0, DualPipe on both ends; the micro-batches'
loss records are gathered onto the last pipeline rank before the schedule returns, so the
loop works as under 1F1B.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch

from plugins.dualpipe.comm import Exchange, needed_by
from plugins.dualpipe.placement import sum_embedding_copies
from plugins.dualpipe.program import Cell, Pipeline
from plugins.dualpipe.recorder import TimelineRecorder
from upstream.private_names import DUALPIPE_DEFAULT_GROUPS, require


def forward_backward(schedule: str, timeline_dir: str | None = None,
                     weight_gradients: Callable[[Any], Callable[[], None]] | None = None,
                     overlap: bool = False):
    """The schedule's Megatron forward-backward function: each call runs one `Step`."""
    settings = Settings(schedule, timeline_dir, weight_gradients, overlap)

    def forward_backward_dual(**megatron_keywords) -> list:
        return Step(settings, **megatron_keywords).run()

    forward_backward_dual.__name__ = f"forward_backward_{schedule}"
    return forward_backward_dual


@dataclass(frozen=True)
class Settings:
    """What the plugin's flags fix for every step."""

    schedule: str  # --pipeline-schedule: "dualpipe" or "dualpipev"
    timeline_dir: str | None = None  # --pipeline-timeline: where cells' times are appended
    # With --delay-wgrad-compute: `weight_gradients(chunk)` takes the weight gradients the
    # chunk's last backward deferred (None: nothing defers).
    weight_gradients: Callable[[Any], Callable[[], None]] | None = None
    # --overlap-moe-expert-parallel-comm: the two halves of each F&B cell run at once
    # (`plugins.dualpipe.overlap`).
    overlap: bool = False


@dataclass(eq=False)
class Step:
    """One step of the schedule on this rank, as Megatron's loop calls a schedule: its
    fields are the keywords of Megatron's forward-backward functions (schedules.py:992),
    `run()` the step. Its cells run through Megatron's `forward_step` and
    `backward_step`; messages to other pipeline ranks go through an `Exchange` planned
    from every rank's program."""

    settings: Settings
    forward_step_func: Callable
    data_iterator: Any  # one iterator, or one per model chunk
    model: list  # this rank's two model chunks
    num_microbatches: int
    seq_length: int
    micro_batch_size: int
    decoder_seq_length: int | None = None
    forward_only: bool = False
    collect_non_loss_data: bool = False
    first_val_step: bool | None = None
    adjust_tensor_shapes_fn: Callable | None = None
    p2p_communicator: Any = None  # not used: `exchange` carries the messages
    pg_collection: Any = None  # None: Megatron's default groups
    force_all_reduce: bool = False

    def __post_init__(self) -> None:
        from megatron.core.pipeline_parallel import schedules
        from megatron.core.utils import get_model_config

        schedule = self.settings.schedule
        if not isinstance(self.model, list) or len(self.model) != 2:
            raise RuntimeError(f"{schedule} runs two model chunks per rank; Megatron built "
                               f"{len(self.model) if isinstance(self.model, list) else 1}")
        self.iterators = (self.data_iterator if isinstance(self.data_iterator, list)
                          else [self.data_iterator] * 2)
        self.config = config = get_model_config(self.model[0])
        if self.pg_collection is None:  # Megatron's schedules' own (private) fallback
            require(DUALPIPE_DEFAULT_GROUPS)
            self.pg_collection = schedules._build_default_pg_collection()
        self.pp_group, self.cp_size = self.pg_collection.pp, self.pg_collection.cp.size()
        self.rank, ranks = self.pp_group.rank(), self.pp_group.size()
        self.pipeline = Pipeline(schedule, ranks, self.num_microbatches, split_backward=bool(
            config.delay_wgrad_compute) and not self.forward_only)
        self.pipeline.check()
        self.device = next(self.model[0].parameters()).device
        self.programs = [self.pipeline.program(r, self.forward_only) for r in range(ranks)]
        self.exchange = Exchange(self.pipeline, self.rank, self.programs, self.pp_group,
                                 torch.distributed.get_process_group_ranks(self.pp_group),
                                 self._message_shape(), config.pipeline_dtype, self.device)
        # What the step's cells hand on to each other.
        self.local: dict = {}  # messages between this rank's own chunks
        self.saved: dict[tuple[int, int], tuple] = {}  # (chunk, microbatch) -> (input, output)
        self.deferred: deque[Callable[[], None]] = deque()
        self.losses: dict[int, list] = {}  # global micro-batch -> its loss records
        self.num_tokens = torch.zeros([], dtype=torch.int)
        self.batches_read = [0] * len(self.model)  # per chunk, micro-batches taken so far

    def _message_shape(self) -> tuple:
        """The one tensor shape that travels between stages (Megatron's)."""
        from megatron.core.pipeline_parallel import schedules

        shapes = schedules.get_tensor_shapes(
            seq_length=self.seq_length, micro_batch_size=self.micro_batch_size,
            decoder_seq_length=self.decoder_seq_length, config=self.config,
            tp_group=self.pg_collection.tp, cp_group=self.pg_collection.cp)
        if self.adjust_tensor_shapes_fn is not None:
            shapes, _ = self.adjust_tensor_shapes_fn(shapes, shapes)
        if len(shapes) != 1:
            raise RuntimeError(f"{self.settings.schedule} passes one tensor between stages; "
                               f"got shapes {shapes}")
        return shapes[0]

    def run(self) -> list:
        """The step; returns the micro-batches' loss records on the last pipeline rank
        (empty elsewhere), as Megatron's schedules do."""
        config, timers = self.config, self.config.timers
        if timers is not None:
            timers("forward-backward", log_level=1).start(barrier=config.barrier_with_L1_time)
        recorder = TimelineRecorder(self._timeline_dir(), self.pipeline, self.rank, self.pp_group)
        with _grad_sync_held(self.model, self.forward_only):
            # 1. This rank's cells, in its program's order.
            self._run_program(recorder)
            # 2. Every copy of a stage holds the sum of the copies' gradients; the
            #    data-parallel reduction starts.
            if not self.forward_only:
                self._complete_gradients()
        recorder.close()
        # 3. Loss records, token count and MTP metrics where Megatron's loop reads them.
        if not self.forward_only and config.mtp_num_layers:
            _mtp_metrics_on_last_rank(config.mtp_num_layers, self.pp_group, self.device)
        losses, num_tokens = _gathered_on_last_rank(self.losses, self.num_tokens,
                                                    self.pp_group, self.device)
        # 4. Megatron's end of a step's gradients (finalize_model_grads).
        if config.finalize_model_grads_func is not None and not self.forward_only:
            config.finalize_model_grads_func(
                self.model, num_tokens if config.calculate_per_token_loss else None,
                pg_collection=self.pg_collection, force_all_reduce=self.force_all_reduce)
        if timers is not None:
            timers("forward-backward").stop()
        return losses

    def _timeline_dir(self) -> str | None:
        """Where this rank records its cells: one pipeline records (the one of the first
        tensor- and data-parallel rank), training steps only."""
        records = self.settings.timeline_dir is not None and not self.forward_only and all(
            getattr(self.pg_collection, name).rank() == 0 for name in ("tp", "dp_cp"))
        return self.settings.timeline_dir if records else None

    def _run_program(self, recorder: TimelineRecorder) -> None:
        """This rank's cells in order; the receives each cell needs are posted, with the
        sends queued before it, as the previous cell ends."""
        program, pipeline, rank = self.programs[self.rank], self.pipeline, self.rank
        self.exchange.post(needed_by(pipeline, rank, program[0]) if program else [])
        for index, cell in enumerate(program):
            started = recorder.now()
            self.cell(cell)
            recorder.add(cell, started)
            following = program[index + 1] if index + 1 < len(program) else None
            self.exchange.post(needed_by(pipeline, rank, following) if following else [])
        self.exchange.finish()
        self.finish_data()

    def _complete_gradients(self) -> None:
        """The gradients of every copy of a weight summed, then the data-parallel reduction
        started (Megatron's DDP would have started it during the last backward)."""
        sum_embedding_copies(self.model)
        if self.pipeline.directions == 2:
            _sum_gradients_of_copies(self.model, self.pipeline.ranks - 1 - self.rank,
                                     self.pp_group)
        _start_grad_sync(self.model)

    def _data_at(self, chunk: int, microbatch: int):
        """The chunk's data iterator, moved on to `microbatch` of the step. Every chunk's
        iterator yields the step's micro-batches in order; DualPipe's second direction
        starts half-way (a chunk without data, or a TP rank that reads none, has None)."""
        iterator = self.iterators[chunk]
        if iterator is not None and self.pipeline.directions == 2:
            while self.batches_read[chunk] < microbatch:
                next(iterator)
                self.batches_read[chunk] += 1
            self.batches_read[chunk] += 1  # the one forward_step reads
        return iterator

    def finish_data(self) -> None:
        """Every iterator ends the step past all its micro-batches, whatever its
        direction read."""
        if self.pipeline.directions != 2:
            return
        for chunk, iterator in enumerate(self.iterators):
            while iterator is not None and self.batches_read[chunk] < self.num_microbatches:
                next(iterator)
                self.batches_read[chunk] += 1

    def cell(self, cell: Cell) -> None:
        if cell.op == "FB" and self.settings.overlap:
            self._forward_and_backward(*cell.parts())
            return
        for part in cell.parts():
            if part.op == "F":
                self.forward(part)
            elif part.op == "B":
                self.backward(part)
            else:
                self._weight_gradients(self.deferred.popleft())

    def _forward_and_backward(self, forward: Cell, backward: Cell) -> None:
        """Both halves at once. Their messages are queued afterwards, the forward's first:
        a peer posts its receives in program order, and gloo and NCCL match a pair's
        messages by order."""
        from plugins.dualpipe.overlap import run_together

        sends: tuple[list, list] = ([], [])
        run_together(lambda: self.forward(forward, lambda *m: sends[0].append(m)),
                     lambda: self.backward(backward, lambda *m: sends[1].append(m)))
        for peer, tensor in sends[0] + sends[1]:
            self.exchange.send(peer, tensor)

    def _weight_gradients(self, compute: Callable[[], None]) -> None:
        """Deferred weight gradients are backward compute, timed as Megatron times it."""
        timers = self.config.timers
        if timers is not None:
            timers("backward-compute", log_level=2).start()
        compute()
        if timers is not None:
            timers("backward-compute").stop()

    def _incoming(self, message, source_stage: int, direction: int):
        source, _ = self.pipeline.holder(direction, source_stage)
        if source == self.rank:
            return self.local.pop(message)
        return self.exchange.receive(message)

    def _outgoing(self, message, tensor, target_stage: int, direction: int,
                  send: Callable | None = None) -> None:
        """`send(peer, tensor)` queues a message to another rank (default: the exchange's)."""
        target, _ = self.pipeline.holder(direction, target_stage)
        if target == self.rank:  # the turn of the V: a new leaf, as if received
            self.local[message] = tensor.detach().clone()
        else:
            (send or self.exchange.send)(target, tensor.detach())

    def forward(self, cell: Cell, send: Callable | None = None) -> None:
        from megatron.core.pipeline_parallel import schedules

        direction, stage = self.pipeline.place(self.rank, cell.chunk)
        last = stage == self.pipeline.stages - 1
        input_tensor = None
        if stage > 0:
            input_tensor = self._incoming(("act", direction, stage - 1, cell.microbatch),
                                          stage - 1, direction)
            input_tensor.requires_grad_(not self.forward_only)
        store: list = []
        microbatch = self.pipeline.global_microbatch(direction, cell.microbatch)
        output, num_tokens = schedules.forward_step(
            self.forward_step_func, self._data_at(cell.chunk, microbatch), self.model[cell.chunk],
            self.num_microbatches, input_tensor, store, self.config, self.cp_size,
            collect_non_loss_data=self.collect_non_loss_data,
            is_first_microbatch=schedules.check_first_val_step(
                self.first_val_step, self.forward_only, cell.microbatch == 0),
            current_microbatch=microbatch, vp_stage=cell.chunk, is_last_stage=last)
        if last:
            self.losses[microbatch] = store
            self.num_tokens += num_tokens.cpu()
        else:
            # Megatron's Float16Module upcasts what it takes for the pipeline's last stage
            # (the last rank's last chunk); between stages the pipeline dtype travels.
            output = output.to(self.config.pipeline_dtype)
            self._outgoing(("act", direction, stage, cell.microbatch), output, stage + 1,
                           direction, send)
        if not self.forward_only:
            # Only autograd's graph needs the output now (what was sent is a detached view
            # that keeps its own storage): Megatron frees it as its schedules do.
            schedules.deallocate_output_tensor(output, self.config.deallocate_pipeline_outputs)
            self.saved[(cell.chunk, cell.microbatch)] = (input_tensor, output)

    def backward(self, cell: Cell, send: Callable | None = None) -> None:
        from megatron.core.pipeline_parallel import schedules

        direction, stage = self.pipeline.place(self.rank, cell.chunk)
        input_tensor, output = self.saved.pop((cell.chunk, cell.microbatch))
        output_grad = None
        if stage < self.pipeline.stages - 1:
            output_grad = self._incoming(("grad", direction, stage + 1, cell.microbatch),
                                         stage + 1, direction)
        input_grad = schedules.backward_step(input_tensor, output, output_grad, self.config)
        if self.settings.weight_gradients is not None:
            weight_gradients = self.settings.weight_gradients(self.model[cell.chunk])
            if cell.split:
                self.deferred.append(weight_gradients)
            else:
                self._weight_gradients(weight_gradients)
        if stage > 0:
            self._outgoing(("grad", direction, stage, cell.microbatch), input_grad, stage - 1,
                           direction, send)


@contextlib.contextmanager
def _grad_sync_held(model: list, forward_only: bool):
    """Data-parallel gradient reduction waits until the step's last backward (as
    Megatron's schedules hold it with `no_sync` until the last micro-batch)."""
    with contextlib.ExitStack() as stack:
        if not forward_only:
            for chunk in model:
                stack.enter_context(chunk.no_sync())
        yield


def _sum_gradients_of_copies(model: list, mirror: int, pp_group) -> None:
    """DualPipe: rank r and rank P-1-r hold the same two stages (the same chunk on each),
    one per direction; each stage's gradient, and each per-step count its modules keep,
    is the sum of both copies' (a + b on one side, b + a on the other: the same bits), so
    both copies take the same step."""
    from plugins.common.statistics import step_statistics

    peer = torch.distributed.get_process_group_ranks(pp_group)[mirror]
    for chunk in model:
        # The gradient buffers, and the counts modules keep per step (e.g. expert loads).
        for mine in [buffer.grad_data for buffer in chunk.buffers + chunk.expert_parallel_buffers
                     ] + step_statistics(chunk):
            theirs = torch.empty_like(mine)
            works = torch.distributed.batch_isend_irecv([
                torch.distributed.P2POp(torch.distributed.isend, mine, peer, pp_group),
                torch.distributed.P2POp(torch.distributed.irecv, theirs, peer, pp_group)])
            for work in works:
                work.wait()
            mine.add_(theirs)


def _mtp_metrics_on_last_rank(depth: int, pp_group, device: torch.device) -> None:
    """MTP runs with the loss, on rank 0 (DualPipeV) or on both end ranks (DualPipe), but
    Megatron logs its loss from the last pipeline rank's tracker (training.py:2798): the
    step's MTP records are summed onto that rank and cleared elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    keys = ("loss_values", "correct_values", "total_values")
    records = torch.stack([tracker[k].to(device) if k in tracker
                           else torch.zeros(depth, device=device) for k in keys])
    last = torch.distributed.get_process_group_ranks(pp_group)[-1]
    torch.distributed.reduce(records, dst=last, group=pp_group)
    if pp_group.rank() == pp_group.size() - 1:
        for key, summed in zip(keys, records):
            tracker[key] = summed
        tracker["avg_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
    else:
        for key in keys:
            if key in tracker:
                tracker[key].zero_()


def _start_grad_sync(model: list) -> None:
    """Megatron's DDP with --overlap-grad-reduce launches a chunk's reduction from its
    gradient hooks on the last micro-batch; the gradients are complete only after the
    step's last W, so the reductions are launched here (finalize_model_grads waits)."""
    for chunk in model:
        if chunk.ddp_config.overlap_grad_reduce:
            chunk.start_grad_sync()


def _gathered_on_last_rank(losses: dict[int, list], num_tokens: torch.Tensor, pp_group,
                           device: torch.device) -> tuple[list, torch.Tensor]:
    """Every micro-batch's loss records, in micro-batch order, on the last pipeline rank
    (empty elsewhere), and the step's token count on every pipeline rank."""
    last = torch.distributed.get_process_group_ranks(pp_group)[-1]
    mine = {mb: _to(records, torch.device("cpu")) for mb, records in losses.items()}
    gathered: list | None = [None] * pp_group.size() if pp_group.rank() == pp_group.size() - 1 else None
    torch.distributed.gather_object(mine, gathered, dst=last, group=pp_group)
    tokens = num_tokens.to(device)
    torch.distributed.all_reduce(tokens, group=pp_group)  # only the loss stages count any
    if gathered is None:
        return [], tokens
    merged: dict[int, list] = {}
    for part in gathered:
        merged.update(part)
    return [record for mb in sorted(merged) for record in _to(merged[mb], device)], tokens


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value
