"""Attach enabled plugins to Megatron's training loop through its own seams.

`megatron.training.training` looks up `get_forward_backward_func` and
`get_megatron_optimizer` by name at call time; a plugin that provides a schedule or an
optimizer-step callback is attached by replacing those names for the run (the Patcher
can undo it). Layer-spec transforms go to the model provider (`integration.gpt`).
"""

from __future__ import annotations

import argparse
from functools import wraps

from integration.patching import Patcher
from plugins import Plugin, PluginError


def layer_spec_hooks(plugins: list[Plugin]):
    return [p.transform_layer_spec for p in plugins if p.transform_layer_spec is not None]


def check_megatron_flags(plugins: list[Plugin], args: argparse.Namespace) -> None:
    """Megatron flags that cannot work without a plugin fail here, not deep in a build."""
    names = {p.name for p in plugins}
    if (getattr(args, "multi_latent_attention", False) and "mla" not in names
            and getattr(args, "transformer_impl", None) == "local"):
        raise PluginError("--multi-latent-attention with --transformer-impl local needs "
                          "--plugins mla (Megatron's own MLA does not build with the local "
                          "spec: its core attention rejects k_channels/v_channels)")


def attach(plugins: list[Plugin], args: argparse.Namespace, patcher: Patcher) -> None:
    import megatron.training.training as training

    check_megatron_flags(plugins, args)
    for plugin in plugins:
        if plugin.install is not None:
            plugin.install(args, patcher)
    # Megatron's own --exp-avg-dtype/--exp-avg-sq-dtype bf16 (refused without TE today):
    # BF16 Adam moments with FP32 master weights (plugins.fp8.optimizer_hook).
    from plugins.fp8.optimizer_hook import attach_bf16_moments

    attach_bf16_moments(args, patcher)

    schedules = [p for p in plugins if p.schedule is not None]
    if len(schedules) > 1:  # slots normally catch this; a schedule hook without the slot too
        raise PluginError("--plugins: " + " and ".join(p.name for p in schedules)
                          + " both provide a pipeline schedule; enable only one")
    if schedules:
        forward_backward = schedules[0].schedule(args)

        @wraps(training.get_forward_backward_func)
        def get_forward_backward_func(*unused, **unused_kw):
            return forward_backward

        patcher.setattr(training, "get_forward_backward_func", get_forward_backward_func)

    step_hooks = [p for p in plugins if p.on_optimizer_step is not None]
    if step_hooks:
        build_optimizer = training.get_megatron_optimizer

        @wraps(build_optimizer)
        def get_megatron_optimizer(config, model_chunks, *a, **kw):
            optimizer = build_optimizer(config, model_chunks, *a, **kw)
            callbacks = [p.on_optimizer_step(args, model_chunks, optimizer) for p in step_hooks]
            _run_after_step(optimizer, callbacks)
            return optimizer

        patcher.setattr(training, "get_megatron_optimizer", get_megatron_optimizer)


def _run_after_step(optimizer, callbacks) -> None:
    step = optimizer.step

    @wraps(step)
    def step_then_callbacks(*args, **kwargs):
        result = step(*args, **kwargs)
        update_successful = result[0] if isinstance(result, tuple) else bool(result)
        if update_successful:
            for callback in callbacks:
                callback()
        return result

    optimizer.step = step_then_callbacks
