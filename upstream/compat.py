"""Fixes for megatron-core 0.19.2 that every machine needs, CUDA or not.

Each is a `Fix` (see `upstream.patching`) with the upstream place it addresses; the
CPU-only ones live in `upstream.cpu`. `TYPING_OVERRIDE` is applied when `integration` is
imported (`provide_typing_override`), since `megatron.training` does not import without
it; `FIXES` by `install()`, at the start of a run.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import sys
import typing
from functools import wraps
from pathlib import Path

import torch

from upstream.megatron_modules import megatron_checkpointing, megatron_module, megatron_training
from upstream.patching import (EVERY_MACHINE, Fix, Patcher, Scope, apply_fixes,
                               rewrite_function, source_has)

VERSION = "megatron-core 0.19.2"


# --- applied at import: megatron.training on Python 3.11 ---------------------------------

PYTHON_BEFORE_3_12 = Scope("Python < 3.12, when integration is imported",
                           lambda args: sys.version_info < (3, 12))
_IMPORTS_OVERRIDE = "from typing import Any, Callable, ClassVar, Literal, override"


def _megatron_training_models_import_typing_override() -> bool:
    # Read as text: on Python 3.11 these modules do not import until the fix is applied.
    # (The probe stays True once applied; applying again changes nothing.)
    core = Path(importlib.util.find_spec("megatron.core").origin).parent
    models = core.parent / "training" / "models"
    uses = any(_IMPORTS_OVERRIDE in (models / f).read_text() for f in ("gpt.py", "hybrid.py"))
    return uses and sys.version_info < (3, 12)


def _apply_typing_override(p: Patcher) -> None:
    import typing_extensions

    if getattr(typing, "override", None) is not typing_extensions.override:
        p.setattr(typing, "override", typing_extensions.override)


TYPING_OVERRIDE = Fix(
    "typing-override",
    f"megatron/training/models/gpt.py:5, megatron/training/models/hybrid.py:5 ({VERSION})",
    "they import typing.override, new in Python 3.12 (typing_extensions has it); the rest "
    "of the wheel works on 3.11",
    _megatron_training_models_import_typing_override, _apply_typing_override,
    PYTHON_BEFORE_3_12)


def provide_typing_override() -> None:
    """Applies `TYPING_OVERRIDE` for the life of the process (it only adds a name)."""
    if TYPING_OVERRIDE.applies(None):
        apply_fixes([TYPING_OVERRIDE], Patcher())


# --- applied on every machine at the start of a run ---------------------------------------


def _prebuilt_dataset_helpers() -> None:
    """Stands in for `compile_helpers`: the wheel ships `helpers_cpp` prebuilt."""
    try:
        megatron_module("megatron.core.datasets.helpers_cpp")
    except ImportError as error:
        raise RuntimeError(
            "megatron-core's compiled dataset helpers (megatron.core.datasets.helpers_cpp) "
            "do not import; reinstall the megatron-core wheel for this Python and platform"
        ) from error


def _wheel_lacks_makefile() -> bool:
    datasets = Path(megatron_module("megatron.core.datasets.utils").__file__).parent
    return (source_has(megatron_module("megatron.core.datasets.utils").compile_helpers, '"make"')
            and not (datasets / "Makefile").exists())


def _distopt():
    return megatron_module("megatron.core.optimizer.distrib_optimizer").DistributedOptimizer


def _uses_torch_adam() -> bool:
    return not megatron_module("megatron.core.optimizer.distrib_optimizer").HAVE_APEX_OR_TE


def _apply_dataset_helpers(p: Patcher) -> None:
    p.setattr(megatron_module("megatron.core.datasets.utils"), "compile_helpers",
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


_LOAD_PARAM_STATE_CHECK = "if not isinstance(tensors[key], torch.Tensor):"


def _apply_distopt_load_param_state(p: Patcher) -> None:
    cls = _distopt()
    fixed = rewrite_function(cls, "_set_main_param_and_optimizer_states", {
        _LOAD_PARAM_STATE_CHECK:
            'if key == "step" or not isinstance(tensors[key], torch.Tensor):'})
    p.setattr(cls, "_set_main_param_and_optimizer_states", torch.no_grad()(fixed))


_READS_WHAT_IT_LOADS = "__megaseek_reads_what_it_loads__"  # marks the applied fix


def _load_template_ignores_save_flags() -> bool:
    checkpointing = megatron_checkpointing()
    # (functools.wraps carries the mark through the seams' wrappers of load_checkpoint)
    return (not getattr(checkpointing.load_checkpoint, _READS_WHAT_IT_LOADS, False)
            and source_has(checkpointing.generate_state_dict, "if not args.no_save_optim:",
                       "if not args.no_save_rng and rng_state:")
            and source_has(checkpointing.load_checkpoint,
                           "load_kwargs['sharded_state_dict'] = generate_state_dict(\n"
                           "                args,"))


def _apply_load_template_without_save_flags(p: Patcher) -> None:
    checkpointing = megatron_checkpointing()
    load_checkpoint = checkpointing.load_checkpoint

    @wraps(load_checkpoint)
    def load_reading_what_it_loads(*args, **kwargs):
        # generate_state_dict as it is now: the seams wrap it too (plugin state).
        generate_state_dict = checkpointing.generate_state_dict

        def what_the_load_reads(run_args, *rest, **more):
            # The load passes the optimizer and RNG state only where it reads them (its
            # --no-load-optim and --no-load-rng); the save flags are of this run's saves.
            loading = copy.copy(run_args)
            loading.no_save_optim = loading.no_save_rng = False
            return generate_state_dict(loading, *rest, **more)

        with p.scoped(checkpointing, "generate_state_dict", what_the_load_reads):
            return load_checkpoint(*args, **kwargs)

    setattr(load_reading_what_it_loads, _READS_WHAT_IT_LOADS, True)
    p.setattr(checkpointing, "load_checkpoint", load_reading_what_it_loads)
    training = megatron_training()
    if getattr(training, "load_checkpoint", None) is load_checkpoint:
        p.setattr(training, "load_checkpoint", load_reading_what_it_loads)


FIXES: tuple[Fix, ...] = (
    Fix("dataset-helpers-prebuilt",
        f"megatron/training/initialize.py:173-177 -> megatron/core/datasets/utils.py:25 ({VERSION})",
        "compile_helpers runs `make` in a folder where the wheel ships no Makefile, then "
        "sys.exit(1); the wheel's prebuilt helpers_cpp is what it would build",
        _wheel_lacks_makefile, _apply_dataset_helpers, EVERY_MACHINE),
    Fix("distopt-state-dict-before-first-step",
        f"megatron/core/optimizer/distrib_optimizer.py:837-840 ({VERSION})",
        "with torch's Adam (no TE/apex), state_dict() asserts exactly one step value; "
        "--load builds it before any step, when there is none",
        lambda: _uses_torch_adam() and source_has(_distopt().state_dict,
                                                  "assert len(steps) == 1\n"),
        _apply_distopt_empty_state, EVERY_MACHINE),
    Fix("distopt-step-tensor-per-param",
        f"megatron/core/optimizer/distrib_optimizer.py:1026-1032 ({VERSION})",
        "load_state_dict gives every parameter the same 'step' tensor; torch's Adam "
        "increments it once per parameter, so bias correction is wrong after a resume",
        lambda: _uses_torch_adam() and source_has(_distopt().load_state_dict,
                                                  's["step"] = step\n'),
        _apply_distopt_step_per_param, EVERY_MACHINE),
    Fix("distopt-load-param-state",
        f"megatron/core/optimizer/distrib_optimizer.py:1210-1225 ({VERSION})",
        "fp32 main params are views of parameters that require grad, copied into in place "
        "outside no_grad (error); and the checkpoint's non-persistent 'step' placeholder "
        "overwrites the step just loaded from the param groups",
        lambda: source_has(_distopt()._set_main_param_and_optimizer_states,
                           _LOAD_PARAM_STATE_CHECK),
        _apply_distopt_load_param_state, EVERY_MACHINE),
    Fix("load-reads-state-a-run-does-not-save",
        f"megatron/training/checkpointing.py:1338 and :1374 (generate_state_dict leaves out "
        f"the optimizer and RNG state under --no-save-optim, --no-save-rng), called for the "
        f"load at :2311 ({VERSION})",
        "a run that saves no optimizer (or RNG) state cannot load it either: the load's "
        "template lacks it, and Megatron fails with KeyError 'params' "
        "(optimizer.py:627, the saved parameter groups without their parameters) or stops "
        "with exit status 0 before training ('Unable to load rng state', :2686-2693)",
        _load_template_ignores_save_flags, _apply_load_template_without_save_flags,
        EVERY_MACHINE),
)


def install() -> Patcher:
    """Applies every fix whose upstream problem is present; returns the Patcher."""
    return apply_fixes(FIXES, Patcher())
