"""Model construction: the one wrapper of `GPTModel.__init__` the seams that shape a model
attach to.

Both of Megatron's model-building paths end in `GPTModel(config, transformer_layer_spec,
..., mtp_block_spec=...)`: a script's model provider (training.py:1706 get_model) and
`pretrain` without one (training/models/gpt.py:307 GPTModelBuilder.build_model). A seam
that shapes the model adds a `BuildStep` here (`attach`) instead of wrapping
`GPTModel.__init__` itself: however many attach, `GPTModel.__init__` is wrapped once, its
arguments bound once, and the steps run in the order they were attached.

`model_specs` is the spec seam; `upstream.seams.placement` attaches the placement's step.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import wraps
from typing import Any, Callable

from upstream.megatron_modules import megatron_module
from upstream.patching import Fix, Patcher, source_has
from upstream.seams import SEAM, VERSION


@dataclass(frozen=True)
class BuildStep:
    """One seam's part in building a GPTModel.

    `arguments(bound)` rewrites `GPTModel.__init__`'s arguments (by name, in place; the
    ones the caller left out are absent) before the model is built; `built(model, bound)`,
    where given, runs on the built model with the arguments it was built with."""

    name: str
    arguments: Callable[[dict[str, Any]], None]
    built: Callable[[Any, dict[str, Any]], None] | None = None


def attach(patcher: Patcher, step: BuildStep) -> None:
    """`step` joins the steps `GPTModel.__init__` runs, after those attached before it."""
    from megatron.core.models.gpt import GPTModel

    wrapped = GPTModel.__init__
    init = getattr(wrapped, "megaseek_unwrapped", wrapped)
    steps = (*getattr(wrapped, "megaseek_build_steps", ()), step)
    patcher.setattr(GPTModel, "__init__", _init_through(init, steps))


def _init_through(init: Callable, steps: tuple[BuildStep, ...]) -> Callable:
    signature = inspect.signature(init)

    @wraps(init)
    def init_through_steps(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        for step in steps:
            step.arguments(bound.arguments)
        init(*bound.args, **bound.kwargs)
        for step in steps:
            if step.built is not None:
                step.built(self, bound.arguments)

    # A new wrapper replaces the old one (never wraps it): undoing a step's attach restores
    # the wrapper of the steps before it.
    init_through_steps.megaseek_unwrapped = init
    init_through_steps.megaseek_build_steps = steps
    return init_through_steps


def model_specs(transform: Callable[[Any], Any]) -> Fix:
    """`transform(spec) -> spec` for GPTModel's `transformer_layer_spec` and
    `mtp_block_spec`."""

    def transformed(bound: dict[str, Any]) -> None:
        if bound.get("mtp_block_spec") is not None:
            bound["mtp_block_spec"] = transform(bound["mtp_block_spec"])
        bound["transformer_layer_spec"] = transform(bound["transformer_layer_spec"])

    def apply(patcher: Patcher) -> None:
        attach(patcher, BuildStep(_PLUGIN_SPECS, transformed))

    return Fix(
        "seam:model-specs",
        f"megatron/core/models/gpt/gpt_model.py GPTModel.__init__ ({VERSION}); built from "
        "a script's model provider (training.py:1706 get_model) or without one "
        "(training/models/gpt.py:307 GPTModelBuilder.build_model)",
        "both of Megatron's model-building paths end in GPTModel(config, "
        "transformer_layer_spec, ..., mtp_block_spec=...): the one place to rewrite specs",
        lambda: source_has(megatron_module("megatron.core.models.gpt.gpt_model")
                           .GPTModel.__init__, "transformer_layer_spec", "mtp_block_spec"),
        apply, SEAM)


_PLUGIN_SPECS = "plugin specs"


def plugin_specs_in_place() -> bool:
    """Whether GPTModel is built with the plugins' specs (`model_specs` applied): a spec
    that relies on the plugins' modules asks before Megatron builds from it."""
    from megatron.core.models.gpt import GPTModel

    steps = getattr(GPTModel.__init__, "megaseek_build_steps", ())
    return any(step.name == _PLUGIN_SPECS for step in steps)
