"""Runs `integration.launch` with megaseek's plugins plus two test plugins that use every
seam and leave a trace (one line per event, `RANK EVENT`, in the `--probe-trace` file):

- `probe`: records the layer spec it is handed (after the other plugins' transforms, since
  it registers last) and, with `--probe-drop-mlp`, drops each layer's MLP; counts schedule
  calls; records each optimizer step's iteration; keeps a per-rank counter as sharded
  checkpoint state (saved, loaded, reported); and adds an evaluation pass with the output
  layer zeroed (whose loss is then exactly ln(vocab size)).
- `vplace`: DualPipeV's placement, rank r building stages r and 2P-1-r.
- `crash`: `--crash-rank R --crash-at-layer-call K` ends rank R's process (exit 17, no
  cleanup, as a killed rank) in the middle of a step, at its K-th transformer-layer call.
"""

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from integration import launch
from plugins import Plugin, PluginRegistry, builtin_plugins
from plugins.config import flag, megatron
from upstream.seams.placement import Placement


@dataclass(frozen=True)
class ProbeConfig:
    probe_trace: str | None = flag("--probe-trace", None, type=str,
                                   help="file to write events to")
    probe_drop_mlp: bool = flag("--probe-drop-mlp", False, action="store_true",
                                help="drop every layer's MLP")


def trace(config, event):
    with open(config.probe_trace, "a") as f:
        f.write(f"{os.environ['RANK']} {event}\n")


def name_of(spec):
    """The class a spec builds (a ModuleSpec, a class, or a partial of a classmethod)."""
    module = getattr(spec, "module", getattr(spec, "func", spec))
    module = getattr(module, "__self__", module)  # MLP.as_mlp_submodule -> MLP
    return getattr(module, "__name__", type(module).__name__)


def record_spec(config, spec):
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp

    if config.probe_drop_mlp:
        spec.submodules.pre_mlp_layernorm = IdentityOp
        spec.submodules.mlp = IdentityOp
        spec.submodules.mlp_bda = IdentityFuncOp
    trace(config, f"spec {name_of(spec.submodules.self_attention)} {name_of(spec.submodules.mlp)}")
    return spec


def schedule(config):
    from megatron.core.pipeline_parallel.schedules import get_forward_backward_func

    def counted(*a, **kw):
        trace(config, "schedule")
        return get_forward_backward_func()(*a, **kw)

    return counted


def on_optimizer_step(config, model_chunks, optimizer):
    return lambda iteration: trace(config, f"step {iteration}")


class Counter:
    """A per-rank tensor saved as one shard of a [world] tensor: 10 x the iteration it was
    saved at, plus the rank (a fresh run's holds the rank alone)."""

    def __init__(self, config) -> None:
        self.config = config

    def sharded_state_dict(self):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.training import get_args

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        value = 10.0 * (getattr(get_args(), "curr_iteration", -1) + 1) + rank
        trace(self.config, f"state {value:g}")
        return {"counter": ShardedTensor.from_rank_offsets("probe.counter",
                                                           torch.tensor([value]),
                                                           (0, rank, world))}

    def load_state_dict(self, state):
        trace(self.config, "loaded nothing" if state is None
              else f"loaded {state['counter'].item():g}")


def evaluation(config, model_chunks):
    @contextmanager
    def output_layer_zeroed():
        # The output layer's weight, or the embedding it is tied to: zero logits.
        weights = [module.weight if module.weight is not None
                   else chunk.module.shared_embedding_or_output_weight()
                   for chunk in model_chunks
                   for name, module in chunk.named_modules() if name.endswith("output_layer")]
        kept = [w.detach().clone() for w in weights]
        with torch.no_grad():
            for w in weights:
                w.zero_()
        trace(config, "evaluation pass")
        try:
            yield
        finally:
            with torch.no_grad():
                for w, k in zip(weights, kept):
                    w.copy_(k)

    return "probe", output_layer_zeroed


PROBE = Plugin("probe", "test plugin using every seam", config=ProbeConfig,
               transform_layer_spec=record_spec, schedule=schedule,
               on_optimizer_step=on_optimizer_step,
               checkpoint_state=lambda config, chunks: Counter(config),
               evaluation=evaluation, slots=frozenset({"schedule"}))


@dataclass(frozen=True)
class VPlaceConfig:
    pipeline_model_parallel_size: int = megatron("pipeline_model_parallel_size")


def v_placement(config):
    p = config.pipeline_model_parallel_size
    return Placement(p, 2, lambda rank, chunk: rank if chunk == 0 else 2 * p - 1 - rank)


VPLACE = Plugin("vplace", "test plugin: DualPipeV's placement", config=VPlaceConfig,
                placement=v_placement,
                slots=frozenset({"placement"}))

@dataclass(frozen=True)
class CrashConfig:
    crash_rank: int | None = flag("--crash-rank", None, type=int, help="the rank that dies")
    crash_at_layer_call: int | None = flag("--crash-at-layer-call", None, type=int,
                                           help="at its K-th transformer-layer call")


def crashing_layer(config, spec):
    """The layer's class, subclassed so that its K-th call on rank R ends the process."""
    if int(os.environ["RANK"]) != config.crash_rank:
        return spec
    calls = [0]

    class CrashingLayer(spec.module):
        def forward(self, *a, **k):
            calls[0] += 1
            if calls[0] == config.crash_at_layer_call:
                os._exit(17)
            return super().forward(*a, **k)

    spec.module = CrashingLayer
    return spec


CRASH = Plugin("crash", "test plugin: a rank dies mid-step", config=CrashConfig,
               transform_layer_spec=crashing_layer)

if __name__ == "__main__":
    launch.main(sys.argv[1:], registry=PluginRegistry([*builtin_plugins(), PROBE, VPLACE, CRASH]))
