"""The checkpoint-mismatch seam: a checkpoint that does not fit the run (another model
configuration, other learning-rate or weight-decay settings, arguments Megatron compares)
fails naming the flags that differ and how to settle it, instead of the KeyError, shape
error or AssertionError deep in Megatron's load. (A changed learning-rate schedule:
`upstream.seams.scheduler_mismatch`.)"""

from __future__ import annotations

import re
from functools import wraps
from typing import Iterable

from upstream.megatron_modules import megatron_checkpointing, megatron_module, megatron_training
from upstream.patching import Fix, Patcher, source_has
from upstream.seams import SEAM, VERSION
from upstream.seams.checkpoint_state import plugins_saved_in
from upstream.seams.errors import CheckpointMismatch


# Flags that shape the model, compared with the ones a checkpoint was saved with.
_MODEL_FLAGS = ("plugins", "num_layers", "hidden_size", "ffn_hidden_size",
                "num_attention_heads", "group_query_attention", "num_query_groups",
                "kv_channels", "multi_latent_attention", "q_lora_rank", "kv_lora_rank",
                "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "num_experts",
                "moe_layer_freq", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
                "normalization", "swiglu", "add_bias_linear", "qk_layernorm",
                "untie_embeddings_and_output_weights", "position_embedding_type",
                "mtp_num_layers", "transformer_impl")
# What shapes the optimizer's state: its keys (the FP32 main copy of BF16/FP16 weights,
# optimizer.state.fp32_param.*) and layout.
_OPTIMIZER_STATE_FLAGS = ("bf16", "fp16", "use_distributed_optimizer",
                          "use_precision_aware_optimizer", "optimizer")


def checkpoint_mismatch_named() -> Fix:
    """A load that finds a key missing from the checkpoint, or saved with another shape,
    fails naming the key and the model flags (`--plugins` included) that differ from the
    checkpoint's, instead of torch's KeyError listing every key the checkpoint has (or its
    shape error, inside torch's per-rank report); an optimizer state whose parameter groups
    were saved with another --lr (--min-lr, weight decay) fails naming those flags. A load
    of a checkpoint holding the state of a plugin this run does not enable says so."""

    def apply(patcher: Patcher) -> None:
        checkpointing = megatron_checkpointing()
        load_checkpoint = checkpointing.load_checkpoint

        @wraps(load_checkpoint)
        def load_or_name_the_mismatch(*args, **kwargs):
            from megatron.core.dist_checkpointing.core import CheckpointingException
            from megatron.training import get_args
            from torch.distributed.checkpoint.api import CheckpointException

            run_args = get_args()
            saved_by = plugins_saved_in(run_args)
            try:
                result = load_checkpoint(*args, **kwargs)
            except (KeyError, ValueError, CheckpointingException, CheckpointException) as error:
                if _param_group_missing(error):
                    raise CheckpointMismatch(_param_group_message(run_args)) from error
                found = _model_mismatch_in(error)
                if found is None:
                    raise
                raise CheckpointMismatch(_mismatch_message(run_args, found)) from error
            left = saved_by - set(getattr(run_args, "plugins", None) or ())
            _say_state_left_behind(run_args.load, sorted(left))
            return result

        patcher.setattr(checkpointing, "load_checkpoint", load_or_name_the_mismatch)
        training = megatron_training()
        if getattr(training, "load_checkpoint", None) is load_checkpoint:
            patcher.setattr(training, "load_checkpoint", load_or_name_the_mismatch)
        check_checkpoint_args = checkpointing.check_checkpoint_args

        @wraps(check_checkpoint_args)
        def check_or_name_the_flag(checkpoint_args, *args, **kwargs):
            try:
                return check_checkpoint_args(checkpoint_args, *args, **kwargs)
            except AssertionError as error:
                found = _COMPARED.match(str(error))
                if found is None:
                    raise
                raise CheckpointMismatch(_compared_message(*found.groups())) from None

        patcher.setattr(checkpointing, "check_checkpoint_args", check_or_name_the_flag)

    return Fix(
        "seam:checkpoint-mismatch-named",
        "megatron/training/checkpointing.py:166 (check_checkpoint_args asserts, naming the "
        "attribute), megatron/core/dist_checkpointing/strategies/torch.py:522 (MCoreLoadPlanner."
        "_validate_global_shapes raises KeyError with every checkpoint key, :534 "
        "CheckpointingException 'Global shape mismatch'), core/optimizer/optimizer.py:640 "
        "(_filter_and_reorder_param_groups: 'Could not find parameter group'), "
        f"training/checkpointing.py:2066 load_checkpoint ({VERSION})",
        "a checkpoint saved with another model configuration (or --lr) fails deep in the "
        "load with a list of the checkpoint's keys; the error names the key and the flags",
        lambda: source_has(megatron_module("megatron.core.dist_checkpointing.strategies.torch")
                           .MCoreLoadPlanner._validate_global_shapes, "raise KeyError(",
                           "'Global shape mismatch for loaded (") and
        source_has(megatron_module("megatron.core.optimizer.optimizer")
                   .MegatronOptimizer._filter_and_reorder_param_groups,
                   f'"{_NO_PARAM_GROUP} with key') and
        source_has(megatron_checkpointing().check_checkpoint_args,
                   "value from checkpoint ({}) is not equal to the input argument value ({})"),
        apply, SEAM)


# check_checkpoint_args's assertion: '<attribute> value from checkpoint (A) is not equal to
# the input argument value (B).'
_COMPARED = re.compile(r"^(\w+) value from checkpoint \((.*)\) is not equal to the input "
                       r"argument value \((.*)\)\.$", re.S)
# The attributes it compares that are not named as their flag.
_COMPARED_FLAGS = {
    "add_position_embedding": "--no-position-embedding (add_position_embedding)",
    "padded_vocab_size": "the padded vocabulary (--vocab-size or the tokenizer's, and "
                         "--make-vocab-size-divisible-by)",
}


def _compared_message(name: str, saved: str, run: str) -> str:
    """Megatron's check of the saved arguments (the model's sizes, the tokenizer, and
    outside torch_dist the parallel layout) found `name` differ."""
    flag = _COMPARED_FLAGS.get(name, "--" + name.replace("_", "-"))
    from megatron.training import get_args

    layout = name.endswith("model_parallel_size")  # compared for --ckpt-format torch only
    return (f"--load {get_args().load}: the checkpoint was saved with {flag} {saved}, this "
            f"run has {run}: resume with the value it was saved with"
            + (" (a --ckpt-format torch checkpoint loads only into the parallel layout it "
               "was saved with; torch_dist checkpoints reshard)" if layout else ""))


def _model_mismatch_in(error: Exception) -> Exception | None:
    """The planner's missing-key KeyError or shape-mismatch CheckpointingException, itself
    or as torch's CheckpointException collected it from a rank."""
    failures = getattr(error, "failures", {}).values()  # rank -> (exception, stack)
    for found in [error, *(f[0] if isinstance(f, tuple) else f for f in failures)]:
        text = str(found.args[0]) if found.args else ""
        if isinstance(found, KeyError) and _NOT_SAVED in text:
            return found
        if type(found).__name__ == "CheckpointingException" and text.startswith(_RESHAPED):
            return found
    return None


_NOT_SAVED = " from model not in state dict"
_RESHAPED = "Global shape mismatch for loaded ("


def _mismatch_message(args, error: Exception) -> str:
    text = str(error.args[0]) if error.args else str(error)
    if text.startswith(_RESHAPED):  # "... loaded (SHAPE) and expected (SHAPE) tensor for key K"
        key = text.rsplit(" for key ", 1)[-1]
        shapes = text[len(_RESHAPED):].split(" tensor for key ")[0]
        saved_shape, _, run_shape = shapes.partition(") and expected (")
        what = (f"the checkpoint's '{key}' has shape {_shape(saved_shape)}, this run's model "
                f"needs {_shape(run_shape)}")
    else:
        key = text.split(_NOT_SAVED)[0].strip("\"' ")
        what = f"the checkpoint has no '{key}', which this run's model needs"
    in_optimizer = ".optimizer." in f".{key}"
    differ = _flags_that_differ(args, _MODEL_FLAGS + (_OPTIMIZER_STATE_FLAGS if in_optimizer
                                                      else ()))
    return (f"--load {args.load}: {what}: it was saved with another "
            + ("configuration" if in_optimizer else "model configuration") + ". "
            + ("Flags that differ: " + "; ".join(differ) + "." if differ else
               "Its saved arguments could not be compared.")
            + " Load it with the configuration it was saved with"
            + (", or give --no-load-optim to start the optimizer state afresh."
               if in_optimizer else "."))


def _shape(text: str) -> str:
    """'torch.Size([128])' or '(256,)' as '(128)', '(256)'."""
    digits = [d for d in text.replace("torch.Size", "").strip("()[], ").split(",") if d.strip()]
    return "(" + ", ".join(d.strip(" []()") for d in digits) + ")"


def _flags_that_differ(args, names: Iterable[str]) -> list[str]:
    """'--flag (checkpoint: X, this run: Y)' for each of `names` the checkpoint's saved
    arguments hold another value of (none where they cannot be read)."""
    saved = _saved_args(args)
    if saved is None:
        return []
    return [f"--{name.replace('_', '-')} (checkpoint: {_shown(_value(saved, name))}, "
            f"this run: {_shown(_value(args, name))})"
            for name in names if _value(saved, name) != _value(args, name)]


def _value(args, name: str):
    # Without GQA Megatron fills num_query_groups in (= the heads) only as it trains
    # (training.py:554): a checkpoint's value and a starting run's differ with no flag given.
    if name == "num_query_groups" and not getattr(args, "group_query_attention", False):
        return None
    return getattr(args, name, None)


# An optimizer state's parameter groups are found by their max_lr, min_lr, start_wd, end_wd
# (optimizer.py:139 param_group_identifier_keys): the flags those come from.
_NO_PARAM_GROUP = "Could not find parameter group"
_PARAM_GROUP_FLAGS = ("lr", "min_lr", "weight_decay", "start_weight_decay",
                      "end_weight_decay", "decoupled_lr", "decoupled_min_lr")


def _param_group_missing(error: Exception) -> bool:
    """Megatron's optimizer found no saved parameter group for one of this run's: its
    ValueError, or the distributed optimizer's KeyError of the group's identifier tuple."""
    if isinstance(error, ValueError):
        return str(error).startswith(_NO_PARAM_GROUP)
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    return (isinstance(error, KeyError) and bool(error.args) and isinstance(error.args[0], tuple)
            and len(error.args[0]) == len(param_group_identifier_keys))


def _param_group_message(args) -> str:
    differ = _flags_that_differ(args, _PARAM_GROUP_FLAGS)
    return (f"--load {args.load}: the checkpoint's optimizer state was saved with other "
            "learning-rate or weight-decay settings, which name its parameter groups"
            + (" (flags that differ: " + "; ".join(differ) + ")" if differ else "")
            + ": resume with the checkpoint's values, or give --no-load-optim to start the "
            "optimizer state and the learning-rate schedule afresh")


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "(none)"
    return str(value)


def _saved_args(args):
    """The arguments stored in the checkpoint `args.load` names, or None."""
    try:
        from megatron.core.dist_checkpointing.serialization import load_common_state_dict

        checkpointing = megatron_checkpointing()
        iteration, release = checkpointing.read_metadata(
            checkpointing.get_checkpoint_tracker_filename(args.load))
        if getattr(args, "ckpt_step", None) is not None:
            iteration, release = args.ckpt_step, False
        directory = checkpointing.get_checkpoint_name(args.load, iteration, release,
                                                      return_base_dir=True)
        return load_common_state_dict(directory).get("args")
    except (OSError, KeyError, ValueError, RuntimeError):
        return None


def _say_state_left_behind(load_dir: str, names: list[str]) -> None:
    """Rank 0 says once which plugin state the checkpoint holds that this run leaves: a
    warning, not a refusal, as Megatron loads a checkpoint with unexpected keys (its
    --dist-ckpt-strictness default), and dropping e.g. the EMA can be meant."""
    import torch.distributed as dist

    if names and (not dist.is_initialized() or dist.get_rank() == 0):
        plugins = ",".join(names)
        print(f" megaseek: warning: --load {load_dir} holds the state of --plugins {plugins}, "
              f"which this run does not enable: it is not loaded, and this run's checkpoints "
              f"will not have it (add --plugins {plugins} to keep it)", flush=True)
