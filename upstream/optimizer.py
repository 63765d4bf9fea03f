"""Megatron's optimizer factory with Adam moments stored in BF16, without Transformer Engine.

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

`bf16_moments_fixes(adam_class)` makes the first form work where Megatron uses torch's
Adam (no TE, no Apex), by two narrow, undoable rewrites; `adam_class` is the optimizer
that keeps the moments in their dtypes (the `bf16_moments` plugin passes its
`AdamWBF16Moments`):

- megatron/core/optimizer/__init__.py:556-557, in `_get_megatron_optimizer_based_on_param_groups`,
  picks `torch.optim.AdamW` / `torch.optim.Adam`; it now asks `adam_class_for(config,
  adam_class)`, which returns those same classes when both moment dtypes are FP32 and
  `adam_class` otherwise. Its `init_state_fn` (lines 588-596), which allocates the
  moments with `torch.zeros_like(p)` (FP32) before a checkpoint is loaded into them, lets
  an `adam_class` optimizer allocate them in their storage dtypes instead
  (`initialize_state(p)`, the name TE's FusedAdam uses for the same thing).
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

import torch

from upstream.megatron_modules import megatron_module
from upstream.patching import Fix, Patcher, Scope, rewrite_function, source_has

VERSION = "megatron-core 0.19.2"

MOMENT_FLAGS = {"--exp-avg-dtype": "exp_avg_dtype", "--exp-avg-sq-dtype": "exp_avg_sq_dtype"}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
           "fp8": torch.uint8}  # megatron/training/arguments.py:1050 map_dtype


def moment_dtypes(args: argparse.Namespace) -> dict[str, torch.dtype]:
    """{flag: dtype} of Megatron's moment flags, before (strings) or after validate_args."""
    return {flag: _as_dtype(getattr(args, dest, "fp32")) for flag, dest in MOMENT_FLAGS.items()}


def _as_dtype(value) -> torch.dtype:
    return value if isinstance(value, torch.dtype) else _DTYPES[value]


def bf16_moments_asked(args: argparse.Namespace | None) -> bool:
    """A moment flag says bf16, and Megatron's optimizer will be its own (not TE's
    precision-aware one, which stores the moments in those dtypes itself)."""
    if args is None or getattr(args, "use_precision_aware_optimizer", False):
        return False
    return torch.bfloat16 in moment_dtypes(args).values()


BF16_MOMENTS = Scope("flag --exp-avg-dtype/--exp-avg-sq-dtype bf16, no "
                     "--use-precision-aware-optimizer (plugin bf16_moments)", bf16_moments_asked)


def adam_class_for(config, adam_class):
    """What `_get_megatron_optimizer_based_on_param_groups` builds for `config.optimizer ==
    'adam'` with torch's optimizers: Megatron's own choice when both moments are FP32,
    else `adam_class` with the moment dtypes."""
    dtypes = (config.exp_avg_dtype, config.exp_avg_sq_dtype)
    if all(d == torch.float32 for d in dtypes):
        return torch.optim.AdamW if config.decoupled_weight_decay else torch.optim.Adam
    return functools.partial(adam_class, decoupled_weight_decay=config.decoupled_weight_decay,
                             exp_avg_dtype=config.exp_avg_dtype,
                             exp_avg_sq_dtype=config.exp_avg_sq_dtype)


def _lines(indent: int, *lines: str) -> str:
    """Source lines at `indent` spaces, as they stand in the upstream function."""
    return "".join(" " * indent + line + "\n" for line in lines)


# megatron/core/optimizer/__init__.py:556-557 and 592 (megatron-core 0.19.2). The rewrite
# reads two names that the fix adds to that module (and its undo removes).
_CHOICE, _CLASS = "_megaseek_adam_class_for", "_megaseek_moments_adam_class"
_CLASS_CHOICE = _lines(
    12, "if USING_PYTORCH_OPTIMIZER:",
    "    adam_cls = torch.optim.AdamW if config.decoupled_weight_decay else torch.optim.Adam")
_CLASS_CHOICE_FIXED = _lines(
    12, "if USING_PYTORCH_OPTIMIZER:",
    f"    adam_cls = {_CHOICE}(config, {_CLASS})  # megaseek: upstream.optimizer")
_INIT_STATE = _lines(28, "if config is None or not config.use_precision_aware_optimizer:")
_INIT_STATE_FIXED = _lines(
    28, f"if isinstance(opt, {_CLASS}):  # megaseek: moments in their storage dtypes",
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



def _factory_owner():
    return megatron_module("megatron.core.optimizer")


def _config_cls():
    return megatron_module("megatron.core.optimizer.optimizer_config").OptimizerConfig


def torch_adam_in_use() -> bool:
    """Megatron falls back to torch's Adam (megatron/core/optimizer/__init__.py:13-35)."""
    return bool(_factory_owner().USING_PYTORCH_OPTIMIZER)


def fused_adam_package() -> str | None:
    """Whose FusedAdam Megatron uses: "transformer_engine", "apex", or None (torch's Adam)."""
    if torch_adam_in_use():
        return None
    return _factory_owner().Adam.__module__.split(".")[0]


def _apply_config_check(p: Patcher) -> None:
    cls = _config_cls()
    p.setattr(cls, "__post_init__", rewrite_function(
        cls, "__post_init__", dict(_config_check(k) for k in ("exp_avg", "exp_avg_sq"))))


def bf16_moments_fixes(adam_class: type | None) -> tuple[Fix, Fix]:
    """The two fixes, building `adam_class` where a moment is not FP32. `adam_class` takes
    torch.optim.AdamW's arguments plus `decoupled_weight_decay`, `exp_avg_dtype` and
    `exp_avg_sq_dtype`, and allocates zero moments with `initialize_state(param)`. With
    None the records are for listing and probing only (`upstream.registry`): the first
    one's apply refuses."""

    def apply_adam_class(p: Patcher) -> None:
        if adam_class is None:
            raise TypeError("bf16-moments-adam-class was built without an Adam class "
                            "(a record for listing); the bf16_moments plugin applies its own")
        owner = _factory_owner()
        name = "_get_megatron_optimizer_based_on_param_groups"
        p.setattr(owner, _CHOICE, adam_class_for)
        p.setattr(owner, _CLASS, adam_class)
        p.setattr(owner, name, rewrite_function(owner, name, {_CLASS_CHOICE: _CLASS_CHOICE_FIXED,
                                                              _INIT_STATE: _INIT_STATE_FIXED}))

    return (
        Fix("bf16-moments-adam-class",
            f"megatron/core/optimizer/__init__.py:556-557,588-596 ({VERSION})",
            "without TE/Apex Megatron builds torch.optim.AdamW/Adam, whose moments take the "
            "FP32 parameters' dtype, and its init_state_fn allocates FP32 moments",
            lambda: source_has(_factory_owner()._get_megatron_optimizer_based_on_param_groups,
                               _CLASS_CHOICE, _INIT_STATE),
            apply_adam_class, BF16_MOMENTS),
        Fix("bf16-moments-config-check",
            f"megatron/core/optimizer/optimizer_config.py:476-481 ({VERSION})",
            "OptimizerConfig refuses exp_avg_dtype/exp_avg_sq_dtype other than fp32 without "
            "the precision-aware optimizer (TE's FusedAdam)",
            lambda: source_has(_config_cls().__post_init__,
                               *(_config_check(k)[0] for k in ("exp_avg", "exp_avg_sq"))),
            _apply_config_check, BF16_MOMENTS),
    )
