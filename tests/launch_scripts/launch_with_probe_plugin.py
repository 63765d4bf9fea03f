"""Runs `integration.launch` with a registry holding one probe plugin whose every hook
leaves a trace the test can read: its flag's value, the layer spec it rewrote (the MLP is
dropped, so the parameter count falls), schedule calls and optimizer steps in a file."""

import os
import sys

from integration import launch
from plugins import Plugin, PluginRegistry


def add_arguments(group):
    group.add_argument("--probe-trace", type=str, default=None, help="file to write events to")


def trace(args, event):
    with open(args.probe_trace, "a") as f:
        f.write(f"{os.environ['RANK']} {event}\n")


def drop_mlp(spec, args):
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp

    spec.submodules.pre_mlp_layernorm = IdentityOp
    spec.submodules.mlp = IdentityOp
    spec.submodules.mlp_bda = IdentityFuncOp
    trace(args, "spec")
    return spec


def schedule(args):
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    def counted(*a, **kw):
        trace(args, "schedule")
        return forward_backward_no_pipelining(*a, **kw)

    return counted


def on_optimizer_step(args, model_chunks, optimizer):
    return lambda: trace(args, "step")


PROBE = Plugin("probe", "test plugin", add_arguments=add_arguments,
               transform_layer_spec=drop_mlp, schedule=schedule,
               on_optimizer_step=on_optimizer_step, slots=frozenset({"mlp", "schedule"}))

if __name__ == "__main__":
    launch.main(sys.argv[1:], registry=PluginRegistry([PROBE]))
