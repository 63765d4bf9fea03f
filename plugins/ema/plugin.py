"""The `ema` plugin: `--plugins ema --ema-decay D [--ema-interval N] [--ema-start-iter K]
[--ema-eval]`. Attaches through the registry's hooks only: the optimizer-step callback
(the update), the end of training (waits for the last update), the checkpoint state
(saved under 'megaseek:ema') and an evaluation pass."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from plugins import Plugin, PluginError, TransformerEngine
from plugins.config import flag, megatron
from plugins.ema.ema import EMAConfig, HostEMA, owned_shards

CHECKPOINT_PREFIX = "megaseek:ema"  # the EMA's sharded keys: PREFIX.<the weight's key>
EVALUATION_NAME = "EMA weights"


@dataclass(frozen=True)
class EMAPluginConfig:
    """The ema plugin's flags, and the Megatron arguments it reads."""

    ema_decay: float | None = flag(
        "--ema-decay", None, type=float, metavar="D",
        help="EMA of the weights: ema = D * ema + (1 - D) * weights, in host memory, after "
             "each update step (DeepSeek-V3)")
    ema_interval: int = flag("--ema-interval", 1, type=int, metavar="N",
                             help="update the EMA every N iterations")
    ema_start_iter: int = flag("--ema-start-iter", 0, type=int, metavar="K",
                               help="before iteration K the EMA is a copy of the weights")
    ema_eval: bool = flag("--ema-eval", False, action="store_true",
                          help="every evaluation also runs with the EMA weights")
    log_interval: int = megatron("log_interval", 100)
    train_iters: int | None = megatron("train_iters")
    eval_iters: int | None = megatron("eval_iters")
    fp8_param_gather: bool = megatron("fp8_param_gather", False)

    def ema(self) -> EMAConfig:
        return EMAConfig(self.ema_decay, self.ema_interval, self.ema_start_iter)


def check(config: EMAPluginConfig, args) -> None:
    decay = config.ema_decay
    if decay is None:
        raise PluginError("--plugins ema needs --ema-decay D (0 < D < 1, e.g. 0.999)")
    if not 0.0 < decay < 1.0:
        raise PluginError(f"--ema-decay must be in (0, 1); got {decay}")
    if config.ema_interval < 1:
        raise PluginError(f"--ema-interval must be at least 1; got {config.ema_interval}")
    if config.ema_start_iter < 0:
        raise PluginError(f"--ema-start-iter must be at least 0; got {config.ema_start_iter}")
    if config.fp8_param_gather:
        raise PluginError("--fp8-param-gather is not supported with --plugins ema: the EMA "
                          "reads, checkpoints and swaps in the parameters as plain tensors, "
                          "not Transformer Engine's FP8 ones; drop --fp8-param-gather")
    _check_updates_within_training(config)
    if config.ema_eval and not (config.eval_iters or 0) > 0:
        raise PluginError(f"--ema-eval needs evaluation: give --eval-iters > 0 (got "
                          f"--eval-iters {config.eval_iters})")


def _check_updates_within_training(config: EMAPluginConfig) -> None:
    """The EMA averages at the iterations from --ema-start-iter on that --ema-interval
    divides (`HostEMA.due`); a run that ends before the first of them would save and
    evaluate an EMA that is only a copy of the weights. (Unknown with --train-samples:
    Megatron counts the iterations later.)"""
    train_iters = config.train_iters
    if not train_iters:
        return
    interval, start = config.ema_interval, config.ema_start_iter
    first = -(-max(start, 1) // interval) * interval  # the first multiple of N from K on
    if first > train_iters:
        raise PluginError(
            f"--ema-start-iter {start} and --ema-interval {interval} with --train-iters "
            f"{train_iters}: the EMA would first average at iteration {first}, after the "
            f"run ends, and stay a copy of the weights; lower "
            + ("--ema-start-iter" if start > train_iters else "--ema-interval")
            + f" (or train longer)")


def available_host_bytes() -> int:
    """MemAvailable of this machine (Linux), else free physical pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_host_memory(owned_numel: int, ranks_on_host: int, available: int) -> None:
    """The EMA and its staging buffer, FP32, on every rank of this machine, must fit."""
    needed = owned_numel * 4 * 2 * ranks_on_host
    if needed > available:
        gib = 2 ** 30
        raise PluginError(
            f"--plugins ema: the EMA needs {needed / gib:.2f} GiB of host memory "
            f"({owned_numel} parameters owned per rank, FP32 EMA and staging buffer, "
            f"{ranks_on_host} ranks on this machine) but {available / gib:.2f} GiB is "
            "available; use more data-parallel ranks with --use-distributed-optimizer, more "
            "machines, or drop --plugins ema")


def create(config: EMAPluginConfig, model_chunks: list, optimizer) -> HostEMA:
    shards = owned_shards(model_chunks, optimizer)
    check_host_memory(sum(s.numel for s in shards),
                      int(os.environ.get("LOCAL_WORLD_SIZE", "1")), available_host_bytes())

    def wait_timer():
        from megatron.training import get_timers

        return get_timers()("ema-wait", log_level=0)

    ema = HostEMA(shards, config.ema(), wait_timer)
    if ema.copies_from_gpu:  # GPU: the next step's update waits for the staging copy
        for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
            inner = getattr(opt, "optimizer", None)
            if isinstance(inner, torch.optim.Optimizer):
                inner.register_step_pre_hook(lambda *unused: ema.hold_weight_writes())
    return ema


class EMARun:
    """The EMA of one run, shared by the plugin's hooks (`Plugin.run_state`): made when
    Megatron builds the optimizer (`on_optimizer_step`), then waited for, checkpointed and
    evaluated."""

    def __init__(self, config: EMAPluginConfig) -> None:
        self.config = config
        self._ema: HostEMA | None = None

    @property
    def ema(self) -> HostEMA:
        if self._ema is None:
            raise RuntimeError("the EMA is made when Megatron builds the optimizer; it was "
                               "asked for before")
        return self._ema

    def start(self, model_chunks: list, optimizer) -> HostEMA:
        self._ema = create(self.config, model_chunks, optimizer)
        return self._ema


def _log_wait(log_interval: int, iteration: int) -> None:
    """Every --log-interval: the time this rank's steps waited for the previous update, to
    TensorBoard as `ema-wait-ms` (zeros included, so the curve is whole) and printed when
    not zero; from the last rank, where Megatron keeps its writer and prints its log."""
    from megatron.training import get_tensorboard_writer, get_timers

    timers = get_timers()
    if timers is None or iteration % max(1, log_interval) != 0:
        return
    waited_ms = timers("ema-wait", log_level=0).elapsed(reset=True) * 1e3
    writer = get_tensorboard_writer()
    if writer is not None:
        writer.add_scalar("ema-wait-ms", waited_ms, iteration)
    last = (not torch.distributed.is_initialized()
            or torch.distributed.get_rank() == torch.distributed.get_world_size() - 1)
    if waited_ms > 0.0 and last:
        print(f" ema: iteration {iteration}: waited {waited_ms:.3f} ms for the previous "
              f"EMA update over the last {log_interval} iterations", flush=True)


def on_optimizer_step(run: EMARun, model_chunks, optimizer):
    ema = run.start(model_chunks, optimizer)

    def after_step(iteration: int) -> None:
        ema.step(iteration)
        _log_wait(run.config.log_interval, iteration)

    return after_step


def on_training_end(run: EMARun, model_chunks) -> None:
    """The last update of the run has no next step to report its failure: wait for it."""
    run.ema.close()


class EMACheckpointState:
    """The EMA as Megatron dist-checkpointing tensors: each weight's EMA is sharded like
    the weight (its model ShardedTensor with another key and data), so it reshards as the
    weights do; in a torch-format checkpoint, plain tensors. Saving and loading assemble
    whole parameters over data parallelism."""

    def __init__(self, ema: HostEMA, model_chunks: list) -> None:
        self.ema, self.model_chunks = ema, model_chunks

    def _model_tensors(self) -> list:
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedBase

        from megatron.core import parallel_state
        from megatron.core.utils import unwrap_model

        kwargs = {}  # as Megatron's generate_state_dict asks (training/checkpointing.py:1322)
        if parallel_state.model_parallel_is_initialized():
            kwargs["metadata"] = {
                "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
        by_param = {}
        for chunk in unwrap_model(list(self.model_chunks)):  # the keys Megatron saves
            for value in nested_values(chunk.sharded_state_dict(**kwargs)):
                if isinstance(value, ShardedBase) and isinstance(getattr(value, "data", None),
                                                                 torch.Tensor):
                    by_param.setdefault(id(value.data), value)
        missing = [i for i, s in enumerate(self.ema.shards) if id(s.param) not in by_param]
        if missing:
            raise RuntimeError(f"{len(missing)} parameters have no sharded tensor in the "
                               "model's sharded_state_dict")
        return [by_param[id(s.param)] for s in self.ema.shards]

    def sharded_state_dict(self) -> dict:
        from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

        fulls = self.ema.full()  # waits for the update in flight
        # Keyed by the shard's place on this rank (several layers share one checkpoint key,
        # at different offsets); what is saved is named by the tensors' own keys.
        return {str(i): make_sharded_optimizer_tensor(model, full, CHECKPOINT_PREFIX)
                for i, (model, full) in enumerate(zip(self._model_tensors(), fulls))}

    def state_dict(self) -> dict:
        """For --ckpt-format torch (whose files are pickled, one a model-parallel rank):
        each parameter's EMA, whole over data parallelism, as a plain tensor keyed like
        `sharded_state_dict`. A collective on the data-parallel groups, as that is."""
        return {str(i): full for i, full in enumerate(self.ema.full())}

    def load_state_dict(self, state) -> None:
        if state is None:
            self.ema.reset_to_weights()
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                print(" ema: the checkpoint holds no EMA; it starts from the loaded weights",
                      flush=True)
            return
        self.ema.load_full([state[str(i)] for i in range(len(self.ema.shards))])


def checkpoint_state(run: EMARun, model_chunks) -> EMACheckpointState:
    return EMACheckpointState(run.ema, model_chunks)


def evaluation(run: EMARun, model_chunks):
    if not run.config.ema_eval:
        return None  # no EMA evaluation asked for: Megatron evaluates the raw weights only
    return EVALUATION_NAME, run.ema.swapped_in


EMA = Plugin(
    name="ema",
    summary="DeepSeek-V3's EMA of the weights in host memory, updated in the background "
            "after each step, checkpointed and optionally evaluated (--ema-decay)",
    config=EMAPluginConfig,
    check=check,
    run_state=EMARun,
    on_optimizer_step=on_optimizer_step,
    on_training_end=on_training_end,
    checkpoint_state=checkpoint_state,
    evaluation=evaluation,
    transformer_engine=TransformerEngine(
        composes=True,
        effect="touches no module: it averages the parameters as tensors (the optimizer's "
               "FP32 main copies under the distributed optimizer), checkpoints them under "
               "the model's own sharded keys and swaps them in for --ema-eval",
        gives_up="FP8 parameters (--fp8-param-gather: the EMA would be checkpointed and "
                 "swapped in through TE's FP8 tensors, which is not verified)"),
)
