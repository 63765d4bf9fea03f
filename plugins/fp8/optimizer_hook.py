"""Megatron's Adam with BF16 moments and FP32 master weights, without Transformer Engine.

Megatron already names this: `--exp-avg-dtype bf16 --exp-avg-sq-dtype bf16`. Today
(megatron-core 0.19.2) those flags only work with `--use-precision-aware-optimizer`, which
needs TE's FusedAdam; without TE every combination is refused when the `OptimizerConfig`
is built (training.py:1969 `get_megatron_optimizer_config`, reached from
argument_utils.py:559 `pretrain_cfg_container_from_args`):

- `--exp-avg-dtype bf16` (and/or `--exp-avg-sq-dtype bf16`) alone: AssertionError
  "exp_avg_dtype can only be fp32 when not using precision-aware optimizer"
  (optimizer_config.py:476-481);
- with `--use-precision-aware-optimizer`: AssertionError "only supported with distributed
  optimizer" (optimizer_config.py:434-436), and with `--use-distributed-optimizer` too:
  RuntimeError "--use-precision-aware-optimizer requires FusedAdam from TransformerEngine"
  (optimizer_config.py:465).

`install_bf16_moments(patcher)` lets the first form work where Megatron uses torch's Adam
(no TE, no Apex), by two narrow, undoable rewrites (`integration.patching`):

- megatron/core/optimizer/__init__.py:556-557, in `_get_megatron_optimizer_based_on_param_groups`,
  picks `torch.optim.AdamW` / `torch.optim.Adam`; it now asks `adam_class_for(config)`,
  which returns those same classes when both moment dtypes are FP32 and
  `AdamWBF16Moments` otherwise. Its `init_state_fn` (lines 588-596), which allocates the
  moments with `torch.zeros_like(p)` (FP32) before a checkpoint is loaded into them, lets
  `AdamWBF16Moments` allocate them in their storage dtypes instead.
- megatron/core/optimizer/optimizer_config.py:476-481, in `OptimizerConfig.__post_init__`,
  accepts bf16 (besides fp32) for `exp_avg_dtype` / `exp_avg_sq_dtype` without the
  precision-aware optimizer. `config.exp_avg_dtype` then tells the truth, and the
  distributed optimizer reads it to allocate its state before a load
  (distrib_optimizer.py:817-823 `_get_state_key_dtype`, used at 1004).

Checkpoints (distributed optimizer): the default `dp_reshardable` format (and
`fully_sharded_model_space`) saves the state tensors as they are, BF16. The
`fully_reshardable` (`--dist-ckpt-optim-fully-reshardable`) and `dp_zero_gather_scatter`
formats gather through FP32 buffers (distrib_optimizer.py:1317-1318, 1341, 1364-1365
in `get_parameter_state_dp_zero`; 2310-2311 in `load_parameter_state_from_dp_zero`,
2196-2197 in its legacy variant), so they store the BF16 moments upcast to FP32:
lossless (every BF16 value is an FP32 value, and `copy_` back into the BF16 state is
exact), but twice the moments' bytes on disk. The non-distributed optimizers save the
`optimizer.state_dict()` tensors as they are, BF16 (`FP32Optimizer` is tested;
`Float16OptimizerWithFloat16Params` shares its code but does not run on CPU today).
"""

from __future__ import annotations

import argparse
import functools
import importlib

import torch

from integration.patching import Fix, Patcher, rewrite_function, source_has
from plugins import PluginError
from plugins.fp8.adam import AdamWBF16Moments

VERSION = "megatron-core 0.19.2"

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
           "fp8": torch.uint8}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _lines(indent: int, *lines: str) -> str:
    """Source lines at `indent` spaces, as they stand in the upstream function."""
    return "".join(" " * indent + line + "\n" for line in lines)


# megatron/core/optimizer/__init__.py:556-557 and 592 (megatron-core 0.19.2).
_CLASS_CHOICE = _lines(
    12, "if USING_PYTORCH_OPTIMIZER:",
    "    adam_cls = torch.optim.AdamW if config.decoupled_weight_decay else torch.optim.Adam")
_CLASS_CHOICE_FIXED = _lines(
    12, "from plugins.fp8.optimizer_hook import AdamWBF16Moments, adam_class_for  # megaseek",
    "if USING_PYTORCH_OPTIMIZER:",
    "    adam_cls = adam_class_for(config)")
_INIT_STATE = _lines(28, "if config is None or not config.use_precision_aware_optimizer:")
_INIT_STATE_FIXED = _lines(
    28, "if isinstance(opt, AdamWBF16Moments):  # megaseek: moments in their storage dtypes",
    "    opt.initialize_state(p)",
    "elif config is None or not config.use_precision_aware_optimizer:")


def _config_check(key: str) -> tuple[str, str]:
    """optimizer_config.py:476-481: the assertion on `{key}_dtype`, and its relaxed form."""
    old = (f"self.{key}_dtype == torch.float32\n"
           f"            ), \"{key}_dtype can only be fp32 when not using precision-aware "
           "optimizer\"")
    new = (f"self.{key}_dtype in (torch.float32, torch.bfloat16)\n"
           f"            ), \"{key}_dtype can only be fp32, or bf16 (megaseek's "
           "AdamWBF16Moments), when not using precision-aware optimizer\"")
    return old, new


def adam_class_for(config):
    """What `_get_megatron_optimizer_based_on_param_groups` builds for `config.optimizer ==
    'adam'` with torch's optimizers: Megatron's own choice when both moments are FP32."""
    dtypes = (config.exp_avg_dtype, config.exp_avg_sq_dtype)
    if all(d == torch.float32 for d in dtypes):
        return torch.optim.AdamW if config.decoupled_weight_decay else torch.optim.Adam
    return functools.partial(AdamWBF16Moments,
                             decoupled_weight_decay=config.decoupled_weight_decay,
                             exp_avg_dtype=config.exp_avg_dtype,
                             exp_avg_sq_dtype=config.exp_avg_sq_dtype)


def _module(name: str):
    return importlib.import_module(name)


def _factory_owner():
    return _module("megatron.core.optimizer")


def _config_cls():
    return _module("megatron.core.optimizer.optimizer_config").OptimizerConfig


def _apply_adam_class(p: Patcher) -> None:
    owner = _factory_owner()
    name = "_get_megatron_optimizer_based_on_param_groups"
    p.setattr(owner, name, rewrite_function(owner, name, {_CLASS_CHOICE: _CLASS_CHOICE_FIXED,
                                                          _INIT_STATE: _INIT_STATE_FIXED}))


def _apply_config_check(p: Patcher) -> None:
    cls = _config_cls()
    p.setattr(cls, "__post_init__", rewrite_function(
        cls, "__post_init__", dict(_config_check(k) for k in ("exp_avg", "exp_avg_sq"))))


FIXES: tuple[Fix, ...] = (
    Fix("bf16-moments-adam-class",
        f"megatron/core/optimizer/__init__.py:556-557,588-596 ({VERSION})",
        "without TE/Apex Megatron builds torch.optim.AdamW/Adam, whose moments take the FP32 "
        "parameters' dtype, and its init_state_fn allocates FP32 moments",
        lambda: source_has(_factory_owner()._get_megatron_optimizer_based_on_param_groups,
                           _CLASS_CHOICE, _INIT_STATE),
        _apply_adam_class),
    Fix("bf16-moments-config-check",
        f"megatron/core/optimizer/optimizer_config.py:476-481 ({VERSION})",
        "OptimizerConfig refuses exp_avg_dtype/exp_avg_sq_dtype other than fp32 without the "
        "precision-aware optimizer (TE's FusedAdam)",
        lambda: source_has(_config_cls().__post_init__,
                           *(_config_check(k)[0] for k in ("exp_avg", "exp_avg_sq"))),
        _apply_config_check),
)


def install_bf16_moments(patcher: Patcher) -> Patcher:
    """Lets Megatron's optimizer factory build `AdamWBF16Moments` when the config asks for
    BF16 moments (a no-op change for FP32 moments). `patcher.undo()` restores Megatron.
    Applying it twice changes nothing."""
    for fix in FIXES:
        if fix.still_needed():
            fix.apply(patcher)
    return patcher


def _dtype(value) -> torch.dtype:
    return value if isinstance(value, torch.dtype) else _DTYPES[value]


def torch_adam_in_use() -> bool:
    """Megatron falls back to torch's Adam (megatron/core/optimizer/__init__.py:13-35)."""
    return bool(_factory_owner().USING_PYTORCH_OPTIMIZER)


def check_moment_flags(args: argparse.Namespace) -> bool:
    """Validates Megatron's moment-dtype flags for a run without TE's precision-aware
    optimizer; returns whether BF16 moments must be installed. Raises `PluginError`
    naming the flags to change where the request cannot be honoured as asked."""
    dtypes = {"--exp-avg-dtype": _dtype(args.exp_avg_dtype),
              "--exp-avg-sq-dtype": _dtype(args.exp_avg_sq_dtype)}
    if all(d == torch.float32 for d in dtypes.values()):
        return False
    asked = " ".join(f"{flag} {_NAMES.get(d, d)}" for flag, d in dtypes.items())
    if getattr(args, "use_precision_aware_optimizer", False):
        if not torch_adam_in_use():
            return False  # Megatron's own precision-aware optimizer (TE's FusedAdam) does it
        raise PluginError(
            "--use-precision-aware-optimizer needs Transformer Engine's FusedAdam, which is "
            f"not installed. For BF16 moments with FP32 master weights without TE, give {asked} "
            "without --use-precision-aware-optimizer")
    if not torch_adam_in_use():
        raise PluginError(
            f"{asked}: Megatron uses Transformer Engine's or Apex's FusedAdam here; with TE "
            "add --use-precision-aware-optimizer --use-distributed-optimizer (TE keeps the "
            "moments in those dtypes itself)")
    unsupported = [f"{flag} {_NAMES.get(d, d)}" for flag, d in dtypes.items()
                   if d not in (torch.float32, torch.bfloat16)]
    if unsupported:
        raise PluginError(f"{', '.join(unsupported)}: without Transformer Engine the Adam "
                          "moments can be stored in fp32 or bf16 only")
    if args.optimizer != "adam":
        raise PluginError(f"{asked} applies to Adam's moments: use --optimizer adam "
                          f"(got --optimizer {args.optimizer})")
    for flag, dest in (("--optimizer-cpu-offload", "optimizer_cpu_offload"),
                       ("--use-megatron-fsdp", "use_megatron_fsdp"),
                       ("--use-torch-fsdp2", "use_torch_fsdp2"),
                       ("--use-layer-wise-distributed-optimizer",
                        "use_layer_wise_distributed_optimizer")):
        if getattr(args, dest, False):
            raise PluginError(f"{asked} without Transformer Engine is supported with Megatron's "
                              f"DDP and distributed optimizer, not with {flag}")
    return True


def attach_bf16_moments(args: argparse.Namespace, patcher: Patcher) -> bool:
    """Validates the flags and, where BF16 moments are asked for without TE, installs them
    (before Megatron builds its `OptimizerConfig`). Returns whether it installed."""
    if not check_moment_flags(args):
        return False
    install_bf16_moments(patcher)
    return True
