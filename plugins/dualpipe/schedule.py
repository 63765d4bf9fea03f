"""DualPipe and DualPipeV as Megatron forward-backward functions.

`forward_backward(schedule)` returns a function with the keyword interface of Megatron's
schedules (megatron/core/pipeline_parallel/schedules.py) that runs this rank's cells of
`Pipeline.program` in order, each forward and backward through Megatron's own
`forward_step` and `backward_step`, so the loss, its scaling and the MoE and MTP loss
scales are Megatron's.

Megatron's training loop reduces and logs the loss on the last pipeline rank
(training.py:2500, :4266) and broadcasts the token count from it (finalize_model_grads.py
:686). DualPipeV computes the loss on rank 0, DualPipe on both ends; the micro-batches'
loss records are gathered onto the last pipeline rank before the schedule returns, so the
loop works as under 1F1B.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from typing import Any, Callable

import torch

from plugins.dualpipe.comm import Exchange, needed_by
from plugins.dualpipe.placement import sum_embedding_copies
from plugins.dualpipe.program import Cell, Pipeline


def forward_backward(schedule: str, timeline_dir: str | None = None,
                     weight_gradients: Callable[[Any], Callable[[], None]] | None = None,
                     overlap: bool = False):
    """The schedule's Megatron forward-backward function. `weight_gradients(chunk)` takes
    the weight gradients a chunk's last backward deferred (None: nothing defers);
    `overlap` runs the two halves of each F&B cell at once (`plugins.dualpipe.overlap`)."""

    def forward_backward_dual(*, forward_step_func, data_iterator, model, num_microbatches,
                              seq_length, micro_batch_size, decoder_seq_length=None,
                              forward_only=False, collect_non_loss_data=False,
                              first_val_step=None, adjust_tensor_shapes_fn=None,
                              p2p_communicator=None, pg_collection=None,
                              force_all_reduce=False):
        from megatron.core.pipeline_parallel import schedules
        from megatron.core.utils import get_model_config

        if not isinstance(model, list) or len(model) != 2:
            raise RuntimeError(f"{schedule} runs two model chunks per rank; Megatron built "
                               f"{len(model) if isinstance(model, list) else 1}")
        iterators = data_iterator if isinstance(data_iterator, list) else [data_iterator] * 2
        config = get_model_config(model[0])
        if pg_collection is None:
            pg_collection = schedules._build_default_pg_collection()
        pp_group = pg_collection.pp
        rank, ranks = pp_group.rank(), pp_group.size()
        pipeline = Pipeline(schedule, ranks, num_microbatches,
                            split_backward=bool(config.delay_wgrad_compute) and not forward_only)
        pipeline.check()

        shapes = schedules.get_tensor_shapes(
            seq_length=seq_length, micro_batch_size=micro_batch_size,
            decoder_seq_length=decoder_seq_length, config=config, tp_group=pg_collection.tp,
            cp_group=pg_collection.cp)
        if adjust_tensor_shapes_fn is not None:
            shapes, _ = adjust_tensor_shapes_fn(shapes, shapes)
        if len(shapes) != 1:
            raise RuntimeError(f"{schedule} passes one tensor between stages; got shapes {shapes}")
        device = next(model[0].parameters()).device
        programs = [pipeline.program(r, forward_only) for r in range(ranks)]
        exchange = Exchange(pipeline, rank, programs, pp_group,
                            torch.distributed.get_process_group_ranks(pp_group), shapes[0],
                            config.pipeline_dtype, device)

        run = _Run(pipeline, rank, model, iterators, config, exchange, forward_step_func,
                   num_microbatches, pg_collection.cp.size(), forward_only,
                   collect_non_loss_data, first_val_step, weight_gradients, overlap)
        if config.timers is not None:
            config.timers("forward-backward", log_level=1).start(
                barrier=config.barrier_with_L1_time)
        # One pipeline records: the one of the first tensor- and data-parallel rank.
        records = timeline_dir is not None and not forward_only and all(
            getattr(pg_collection, name).rank() == 0 for name in ("tp", "dp_cp"))
        recorder = _Timeline(timeline_dir if records else None, pipeline, rank, pp_group)
        with _grad_sync_held(model, forward_only):
            program = programs[rank]
            exchange.post(needed_by(pipeline, rank, program[0]) if program else [])
            for index, cell in enumerate(program):
                started = recorder.now()
                run.cell(cell)
                recorder.add(cell, started)
                following = program[index + 1] if index + 1 < len(program) else None
                exchange.post(needed_by(pipeline, rank, following) if following else [])
            exchange.finish()
            run.finish_data()
            if not forward_only:
                sum_embedding_copies(model)
                if pipeline.directions == 2:
                    _sum_gradients_of_copies(model, ranks - 1 - rank, pp_group)
                _start_grad_sync(model)
        recorder.close()
        if not forward_only and config.mtp_num_layers:
            _mtp_metrics_on_last_rank(config.mtp_num_layers, pp_group, device)

        losses, num_tokens = _gathered_on_last_rank(run.losses, run.num_tokens, pp_group, device)
        if config.finalize_model_grads_func is not None and not forward_only:
            config.finalize_model_grads_func(
                model, num_tokens if config.calculate_per_token_loss else None,
                pg_collection=pg_collection, force_all_reduce=force_all_reduce)
        if config.timers is not None:
            config.timers("forward-backward").stop()
        return losses

    forward_backward_dual.__name__ = f"forward_backward_{schedule}"
    return forward_backward_dual


class _Run:
    """Runs cells on this rank: Megatron's forward and backward steps, the hand-over
    between a rank's own chunks, and the deferred weight gradients."""

    def __init__(self, pipeline, rank, model, iterators, config, exchange, forward_step_func,
                 num_microbatches, cp_size, forward_only, collect_non_loss_data,
                 first_val_step, weight_gradients, overlap=False) -> None:
        self.pipeline, self.rank, self.model, self.iterators = pipeline, rank, model, iterators
        self.config, self.exchange = config, exchange
        self.forward_step_func, self.num_microbatches = forward_step_func, num_microbatches
        self.cp_size, self.forward_only = cp_size, forward_only
        self.collect_non_loss_data, self.first_val_step = collect_non_loss_data, first_val_step
        self.weight_gradients, self.overlap = weight_gradients, overlap
        self.local: dict = {}  # messages between this rank's own chunks
        self.saved: dict[tuple[int, int], tuple] = {}  # (chunk, microbatch) -> (input, output)
        self.deferred: deque[Callable[[], None]] = deque()
        self.losses: dict[int, list] = {}  # global micro-batch -> its loss records
        self.num_tokens = torch.zeros([], dtype=torch.int)
        self.batches_read = [0] * len(model)  # per chunk, micro-batches taken from its iterator

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
        if cell.op == "FB" and self.overlap:
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
        if self.weight_gradients is not None:
            weight_gradients = self.weight_gradients(self.model[cell.chunk])
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


class _Timeline:
    """With --pipeline-timeline DIR: when each cell of each training step started and
    ended, relative to the step's start (all ranks start it after a barrier), appended to
    DIR/timeline-rank{R}.jsonl (format in runlog.py; `megaseek schedule --from-run DIR`)."""

    def __init__(self, directory: str | None, pipeline: Pipeline, rank: int, pp_group) -> None:
        from plugins.dualpipe import runlog

        self.file = None
        if directory is None:
            return
        os.makedirs(directory, exist_ok=True)
        path = runlog.path_of(directory, rank)
        self.step = runlog.steps_recorded(path)
        self.file = open(path, "a")
        if self.step == 0 and self.file.tell() == 0:
            self.file.write(json.dumps(runlog.header_record(pipeline, rank)) + "\n")
        self.cell_record = runlog.cell_record
        torch.distributed.barrier(group=pp_group)
        self.start = time.perf_counter()

    def now(self) -> float:
        if self.file is not None and torch.cuda.is_available():
            torch.cuda.synchronize()  # a cell's time is its device time
        return time.perf_counter()

    def add(self, cell: Cell, started: float) -> None:
        if self.file is not None:
            record = self.cell_record(self.step, cell, started - self.start, self.now() - self.start)
            self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
