"""DeepSeek-V3's EMA of the weights: an FP32 copy in host memory, updated in the background
after each optimizer step.

Each rank keeps the EMA of the weights it owns. With Megatron's distributed optimizer that
is its shard of the FP32 main parameters; otherwise each data-parallel group splits every
parameter (a TP/PP/EP shard already) into contiguous flat ranges, one per rank. So the EMA
of a rank is one flat FP32 buffer, the concatenation of its `Shard`s.

After step i (Megatron's iteration) with decay d, interval N and start iteration K:

    i <  K:             ema = w_i                       (the EMA tracks the weights)
    i >= K, N divides i: ema = d * ema + (1 - d) * w_i
    otherwise:           unchanged

An update copies the owned weights to a host staging buffer (on GPU: a side stream into
pinned memory) and applies the formula on a worker thread, one thread per update, so no
thread outlives its update. At most one update is in flight: a due update first waits
for the previous one (the wait is timed). A failed update is raised in the training
process at the next step (`EMAWorkerFailed`, with the worker's traceback).
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from upstream.private_names import EMA_PARAM_RANGE_MAP, require


class EMAWorkerFailed(RuntimeError):
    """The background EMA update raised; the message holds its traceback."""


@dataclass
class Shard:
    """This rank's part of one parameter: `param.view(-1)[start:end]`."""

    param: torch.nn.Parameter  # the model's parameter (already a TP/PP/EP shard)
    start: int
    end: int
    source: torch.Tensor  # 1-D, end - start values: the weights the EMA follows
    group: Any  # the process group whose ranks split `param` (None: this rank alone)

    @property
    def numel(self) -> int:
        return self.end - self.start


def _group_rank_size(group) -> tuple[int, int]:
    import torch.distributed as dist

    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _split_group(param) -> Any:
    """The data-parallel group that holds replicas of `param` (Megatron marks expert
    parameters with `allreduce=False`)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    if getattr(param, "allreduce", True):
        return parallel_state.get_data_parallel_group(with_context_parallel=True)
    return parallel_state.get_expert_data_parallel_group()


def owned_shards(model_chunks: list, optimizer: Any = None) -> list[Shard]:
    """The shards this rank owns, in the order of the chunks' parameters (the same on every
    rank of a data-parallel group). With a distributed optimizer the ranges and sources are
    its FP32 main-parameter shards."""
    main: dict[int, tuple[int, int, torch.Tensor]] = {}
    optimizers = getattr(optimizer, "chained_optimizers", None) or (
        [optimizer] if optimizer is not None else [])
    distributed = False
    if optimizers:  # a distributed optimizer is told by a private method of Megatron's
        require(EMA_PARAM_RANGE_MAP)
    for opt in optimizers:
        index_map = getattr(opt, "model_param_group_index_map", None)
        if index_map is None or not hasattr(opt, "_get_model_param_range_map"):
            continue
        distributed = True
        for param, (group_index, order) in index_map.items():
            span = opt._get_model_param_range_map(param)["param"]
            source = opt.optimizer.param_groups[group_index]["params"][order]
            main[id(param)] = (span.start, span.end, source.detach().view(-1))

    shards = []
    for chunk in model_chunks:
        for param in chunk.parameters():
            if not param.requires_grad:
                continue
            group = _split_group(param)
            if distributed:
                start, end, source = main.get(id(param), (0, 0, param.detach().view(-1)[:0]))
            else:
                rank, size = _group_rank_size(group)
                step = -(-param.numel() // size)
                start = min(rank * step, param.numel())
                end = min(start + step, param.numel())
                source = param.detach().view(-1)[start:end]
            shards.append(Shard(param, start, end, source, group))
    return shards


@dataclass(frozen=True)
class EMAConfig:
    decay: float  # d in ema = d * ema + (1 - d) * w
    interval: int = 1  # update at iterations that N divides
    start_iter: int = 0  # before this iteration the EMA is a copy of the weights


class HostEMA:
    """The EMA of `shards` in host memory. `step(iteration)` after each successful
    optimizer step; `wait()` finishes the update in flight."""

    def __init__(self, shards: list[Shard], config: EMAConfig,
                 wait_timer: Callable[[], Any] | None = None) -> None:
        self.shards, self.config = shards, config
        self._wait_timer = wait_timer  # () -> a Megatron timer (start/stop), or None
        total = sum(s.numel for s in shards)
        self._offsets = []
        offset = 0
        for shard in shards:
            self._offsets.append(offset)
            offset += shard.numel
        pinned = torch.cuda.is_available()
        self.ema = torch.empty(total, dtype=torch.float32, pin_memory=pinned)  # [owned]
        self._staging = torch.empty(total, dtype=torch.float32, pin_memory=pinned)
        self._stream = None
        if torch.cuda.is_available() and any(s.source.is_cuda for s in shards):
            self._stream = torch.cuda.Stream()
        self._copied = None  # CUDA event: the staging copy has finished
        self._thread: threading.Thread | None = None
        self._failure: str | None = None
        self._snapshot()
        self._wait_copy()
        self.ema.copy_(self._staging)

    @property
    def copies_from_gpu(self) -> bool:
        """Whether the snapshot is a side-stream copy from the GPU (see hold_weight_writes)."""
        return self._stream is not None

    @property
    def host_bytes(self) -> int:
        return self.ema.numel() * self.ema.element_size() * 2  # EMA + staging

    # --- the update ------------------------------------------------------------------

    def due(self, iteration: int) -> bool:
        return iteration < self.config.start_iter or iteration % self.config.interval == 0

    def step(self, iteration: int) -> None:
        """Called after the optimizer step that completed `iteration`."""
        self._raise_failure()
        if not self.due(iteration):
            return
        self.wait()
        self._snapshot()
        track = iteration < self.config.start_iter
        self._thread = threading.Thread(target=self._update, args=(track,),
                                        name=f"megaseek-ema-{iteration}")
        self._thread.start()

    def _snapshot(self) -> None:
        """Copies the owned weights into the staging buffer (asynchronously on GPU)."""
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                self._copy_sources()
            self._copied = torch.cuda.Event()
            self._copied.record(self._stream)
        else:
            self._copy_sources()

    def _copy_sources(self) -> None:
        with torch.no_grad():
            for shard, offset in zip(self.shards, self._offsets):
                self._staging[offset:offset + shard.numel].copy_(
                    shard.source, non_blocking=self._stream is not None)

    def _wait_copy(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()

    def hold_weight_writes(self) -> None:
        """On GPU: the current stream waits for the staging copy, so that the next optimizer
        step cannot change the weights while they are being copied."""
        if self._copied is not None:
            torch.cuda.current_stream().wait_event(self._copied)

    def _update(self, track: bool) -> None:
        try:
            self._wait_copy()
            self.apply(self.ema, self._staging, track)
        except BaseException:  # noqa: BLE001 - handed to the training thread
            self._failure = traceback.format_exc()

    def apply(self, ema: torch.Tensor, weights: torch.Tensor, track: bool) -> None:
        """One EMA update in place (the worker's whole job)."""
        if track:
            ema.copy_(weights)
        else:
            decay = self.config.decay
            ema.mul_(decay).add_(weights, alpha=1.0 - decay)

    def wait(self) -> None:
        """Finishes the update in flight; raises its failure, if any."""
        if self._thread is not None:
            # Timed only when there is a wait (a Megatron timer synchronizes the device).
            waiting = self._thread.is_alive() and self._wait_timer is not None
            timer = self._wait_timer() if waiting else None
            if timer is not None:
                timer.start()
            self._thread.join()
            if timer is not None:
                timer.stop()
            self._thread = None
        self._raise_failure()

    def close(self) -> None:
        """Joins the worker (no thread is left alive); raises a failure it had."""
        self.wait()

    def _raise_failure(self) -> None:
        if self._thread is not None and not self._thread.is_alive():
            self._thread.join()
            self._thread = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise EMAWorkerFailed("the background EMA update failed (the EMA is no longer "
                                  "updated); the worker's traceback:\n" + failure)

    # --- whole parameters ---------------------------------------------------------------

    def owned(self, shard_index: int) -> torch.Tensor:
        offset = self._offsets[shard_index]
        return self.ema[offset:offset + self.shards[shard_index].numel]

    def full(self) -> list[torch.Tensor]:
        """The EMA of every parameter, whole (each of the shards' parameters, its local
        shape, FP32, CPU), assembled over the data-parallel groups: a collective on them."""
        self.wait()
        import torch.distributed as dist

        fulls: list[torch.Tensor | None] = [None] * len(self.shards)
        by_group: dict[int, list[int]] = {}
        groups: dict[int, Any] = {}
        for i, shard in enumerate(self.shards):
            if _group_rank_size(shard.group)[1] == 1:
                whole = torch.zeros(shard.param.numel(), dtype=torch.float32)
                whole[shard.start:shard.end] = self.owned(i)
                fulls[i] = whole.view(shard.param.shape)
            else:
                by_group.setdefault(id(shard.group), []).append(i)
                groups[id(shard.group)] = shard.group
        for key, indices in by_group.items():  # first-seen order: the same on every rank
            group = groups[key]
            device = (torch.device("cuda", torch.cuda.current_device())
                      if dist.get_backend(group) == "nccl" else torch.device("cpu"))
            sizes = [self.shards[i].param.numel() for i in indices]
            flat = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
            base = 0
            for i, size in zip(indices, sizes):
                shard = self.shards[i]
                flat[base + shard.start:base + shard.end] = self.owned(i).to(device)
                base += size
            dist.all_reduce(flat, group=group)  # every other rank adds zeros: exact
            flat = flat.cpu()
            base = 0
            for i, size in zip(indices, sizes):
                fulls[i] = flat[base:base + size].view(self.shards[i].param.shape)
                base += size
        return fulls  # type: ignore[return-value]

    def load_full(self, fulls: list[torch.Tensor | None]) -> None:
        """Sets the EMA from whole parameters (None: from the current weights)."""
        self.wait()
        with torch.no_grad():
            for i, (shard, whole) in enumerate(zip(self.shards, fulls)):
                source = shard.source if whole is None else whole.reshape(-1)[shard.start:shard.end]
                self.owned(i).copy_(source)

    def reset_to_weights(self) -> None:
        self.load_full([None] * len(self.shards))

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model's parameters hold the EMA inside the block; the training weights are
        restored bit for bit afterwards. A collective over the data-parallel groups."""
        fulls = self.full()
        kept = [shard.param.detach().clone() for shard in self.shards]
        try:
            with torch.no_grad():
                for shard, whole in zip(self.shards, fulls):
                    shard.param.copy_(whole)
            yield
        finally:
            with torch.no_grad():
                for shard, original in zip(self.shards, kept):
                    shard.param.copy_(original)
