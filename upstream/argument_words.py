"""Megatron's failed argument checks in words (megatron-core 0.19.2).

Many of `validate_args`'s asserts carry no message (`assert not args.bf16`), and some
carry one that names no flag ('expected iteration-based training'). `in_words` turns
one into what a user can act on: a sentence naming the flags for the common bare
conditions (`WORDS`) and for a required flag left out, else the condition with the flags
its `args.X` names read as `--x` and their values.
"""

from __future__ import annotations

import ast
import re
from typing import Any

# The bare conditions of validate_args (megatron/training/arguments.py, 0.19.2), each said
# as the flags that conflict; `{dest}` is the flag's value. Conditions are as
# `ast.unparse` writes them.
WORDS = {
    "not args.bf16": "--fp16 and --bf16 both given: choose one",
    "not args.fp16": "--fp16 and --bf16 both given: choose one",
    "args.micro_batch_size is not None": "give --micro-batch-size",
    "args.micro_batch_size > 0": "--micro-batch-size {micro_batch_size} must be 1 or more",
    "args.global_batch_size > 0": "--global-batch-size {global_batch_size} must be 1 or more",
    "args.num_dataset_builder_threads > 0":
        "--num-dataset-builder-threads {num_dataset_builder_threads} must be 1 or more",
    "args.ckpt_convert_save is not None": "--ckpt-convert-format needs --ckpt-convert-save DIR",
    "args.load is not None": "--ckpt-convert-format needs --load DIR",
    "args.context_parallel_size == prod(args.hierarchical_context_parallel_sizes)":
        "--hierarchical-context-parallel-sizes {hierarchical_context_parallel_sizes} must "
        "multiply to --context-parallel-size {context_parallel_size}",
    "args.data_path is None or args.data_args_path is None":
        "--data-path and --data-args-path both given: choose one",
    "any((elt is not None for elt in [args.train_data_path, args.valid_data_path, "
    "args.test_data_path])) is False or args.per_split_data_args_path is None":
        "--train-data-path/--valid-data-path/--test-data-path and "
        "--per-split-data-args-path both given: choose one",
    "args.hidden_size % args.num_attention_heads == 0":
        "--hidden-size {hidden_size} is not divisible by --num-attention-heads "
        "{num_attention_heads} (make it so, or give --kv-channels)",
    "args.encoder_seq_length is None":
        "--seq-length and --encoder-seq-length both given: give --seq-length only",
    "args.encoder_seq_length is not None": "give --seq-length",
    "args.max_position_embeddings >= args.decoder_seq_length":
        "--decoder-seq-length {decoder_seq_length} is above --max-position-embeddings "
        "{max_position_embeddings}",
    "args.min_lr <= args.lr": "--min-lr {min_lr} is above --lr {lr}",
    "args.save_interval is not None": "--save needs --save-interval N",
    "args.save_interval > 0": "--save-interval {save_interval} must be 1 or more",
    "args.save_retain_interval > 0":
        "--save-retain-interval {save_retain_interval} must be 1 or more",
    "args.save_retain_interval % args.save_interval == 0":
        "--save-retain-interval {save_retain_interval} must be a multiple of --save-interval "
        "{save_interval}",
    "not args.overlap_param_gather":
        "--save-params-interval cannot be combined with --overlap-param-gather",
    "args.log_memory_interval % args.log_interval == 0":
        "--log-memory-interval {log_memory_interval} must be a multiple of --log-interval "
        "{log_interval}",
    "args.start_weight_decay is None":
        "--weight-decay-incr-style constant takes --weight-decay, not --start-weight-decay",
    "args.end_weight_decay is None":
        "--weight-decay-incr-style constant takes --weight-decay, not --end-weight-decay",
    "args.start_weight_decay is not None":
        "--weight-decay-incr-style {weight_decay_incr_style} needs --start-weight-decay and "
        "--end-weight-decay",
    "args.end_weight_decay is not None":
        "--weight-decay-incr-style {weight_decay_incr_style} needs --start-weight-decay and "
        "--end-weight-decay",
    "args.use_dist_ckpt":
        "--use-distributed-optimizer without Gloo process groups (--disable-gloo-process-"
        "groups) needs a distributed checkpoint format: give --ckpt-format torch_dist",
}

_ARGS_NAME = re.compile(r"\bargs\.(\w+)")
# arguments.py:1924 _check_arg_is_not_none, for --num-layers, --hidden-size,
# --num-attention-heads and --max-position-embeddings: "<dest> argument is None".
_REQUIRED = "getattr(args, arg) is not None"


# Messages of validate_args that name no flag and whose condition names only one side of
# the conflict (the other is the `if` around the assert: arguments.py:1236-1258).
MESSAGES = {
    "expected iteration-based training":
        "--train-iters {train_iters} and --train-samples {train_samples} both given: train "
        "by one of them",
    "expected iteration-based learning rate decay":
        "--lr-decay-samples {lr_decay_samples} with --train-iters {train_iters}: training "
        "counts iterations, so give --lr-decay-iters instead",
    "expected iteration-based learning rate warmup":
        "--lr-warmup-samples {lr_warmup_samples} with --train-iters {train_iters}: training "
        "counts iterations, so give --lr-warmup-iters instead",
    "expected sample-based training":
        "--train-samples {train_samples} and --train-iters {train_iters} both given: train "
        "by one of them",
    "expected sample-based learning rate decay":
        "--lr-decay-iters {lr_decay_iters} with --train-samples {train_samples}: training "
        "counts samples, so give --lr-decay-samples instead",
    "expected sample-based learnig rate warmup":
        "--lr-warmup-iters {lr_warmup_iters} with --train-samples {train_samples}: training "
        "counts samples, so give --lr-warmup-samples instead",
}


def in_words(condition: str | None, message: str, args: Any) -> str:
    """What a failed check of Megatron's says: its message, with the flags of its condition
    where the message names none; for a bare condition, `WORDS`' sentence, or the condition
    and its flags."""
    if condition == _REQUIRED and message.endswith(" argument is None"):
        return f"give --{message.split()[0].replace('_', '-')} (Megatron requires it)"
    if message in MESSAGES:
        return MESSAGES[message].format_map(_Values(args))
    if message:
        if "--" in message or not condition:
            return message
        named = flags_of(condition, args)
        return f"{message} ({named})" if named else message
    if condition is None:
        return "(a check without a message)"
    known = WORDS.get(condition)
    if known is not None:
        return known.format_map(_Values(args))
    named = flags_of(condition, args)
    return f"`{condition}` does not hold" + (f" for {named}" if named else "")


def flags_of(condition: str, args: Any) -> str:
    """`--x VALUE, --y VALUE` for the `args.x`, `args.y` a condition reads, in order; a
    value no flag sets is said as what it derives from (`DERIVED`)."""
    dests = dict.fromkeys(_ARGS_NAME.findall(condition))
    return ", ".join(DERIVED[dest](args) if dest in DERIVED
                     else _flag_and_value(dest, getattr(args, dest, None)) for dest in dests)


_MODEL_PARALLEL = ("--tensor-model-parallel-size x --pipeline-model-parallel-size x "
                   "--context-parallel-size")


def _defaulted(dest: str, source: str):
    """An eval batch flag that defaults to the training one (arguments.py:690)."""
    def said(args: Any) -> str:
        value, flag = getattr(args, dest, None), "--" + dest.replace("_", "-")
        if value is not None and value == getattr(args, source, None):
            return f"{flag} {value} (--{source.replace('_', '-')}'s, where it is not given)"
        return _flag_and_value(dest, value)
    return said


# Values validate_args derives (megatron/training/arguments.py, 0.19.2) rather than parses:
# the user sets them through other flags, or (the world size) through the launcher.
DERIVED = {
    "world_size": lambda args: (
        f"the {getattr(args, 'world_size', '?')} ranks of the run, in model replicas of "
        f"{_MODEL_PARALLEL} ranks each"),
    "data_parallel_size": lambda args: (
        f"data-parallel size {getattr(args, 'data_parallel_size', '?')} (the ranks of the "
        f"run / {_MODEL_PARALLEL})"),
    # arguments.py:438 copies it from --pipeline-model-parallel-size; the layer checks that
    # divide by it count one more layer per --account-for-*-in-pipeline-split.
    "transformer_pipeline_model_parallel_size": lambda args: (
        f"--pipeline-model-parallel-size "
        f"{getattr(args, 'transformer_pipeline_model_parallel_size', '?')}"
        + "".join(f", {flag} (one more layer)" for dest, flag in (
            ("account_for_embedding_in_pipeline_split",
             "--account-for-embedding-in-pipeline-split"),
            ("account_for_loss_in_pipeline_split", "--account-for-loss-in-pipeline-split"))
                  if getattr(args, dest, False))),
    "eval_global_batch_size": _defaulted("eval_global_batch_size", "global_batch_size"),
    "eval_micro_batch_size": _defaulted("eval_micro_batch_size", "micro_batch_size"),
}


def _flag_and_value(dest: str, value: Any) -> str:
    flag = "--" + dest.replace("_", "-")
    if value is True:
        return flag
    if value is None or value is False:
        return f"{flag} (not given)"
    if isinstance(value, (list, tuple)):
        return f"{flag} {' '.join(map(str, value))}"
    return f"{flag} {value}"


class _Values(dict):
    """`str.format_map` over an argument namespace: a missing value reads '?'."""

    def __init__(self, args: Any) -> None:
        super().__init__(vars(args) if args is not None else {})

    def __missing__(self, key: str) -> str:
        return "?"


def assert_condition(filename: str, lineno: int) -> str | None:
    """The condition of the `assert` statement at `filename:lineno` (its first line), as
    `ast.unparse` writes it; None where there is none."""
    for node in _asserts(filename):
        if node.lineno <= lineno <= (node.end_lineno or node.lineno):
            return ast.unparse(node.test)
    return None


def _asserts(filename: str) -> tuple[ast.Assert, ...]:
    try:
        with open(filename, encoding="utf-8") as source:
            tree = ast.parse(source.read())
    except (OSError, SyntaxError):
        return ()
    return tuple(node for node in ast.walk(tree) if isinstance(node, ast.Assert))
