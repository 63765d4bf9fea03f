"""Fixes for megatron-core 0.19.2 that every machine needs, CUDA or not.

Each is a `Fix` (see `integration.patching`) with the upstream place it addresses; the
CPU-only ones live in `integration.cpu`.
"""

from __future__ import annotations

import sys
import typing


def provide_typing_override() -> None:
    """megatron/training/models/{gpt,hybrid}.py:5 (megatron-core 0.19.2) import
    `typing.override`, new in Python 3.12; the wheel itself works on 3.11."""
    if sys.version_info < (3, 12) and not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override


# --- fixes applied on every machine --------------------------------------------------

import importlib
from pathlib import Path

import torch

from integration.patching import Fix, Patcher, rewrite_function, source_has

VERSION = "megatron-core 0.19.2"


def _module(name: str):
    return importlib.import_module(name)


def _prebuilt_dataset_helpers() -> None:
    """Stands in for `compile_helpers`: the wheel ships `helpers_cpp` prebuilt."""
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
    except ImportError as error:
        raise RuntimeError(
            "megatron-core's compiled dataset helpers (megatron.core.datasets.helpers_cpp) "
            "do not import; reinstall the megatron-core wheel for this Python and platform"
        ) from error


def _wheel_lacks_makefile() -> bool:
    datasets = Path(_module("megatron.core.datasets.utils").__file__).parent
    return (source_has(_module("megatron.core.datasets.utils").compile_helpers, '"make"')
            and not (datasets / "Makefile").exists())


def _distopt():
    return _module("megatron.core.optimizer.distrib_optimizer").DistributedOptimizer


def _uses_torch_adam() -> bool:
    return not _module("megatron.core.optimizer.distrib_optimizer").HAVE_APEX_OR_TE


def _apply_dataset_helpers(p: Patcher) -> None:
    p.setattr(_module("megatron.core.datasets.utils"), "compile_helpers",
              _prebuilt_dataset_helpers)


def _apply_distopt_empty_state(p: Patcher) -> None:
    cls = _distopt()
    p.setattr(cls, "state_dict", rewrite_function(cls, "state_dict", {
        "assert len(steps) == 1\n            step = steps[0]\n":
            "assert len(steps) <= 1\n            step = steps[0] if steps else 0\n"}))


def _apply_distopt_step_per_param(p: Patcher) -> None:
    cls = _distopt()
    p.setattr(cls, "load_state_dict", rewrite_function(cls, "load_state_dict", {
        's["step"] = step\n': 's["step"] = step.clone()\n'}))


def _apply_distopt_load_param_state(p: Patcher) -> None:
    cls = _distopt()
    fixed = rewrite_function(cls, "_set_main_param_and_optimizer_states", {
        "if not isinstance(tensors[key], torch.Tensor):":
            'if key == "step" or not isinstance(tensors[key], torch.Tensor):'})
    p.setattr(cls, "_set_main_param_and_optimizer_states", torch.no_grad()(fixed))


FIXES: tuple[Fix, ...] = (
    Fix("dataset-helpers-prebuilt",
        f"megatron/training/initialize.py:173-177 -> megatron/core/datasets/utils.py:25 ({VERSION})",
        "compile_helpers runs `make` in a folder where the wheel ships no Makefile, then "
        "sys.exit(1); the wheel's prebuilt helpers_cpp is what it would build",
        _wheel_lacks_makefile, _apply_dataset_helpers),
    Fix("distopt-state-dict-before-first-step",
        f"megatron/core/optimizer/distrib_optimizer.py:837-840 ({VERSION})",
        "with torch's Adam (no TE/apex), state_dict() asserts exactly one step value; "
        "--load builds it before any step, when there is none",
        lambda: _uses_torch_adam() and source_has(_distopt().state_dict,
                                                  "assert len(steps) == 1\n"),
        _apply_distopt_empty_state),
    Fix("distopt-step-tensor-per-param",
        f"megatron/core/optimizer/distrib_optimizer.py:1026-1032 ({VERSION})",
        "load_state_dict gives every parameter the same 'step' tensor; torch's Adam "
        "increments it once per parameter, so bias correction is wrong after a resume",
        lambda: _uses_torch_adam() and source_has(_distopt().load_state_dict,
                                                  's["step"] = step\n'),
        _apply_distopt_step_per_param),
    Fix("distopt-load-param-state",
        f"megatron/core/optimizer/distrib_optimizer.py:1210-1225 ({VERSION})",
        "fp32 main params are views of parameters that require grad, copied into in place "
        "outside no_grad (error); and the checkpoint's non-persistent 'step' placeholder "
        "overwrites the step just loaded from the param groups",
        lambda: source_has(_distopt()._set_main_param_and_optimizer_states,
                           "dst_tensors[key].copy_(tensors[key])"),
        _apply_distopt_load_param_state),
)


def install() -> Patcher:
    """Applies every fix whose upstream problem is present; returns the Patcher."""
    patcher = Patcher()
    for fix in FIXES:
        if fix.still_needed():
            fix.apply(patcher)
    return patcher
