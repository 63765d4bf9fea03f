"""megaseek's start-up checks on Megatron's own arguments: the inputs megatron-core 0.19.2
accepts and then fails on after start-up (a ZeroDivisionError, a TypeError in the
optimizer, a SIGFPE in a data worker, a RuntimeError at process-group set-up, a write
that fails mid-run), refused at start-up instead, naming the flag, whatever plugins are
on. `hooks.megatron_run` runs them on both launch paths; `megaseek describe` runs the
value checks on the flags it shares.

They live here rather than in `upstream/`: they change nothing in Megatron (no patch to
undo, nothing a newer Megatron would make obsolete by itself), they are megaseek's policy
on what it lets start. Each names where Megatron fails without it, and
tests/integration/test_argument_checks.py asserts that Megatron's own validation still lets
each input through (the check is still needed).

Two passes, with Megatron's `validate_args` between them:
- `before_megatron(args, argv)`: values on their own, which Megatron's own checks would
  misread or crash on (a negative --mtp-num-layers reads as "MTP on");
- `after_megatron(args)`: what needs the machine, the world's layout or the file system.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Callable

from plugins import PluginError
from plugins.common.paths import unwritable_directory


@dataclass(frozen=True)
class Domain:
    """`--flag` (argparse dest `dest`), when given, lies in its domain: `least` or more,
    `above` (strictly), `most` or less, `below` (strictly), finite where `finite`;
    `unless(args)` exempts a run that does not use it."""

    dest: str
    megatron_fails: str  # what Megatron (or torch) does outside it (megatron-core 0.19.2)
    least: float | None = None
    most: float | None = None
    above: float | None = None
    below: float | None = None
    finite: bool = False
    unless: Callable[[argparse.Namespace], bool] | None = None
    named: str | None = None  # the flag, where its dest is not its name (--norm-epsilon)

    @property
    def flag(self) -> str:
        return self.named or "--" + self.dest.replace("_", "-")

    def holds(self, value: float) -> bool:
        # Comparisons with NaN are False, and `value == value` is False for it where no
        # bound is set: a NaN lies in no domain.
        return ((self.least is None or value >= self.least)
                and (self.above is None or value > self.above)
                and (self.most is None or value <= self.most)
                and (self.below is None or value < self.below)
                and (not self.finite or math.isfinite(value))
                and value == value)

    def problem(self, args: argparse.Namespace) -> str | None:
        value = getattr(args, self.dest, None)
        if value is None or (self.unless is not None and self.unless(args)):
            return None
        if self.holds(value):
            return None
        return f"{self.flag} {value} must be {self.domain}" + (" (and finite)" if self.finite
                                                                else "")

    @property
    def domain(self) -> str:
        low = (self.least, "[") if self.least is not None else (self.above, "(")
        high = (self.most, "]") if self.most is not None else (self.below, ")")
        if high[0] is None:
            return (f"{_number(low[0])} or more" if low[1] == "[" else
                    f"above {_number(low[0])}")
        if low[0] is None:
            return (f"{_number(high[0])} or less" if high[1] == "]" else
                    f"below {_number(high[0])}")
        return f"in {low[1]}{_number(low[0])}, {_number(high[0])}{high[1]}"


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _skips_training(args) -> bool:
    return bool(getattr(args, "skip_train", False))


def _size(dest: str, where: str) -> Domain:
    return Domain(dest, where, least=1)


def _probability(dest: str) -> Domain:
    return Domain(dest, "torch.nn.Dropout raises 'dropout probability has to be between 0 "
                        "and 1' when the model is built", least=0, most=1)


def _adam_beta(dest: str) -> Domain:
    return Domain(dest, "torch.optim.Adam raises 'Invalid beta parameter' once the model is "
                        "built", least=0, below=1)


NUMERIC_DOMAINS = (
    _size("num_layers", "an empty decoder, built and then divided by (ZeroDivisionError)"),
    _size("hidden_size", "torch raises 'negative dimension' building the embedding"),
    _size("ffn_hidden_size", "torch raises 'negative dimension' building the MLP"),
    _size("num_attention_heads", "validate_args divides by it (ZeroDivisionError); a "
                                 "negative count builds negative dimensions"),
    _size("kv_channels", "torch raises 'negative dimension' building the attention"),
    _size("num_query_groups", "torch raises 'negative dimension' building the attention"),
    _size("num_experts", "the router is built with no experts (a raw error in torch), and "
                         "the moe plugin blames a missing --num-experts"),
    _size("moe_router_topk", "the router's torch.topk fails at the first step"),
    _size("max_position_embeddings", "torch raises 'negative dimension' building the "
                                     "position embedding"),
    _size("seq_length", "gpt_dataset.py:523 and its C++ sample index divide by it: the data "
                        "worker dies of SIGFPE with no message"),
    _size("make_vocab_size_divisible_by", "the vocabulary padding divides by it "
                                          "(ZeroDivisionError)"),
    _size("log_interval", "training.py:2816 iteration % log_interval (ZeroDivisionError)"),
    _size("eval_interval", "training.py:4481 train_iters // eval_interval "
                           "(ZeroDivisionError)"),
    Domain("eval_iters", "a negative count evaluates nothing, silently", least=0),
    Domain("train_iters", "an empty run whose learning-rate schedule has no steps "
                          "(optimizer_param_scheduler.py:159)", least=1,
           unless=_skips_training),
    _size("lr_decay_iters", "optimizer_param_scheduler.py:159 asserts lr_decay_steps > 0"),
    Domain("lr", "torch's optimizers raise 'Invalid learning rate' for a negative one once "
                 "the model is built; validate_args then blames --min-lr, NaN trains to NaN",
           least=0, finite=True),
    Domain("min_lr", "the schedule decays to it: a negative or NaN learning rate (see --lr)",
           least=0, finite=True),
    Domain("weight_decay", "torch.optim.Adam raises 'Invalid weight_decay value' once the "
                           "model is built", least=0, finite=True),
    Domain("start_weight_decay", "the weight-decay schedule starts at it (see --weight-decay)",
           least=0, finite=True),
    Domain("end_weight_decay", "the weight-decay schedule ends at it (see --weight-decay)",
           least=0, finite=True),
    _adam_beta("adam_beta1"),
    _adam_beta("adam_beta2"),
    Domain("adam_eps", "0 divides by a zero second moment: the parameters turn non-finite "
                       "a few iterations in; torch refuses a negative one late", above=0,
           finite=True),
    Domain("sgd_momentum", "torch.optim.SGD raises 'Invalid momentum value' for a negative "
                           "one; 1 or more never forgets a gradient and diverges",
           least=0, below=1),
    _probability("hidden_dropout"),
    _probability("attention_dropout"),
    Domain("init_method_std", "torch's normal_ raises 'normal expects std >= 0.0' when the "
                              "model is initialised", least=0, finite=True),
    Domain("rotary_base", "the rotary frequencies take its logarithm: a math domain error "
                          "when the model is built (0 or less)", above=0, finite=True),
    Domain("layernorm_epsilon", "0 or a negative epsilon lets a norm's denominator vanish "
                                "or turn negative: non-finite activations for a zero input; "
                                "megaseek convert refuses the same rms_norm_eps",
           above=0, finite=True, named="--norm-epsilon"),
    Domain("seed", "_set_random_seed raises 'should be a positive integer' after the "
                   "process groups are made", least=0),
    Domain("mtp_num_layers", "validate_args reads a negative count as MTP on and refuses the "
                             "position embedding instead", least=0),
    Domain("mtp_loss_scaling_factor", "the MTP loss is added with this weight: a negative "
                                      "one is maximised, NaN poisons the loss",
           least=0, finite=True),
    Domain("clip_grad", "clip_grads.py scales every gradient by clip_grad / norm: a negative "
                        "value flips them", least=0),
    # Warm-up: the scheduler reads no negative length as an error (optimizer_param_scheduler.py
    # skips a warm-up of 0 or less) and starts from --lr-warmup-init as a learning rate.
    Domain("lr_warmup_iters", "a negative warm-up is skipped without a word", least=0),
    Domain("lr_warmup_samples", "a negative warm-up is skipped without a word", least=0),
    Domain("decoupled_lr", "the embedding and output layer's learning rate (see --lr)",
           least=0, finite=True),
    Domain("decoupled_min_lr", "their schedule decays to it (see --lr)", least=0,
           finite=True),
    _size("lr_decay_samples", "optimizer_param_scheduler.py:159 asserts lr_decay_steps > 0"),
    Domain("lr_warmup_init", "the warm-up starts from it: a negative or NaN learning rate "
                             "(see --lr)", least=0, finite=True),
    # fp16's loss scaling: grad_scaler.py asserts these (lines 19, 109, 120, 124) when the
    # optimizer is built, after the model; `--loss-scale 0` reads as "not given" there
    # (optimizer/__init__.py:649) and silently scales dynamically.
    Domain("loss_scale", "grad_scaler.py:19 asserts initial_scale > 0 once the model is "
                         "built (0 silently means dynamic scaling)", above=0, finite=True),
    Domain("initial_loss_scale", "grad_scaler.py:19 asserts initial_scale > 0 once the model "
                                 "is built", above=0, finite=True),
    Domain("min_loss_scale", "grad_scaler.py:109 asserts min_scale > 0 once the model is "
                             "built", above=0, finite=True),
    Domain("loss_scale_window", "grad_scaler.py:120 asserts growth_interval > 0 once the "
                                "model is built; a fraction grows the scale every step",
           least=1, finite=True),
    Domain("hysteresis", "grad_scaler.py:124 asserts hysteresis > 0 once the model is built",
           least=1),
)


def check_values(args: argparse.Namespace) -> None:
    """The `NUMERIC_DOMAINS` table, on whichever of its flags `args` has (describe has a
    few)."""
    for rule in NUMERIC_DOMAINS:
        problem = rule.problem(args)
        if problem:
            raise PluginError(problem)


def before_megatron(args: argparse.Namespace, argv: list[str]) -> None:
    """Checks on the parsed values alone, before Megatron's `validate_args`; `argv` is the
    command line (to tell a flag given from Megatron's default)."""
    check_values(args)
    _check_model_parallel_layout(args)
    _check_batch_sizes(args)
    _check_schedule(args)
    _check_mtp_loss_scaling(args, argv)
    _check_tokenizer_for_data(args)
    _check_async_save(args)
    _check_recompute(args)
    _check_query_groups(args, argv)
    _check_batch_ramp_up(args)
    _check_sequence_parallel(args)
    _check_attention_backend(args)
    _check_embedding_wgrad_deferral(args)
    _check_wsd_schedule(args, argv)
    _check_tokenizer_files(args)
    _check_loss_scaling(args)
    _check_precision_aware_optimizer(args)
    _check_optimizer_package(args)
    _check_moe_layer_pattern(args)
    _check_pipeline_stage_layers(args)


def after_megatron(args: argparse.Namespace) -> None:
    """Checks that need the machine, the world's layout or the file system."""
    _check_backend(args)
    _check_expert_layout(args)
    _check_spec(args)
    _check_writable_directory(args, "tensorboard_dir", "--tensorboard-dir")
    _check_data_prefixes(args)


_MODEL_PARALLEL_FLAGS = ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                         "--context-parallel-size")


def _model_parallel(args) -> tuple[int, str]:
    sizes = [getattr(args, flag[2:].replace("-", "_"), None) or 1
             for flag in _MODEL_PARALLEL_FLAGS]
    return math.prod(sizes), " x ".join(f"{flag} {size}" for flag, size
                                        in zip(_MODEL_PARALLEL_FLAGS, sizes))


def _check_model_parallel_layout(args) -> None:
    """validate_args (arguments.py:430) says it of `world_size` and `total_model_size`,
    neither of them a flag."""
    model, flags = _model_parallel(args)
    if model < 1:
        raise PluginError(f"{flags} must each be 1 or more")
    if args.world_size % model:
        raise PluginError(f"{flags} = {model} must divide the {args.world_size} ranks of "
                          "the run (the ranks are split into model replicas of that size)")


def _check_batch_sizes(args) -> None:
    """Each global batch (training's, and evaluation's, which defaults to it) is split into
    micro-batches over the data-parallel ranks. validate_args (arguments.py:694) says so of
    eval_global_batch_size and eval_micro_batch_size, which a user who gave neither eval
    flag cannot find; the training batch's own check comes later (the microbatch
    calculator at initialisation)."""
    model, flags = _model_parallel(args)
    micro, total = args.micro_batch_size, args.global_batch_size
    if not micro or not total or micro < 1 or total < 1:
        return  # validate_args says those in words (argument_words)
    data_parallel = args.world_size // model
    replicas = (f"the {data_parallel} data-parallel replicas (the {args.world_size} ranks "
                f"of the run / {flags})")
    if total % (micro * data_parallel):
        raise PluginError(f"--global-batch-size {total} must be a multiple of "
                          f"--micro-batch-size {micro} x {replicas} = {micro * data_parallel}")
    eval_micro = args.eval_micro_batch_size or micro
    eval_total = args.eval_global_batch_size or total
    if eval_total % (eval_micro * data_parallel):
        eval_total_flag = ("--eval-global-batch-size" if args.eval_global_batch_size
                           else "--global-batch-size (as --eval-global-batch-size is not given)")
        eval_micro_flag = ("--eval-micro-batch-size" if args.eval_micro_batch_size
                           else "--micro-batch-size (as --eval-micro-batch-size is not given)")
        raise PluginError(f"the evaluation batch, {eval_total_flag} {eval_total}, must be a "
                          f"multiple of {eval_micro_flag} {eval_micro} x {replicas} = "
                          f"{eval_micro * data_parallel}")


def _check_schedule(args) -> None:
    """What training needs from the schedule flags, which Megatron reads only once the
    model and the optimizer are built. A run given no training length may not train (a
    launch script that only builds the model); `megaseek pretrain`, which always does,
    asks for one itself (`integration.pretrain`)."""
    if _skips_training(args) or (args.train_iters is None and args.train_samples is None):
        return
    if args.lr is None:
        # The optimizer's param groups get lr None: TypeError at the first step.
        raise PluginError("give --lr: the learning rate (the peak, after warm-up)")
    if args.eval_interval is None:
        # training.py:4481 divides --train-iters by it to size the validation set.
        raise PluginError(f"give --eval-interval N: Megatron evaluates --eval-iters "
                          f"{args.eval_iters} batches every N iterations (--eval-iters 0 "
                          "with any N evaluates nothing)")
    fraction = args.lr_warmup_fraction
    if fraction is not None and not 0.0 <= fraction < 1.0:
        raise PluginError(f"--lr-warmup-fraction {fraction} must be in [0, 1): the warm-up "
                          "is that part of the decay")
    if args.train_iters:
        decay, decay_flags = ((args.lr_decay_iters, "--lr-decay-iters")
                              if args.lr_decay_iters is not None
                              else (args.train_iters, "--train-iters, as --lr-decay-iters "
                                                      "is not given"))
        warmup, warmup_flag = args.lr_warmup_iters, "--lr-warmup-iters"
    else:
        decay, decay_flags = ((args.lr_decay_samples, "--lr-decay-samples")
                              if args.lr_decay_samples is not None
                              else (args.train_samples, "--train-samples, as "
                                                        "--lr-decay-samples is not given"))
        warmup, warmup_flag = args.lr_warmup_samples, "--lr-warmup-samples"
    if fraction is None and warmup >= decay:
        # optimizer_param_scheduler.py:160 asserts lr_warmup_steps < lr_decay_steps.
        raise PluginError(f"{warmup_flag} {warmup} must be below the decay's {decay} "
                          f"({decay_flags}): the learning rate warms up, then decays")


def _check_mtp_loss_scaling(args, argv: list[str]) -> None:
    from upstream.cpu import given

    if given(argv, "--mtp-loss-scaling-factor") and not args.mtp_num_layers:
        raise PluginError(f"--mtp-loss-scaling-factor {args.mtp_loss_scaling_factor} weighs "
                          "the MTP loss, and there is none: give --mtp-num-layers N (1 or "
                          "more), or drop --mtp-loss-scaling-factor")


_DATA_PATH_FLAGS = ("--data-path", "--train-data-path", "--valid-data-path",
                    "--test-data-path")


def _data_paths(args) -> list[tuple[str, list[str]]]:
    return [(flag, getattr(args, flag[2:].replace("-", "_"), None) or [])
            for flag in _DATA_PATH_FLAGS]


def _check_tokenizer_for_data(args) -> None:
    """Megatron's tokenizer raises 'tokenizer_type None is not supported' on every rank
    once the model is built (core/tokenizers/utils/build_tokenizer.py:29); --mock-data
    brings no data to tokenise, the built-in corpus its own tokenizer
    (integration.pretrain)."""
    given = [flag for flag, paths in _data_paths(args) if paths]
    if given and getattr(args, "tokenizer_type", None) is None:
        raise PluginError(f"{given[0]} needs --tokenizer-type: the tokenizer the data was "
                          "made with (--tokenizer-type NullTokenizer --vocab-size N for data "
                          "of raw token ids below N)")


def dataset_prefixes(paths: list[str]) -> list[str]:
    """The dataset prefixes of a --data-path list, as Megatron reads it
    (megatron/core/datasets/utils.py get_blend_from_list): prefixes, or pairs of a weight and
    a prefix."""
    if len(paths) % 2 == 0:
        try:
            [float(weight) for weight in paths[0::2]]
        except ValueError:
            return [path.strip() for path in paths]
        return [path.strip() for path in paths[1::2]]
    return [path.strip() for path in paths]


def _check_data_prefixes(args) -> None:
    """Each prefix names a PREFIX.idx and a PREFIX.bin (Megatron's indexed dataset), an
    index Megatron can read and data as long as it says; indexed_dataset.py asserts them
    only once the model is built. A remote prefix (s3://, msc://) is left to Megatron."""
    import os

    from integration.data_files import indexed_dataset_problem

    for flag, paths in _data_paths(args):
        for prefix in dataset_prefixes(paths):
            if "://" in prefix:
                continue
            folders = [prefix + ext for ext in (".idx", ".bin") if os.path.isdir(prefix + ext)]
            if folders:
                raise PluginError(f"{flag} {prefix}: {folders[0]} is a folder, not a file (a "
                                  "dataset prefix names the PREFIX.idx and PREFIX.bin files "
                                  "that Megatron's tools/preprocess_data.py writes)")
            missing = [prefix + ext for ext in (".idx", ".bin")
                       if not os.path.isfile(prefix + ext)]
            if missing:
                raise PluginError(f"{flag} {prefix}: no {' or '.join(missing)} (a dataset "
                                  "prefix names the PREFIX.idx and PREFIX.bin files that "
                                  "Megatron's tools/preprocess_data.py writes)")
            problem = indexed_dataset_problem(prefix)
            if problem:
                raise PluginError(f"{flag} {prefix}: {problem}")


def _check_recompute(args) -> None:
    """Full recomputation's two flags go together: TransformerConfig's __post_init__
    raises on a full granularity without a method once the model is built, and a method
    without full granularity is read by nothing (megatron-core 0.19.2)."""
    granularity = getattr(args, "recompute_granularity", None)
    method = getattr(args, "recompute_method", None)
    if granularity == "full" and method is None:
        raise PluginError("--recompute-granularity full needs --recompute-method uniform or "
                          "block (and --recompute-num-layers N)")
    if method is not None and granularity != "full":
        raise PluginError(f"--recompute-method {method} applies to --recompute-granularity "
                          f"full only (got {granularity or 'none'}): give both, or drop "
                          "--recompute-method")


def _check_async_save(args) -> None:
    """`--async-save` as megatron-core 0.19.2 runs it: without the persistent worker,
    validate_args turns it off with a warning (arguments.py:1740-1746: the flag would do
    nothing); with it, the worker calls torch.cuda.set_device (async_utils.py:565), so on a
    machine without CUDA it dies at start and the first save waits for it forever."""
    import torch

    if not getattr(args, "async_save", False):
        return
    if not getattr(args, "use_persistent_ckpt_worker", False):
        raise PluginError("--async-save needs --use-persistent-ckpt-worker (without it "
                          "Megatron saves synchronously): give both, or drop --async-save")
    if not torch.cuda.is_available():
        raise PluginError("--async-save needs CUDA GPUs: Megatron's checkpoint worker sets "
                          "a CUDA device, and without one the first save would wait for it "
                          "forever; drop --async-save on this machine")


def _check_backend(args) -> None:
    import torch

    if args.distributed_backend == "nccl" and not torch.cuda.is_available():
        # initialize.py:352 init_process_group(backend="nccl") fails without a GPU.
        raise PluginError("--distributed-backend nccl needs CUDA GPUs, and this machine has "
                          "none: give --distributed-backend gloo (or leave the flag out)")


def _check_expert_layout(args) -> None:
    ep = args.expert_model_parallel_size
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    pp, world = args.pipeline_model_parallel_size, args.world_size
    if world % (ep * etp * pp):
        # parallel_state.py:881 raises it when the process groups are made.
        raise PluginError(
            f"--expert-model-parallel-size {ep} does not fit the {world} ranks of this run: "
            f"expert parallelism x --expert-tensor-parallel-size {etp} x "
            f"--pipeline-model-parallel-size {pp} = {ep * etp * pp} must divide the world "
            f"size: give an --expert-model-parallel-size that divides {world // (etp * pp)}"
            if world >= etp * pp else
            f"--expert-model-parallel-size {ep}: the run has {world} ranks, fewer than "
            f"--pipeline-model-parallel-size {pp} x --expert-tensor-parallel-size {etp}")


def _check_spec(args) -> None:
    """`--spec MODULE FUNCTION` is imported when the model is built (Megatron's GPT builder,
    argument_utils.py:457, or megaseek's model provider); a wrong name fails there."""
    import importlib

    spec = args.spec
    if not spec or len(spec) != 2:
        return
    module_name, function = spec
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise PluginError(f"--spec {module_name} {function}: cannot import {module_name} "
                          f"({error})") from None
    if not hasattr(module, function):
        raise PluginError(f"--spec {module_name} {function}: {module_name} has no "
                          f"{function!r}")


def _check_writable_directory(args, dest: str, flag: str) -> None:
    path = getattr(args, dest, None)
    if path:
        problem = unwritable_directory(path)
        if problem:
            raise PluginError(f"{flag} {path}: {problem}")


def _check_query_groups(args, argv: list[str]) -> None:
    """Grouped-query attention as Megatron's attention splits it (megatron-core 0.19.2):
    validate_args checks none of it. Each of --num-query-groups key/value heads serves
    --num-attention-heads / groups query heads (attention.py:1867 reshapes by it: a raw
    shape error in the first forward), and the groups are split over the tensor-parallel
    ranks or shared by them (TransformerConfig raises a ValueError once the model is
    built). Without --group-query-attention, argument_utils.py:330 drops the count; MLA
    (Megatron's or the mla plugin's) has no key/value groups, and validate_args refuses
    --group-query-attention with it (arguments.py:1893)."""
    from upstream.cpu import given

    mla = getattr(args, "multi_latent_attention", False)
    if given(argv, "--num-query-groups") and (mla or not args.group_query_attention):
        raise PluginError(f"--num-query-groups {args.num_query_groups}: "
                          + ("--multi-latent-attention has no key/value groups (its keys "
                             "and values come from one latent): drop --num-query-groups"
                             if mla else "read only with --group-query-attention: give "
                                         "both, or drop --num-query-groups"))
    if mla or not args.group_query_attention:
        return
    groups, heads = args.num_query_groups, args.num_attention_heads
    if not groups or not heads or groups < 1 or heads < 1:
        return  # NUMERIC_DOMAINS says it
    if heads % groups:
        raise PluginError(f"--num-attention-heads {heads} is not divisible by "
                          f"--num-query-groups {groups} (--group-query-attention: each "
                          "key/value group serves the same number of query heads)")
    tp = args.tensor_model_parallel_size or 1
    if groups % tp and tp % groups:
        raise PluginError(f"--num-query-groups {groups} must be a multiple or a divisor of "
                          f"--tensor-model-parallel-size {tp} (the key/value groups are "
                          "split over the tensor-parallel ranks, or shared by them)")


def _check_batch_ramp_up(args) -> None:
    """megatron-core 0.19.2 deprecated --rampup-batch-size and reads it nowhere: the
    microbatch calculator is built without it (global_vars.py:127) and every iteration
    uses --global-batch-size, with --train-iters or --train-samples alike. Its successor,
    --step-batch-size-schedule, counts its thresholds in tokens (global_vars.py:134 passes
    --seq-length) and trains with --train-samples (training.py:1534)."""
    ramp = getattr(args, "rampup_batch_size", None)
    if ramp is not None:
        raise PluginError(f"--rampup-batch-size {' '.join(map(str, ramp))} is ignored by "
                          "Megatron 0.19.2 (deprecated: every step uses --global-batch-size); "
                          "for a growing batch give --step-batch-size-schedule "
                          "'TOKENS:BATCH ...' (each batch size from that many tokens trained "
                          "on, e.g. '0:16 1B:1024') with --train-samples, in place of "
                          "--global-batch-size; or drop --rampup-batch-size")


def _check_sequence_parallel(args) -> None:
    """validate_args (arguments.py:1393) turns --sequence-parallel off with a warning when
    there is no tensor parallelism to split the sequence over."""
    if getattr(args, "sequence_parallel", False) and (args.tensor_model_parallel_size or 1) == 1:
        raise PluginError("--sequence-parallel splits the sequence over the tensor-parallel "
                          "ranks and this run has --tensor-model-parallel-size 1: give "
                          "--tensor-model-parallel-size 2 or more, or drop --sequence-parallel")


def _check_attention_backend(args) -> None:
    """--attention-backend picks Transformer Engine's attention kernel (language_module.py
    _set_attention_backend sets NVTE_* variables, which only TE reads): Megatron's local
    attention, and the mla plugin's, never read it. `local` also asserts `--spec local`
    (arguments.py:434)."""
    from megatron.core.transformer.enums import AttnBackend

    backend = getattr(args, "attention_backend", AttnBackend.auto)
    if backend != AttnBackend.auto and getattr(args, "transformer_impl", None) == "local":
        raise PluginError(f"--attention-backend {backend.name} chooses Transformer Engine's "
                          "attention kernel, and --transformer-impl local builds Megatron's "
                          "own attention (or the mla plugin's), which does not read it: drop "
                          "--attention-backend")


def _check_embedding_wgrad_deferral(args) -> None:
    """--defer-embedding-wgrad-compute fails once the model is built or runs: Megatron's local
    column-parallel linears keep their input for it in a buffer only the output layer has
    (tensor_parallel/layers.py:1148-1154, 'NoneType' object has no attribute 'append' at the
    first forward), and the model's config raises without pipeline parallelism or gradient
    accumulation fusion (model_parallel_config.py:545, :550). --wgrad-deferral-limit sizes
    it and is read nowhere else."""
    limit = getattr(args, "wgrad_deferral_limit", 0)
    if not getattr(args, "defer_embedding_wgrad_compute", False):
        if limit:
            raise PluginError(f"--wgrad-deferral-limit {limit} limits what "
                              "--defer-embedding-wgrad-compute defers, which this run does not "
                              "give: drop --wgrad-deferral-limit")
        return
    if getattr(args, "transformer_impl", None) == "local":
        raise PluginError("--defer-embedding-wgrad-compute needs Transformer Engine's linears "
                          "(--transformer-impl transformer_engine): Megatron's local linears "
                          "keep their input for it in a buffer only the output layer has, and "
                          "fail at the first forward; drop --defer-embedding-wgrad-compute")
    if (args.pipeline_model_parallel_size or 1) == 1:
        raise PluginError("--defer-embedding-wgrad-compute defers the embedding's gradient "
                          "past the pipeline's last backward and needs "
                          "--pipeline-model-parallel-size 2 or more; drop it")
    if not getattr(args, "gradient_accumulation_fusion", True):
        raise PluginError("--defer-embedding-wgrad-compute needs gradient accumulation fusion: "
                          "drop --no-gradient-accumulation-fusion, or drop "
                          "--defer-embedding-wgrad-compute")


_WSD_FLAGS = ("--lr-wsd-decay-iters", "--lr-wsd-decay-samples", "--lr-wsd-decay-style")


def _check_wsd_schedule(args, argv: list[str]) -> None:
    """`--lr-decay-style WSD` anneals over the last --lr-wsd-decay-iters (or -samples) of
    the decay: OptimizerParamScheduler asserts it was given once the model is built
    (optimizer_param_scheduler.py:164), divides by it (0: ZeroDivisionError) and anneals
    from a negative step where it exceeds the decay. Its flags mean nothing with another
    style, and the samples one nothing in iteration-based training (training.py:1916)."""
    from upstream.cpu import given

    style = getattr(args, "lr_decay_style", None)
    if style != "WSD":
        stray = [flag for flag in _WSD_FLAGS if given(argv, flag)]
        if stray:
            raise PluginError(f"{stray[0]} applies to --lr-decay-style WSD only (this run: "
                              f"{style}): give --lr-decay-style WSD, or drop {stray[0]}")
        return
    if _skips_training(args) or (args.train_iters is None and args.train_samples is None):
        return
    if args.train_iters:
        unit, other = "iters", "samples"
        decay = args.lr_decay_iters if args.lr_decay_iters is not None else args.train_iters
    else:
        unit, other = "samples", "iters"
        decay = (args.lr_decay_samples if args.lr_decay_samples is not None
                 else args.train_samples)
    wsd, flag = getattr(args, f"lr_wsd_decay_{unit}"), f"--lr-wsd-decay-{unit}"
    noun = "iterations" if unit == "iters" else "samples"
    if getattr(args, f"lr_wsd_decay_{other}") is not None:
        raise PluginError(f"--lr-wsd-decay-{other} is for --train-{other} runs; this one "
                          f"counts --train-{unit}: give {flag} N instead")
    if wsd is None:
        raise PluginError(f"--lr-decay-style WSD needs {flag} N: the last N {noun} of the "
                          f"decay, over which the learning rate anneals to --min-lr")
    if not 1 <= wsd <= decay:
        raise PluginError(f"{flag} {wsd} must be in [1, {decay}]: the annealing is the last "
                          f"part of the decay's {decay} {noun}")


# What each of Megatron's tokenizers loads (core/tokenizers/utils/build_tokenizer.py):
# the flags it reads files from, and the Python package it needs.
_SENTENCEPIECE = (("--tokenizer-model",), "sentencepiece")
TOKENIZER_NEEDS = {
    "GPT2BPETokenizer": (("--vocab-file", "--merge-file"), "transformers"),
    "BertWordPieceLowerCase": (("--vocab-file",), "transformers"),
    "BertWordPieceCase": (("--vocab-file",), "transformers"),
    "SentencePieceTokenizer": _SENTENCEPIECE,
    "GPTSentencePieceTokenizer": _SENTENCEPIECE,
    "Llama2Tokenizer": _SENTENCEPIECE,
    "TikTokenizer": (("--tokenizer-model",), "tiktoken"),
    "HuggingFaceTokenizer": (("--tokenizer-model",), "transformers"),
    "SFTTokenizer": (("--tokenizer-model",), "transformers"),
}
# The tokenizers that read each file flag (build_tokenizer.py:44-80); the others drop it.
_VOCABULARY_READERS = ("GPT2BPETokenizer", "BertWordPieceLowerCase", "BertWordPieceCase",
                       "HuggingFaceTokenizer")
TOKENIZER_FILE_READERS = {
    "--vocab-file": _VOCABULARY_READERS,
    "--merge-file": _VOCABULARY_READERS,
    "--tokenizer-model": ("SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                          "Llama2Tokenizer", "TikTokenizer", "HuggingFaceTokenizer",
                          "SFTTokenizer"),
}
# Megatron's BPE and WordPiece tokenizers fetch a missing file with wget from a fixed URL
# into its cache, as TYPE_vocab and TYPE_merges (megatron_hf_tokenizer.py:117, 139), where
# an earlier run may have left it.
_DOWNLOADED = ("GPT2BPETokenizer", "BertWordPieceLowerCase", "BertWordPieceCase")


def _check_tokenizer_files(args) -> None:
    """The files and the package a tokenizer loads, which Megatron opens only when it
    builds the tokenizer: a missing one is a raw error there (a wget download that needs the
    wget package and the network, a FileNotFoundError, a ModuleNotFoundError).
    --tokenizer-model of HuggingFaceTokenizer may name a model on the Hugging Face Hub; a
    local path (absolute, or starting with '.' or '~') must exist."""
    import importlib.util
    import os

    kind = getattr(args, "tokenizer_type", None)
    if kind is None:
        return
    for flag, readers in TOKENIZER_FILE_READERS.items():
        path = getattr(args, flag[2:].replace("-", "_"), None)
        if path is not None and kind not in readers:
            raise PluginError(f"{flag} {path}: --tokenizer-type {kind} does not read it "
                              f"(read by {', '.join(readers)}): drop {flag}")
    if kind not in TOKENIZER_NEEDS:
        return
    flags, package = TOKENIZER_NEEDS[kind]
    for flag in flags:
        path = getattr(args, flag[2:].replace("-", "_"), None)
        if path is None:
            if _in_megatron_cache(kind, flag):
                continue
            raise PluginError(f"--tokenizer-type {kind} needs {flag} FILE (Megatron would "
                              "otherwise download it with the wget package)"
                              if kind in _DOWNLOADED else
                              f"--tokenizer-type {kind} needs {flag}: the tokenizer's file"
                              + (" (or folder, or a Hugging Face Hub name)"
                                 if kind in ("HuggingFaceTokenizer", "SFTTokenizer") else ""))
        local = (kind not in ("HuggingFaceTokenizer", "SFTTokenizer")
                 or path.startswith(("/", ".", "~")))
        if local and not os.path.exists(os.path.expanduser(path)):
            raise PluginError(f"{flag} {path}: no such file (--tokenizer-type {kind} reads it)")
        problem = _tokenizer_file_problem(kind, flag, os.path.expanduser(path))
        if problem:
            raise PluginError(f"{flag} {path} {problem} (--tokenizer-type {kind} reads it)")
    if importlib.util.find_spec(package) is None:
        raise PluginError(f"--tokenizer-type {kind} needs the Python package {package}, "
                          f"which is not installed: pip install {package}")
    _check_hub_tokenizer(kind)


def _tokenizer_file_problem(kind: str, flag: str, path: str) -> str | None:
    from integration.data_files import json_vocabulary_problem, tokenizer_folder_problem

    if flag == "--tokenizer-model" and kind in ("HuggingFaceTokenizer", "SFTTokenizer"):
        return tokenizer_folder_problem(path)
    if flag == "--vocab-file" and kind == "GPT2BPETokenizer":
        return json_vocabulary_problem(path)
    return None


# The Hugging Face Hub tokenizer each of Megatron's BPE and WordPiece tokenizers loads,
# whatever local files it is given (megatron_hf_tokenizer.py:29-47, 100: AutoTokenizer
# .from_pretrained(name, vocab_file=...) reads the name's tokenizer_config.json).
_HUB_TOKENIZERS = {"GPT2BPETokenizer": "gpt2", "BertWordPieceLowerCase": "bert-large-uncased",
                   "BertWordPieceCase": "bert-large-cased"}


def _check_hub_tokenizer(kind: str) -> None:
    """Offline, a Hub tokenizer that is not in Hugging Face's cache fails when Megatron
    builds the tokenizer, after a minute of retries, blaming the network."""
    from integration.data_files import hub_files_cached, hub_unreachable

    repo = _HUB_TOKENIZERS.get(kind)
    if repo is None or hub_files_cached(repo, "tokenizer_config.json"):
        return
    why = hub_unreachable()
    if why:
        raise PluginError(f"--tokenizer-type {kind} loads Hugging Face's {repo!r} tokenizer "
                          f"from the Hub even with local files, and {why} (nor is it in "
                          "Hugging Face's cache): save a tokenizer to a folder and give "
                          "--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR")


def _in_megatron_cache(kind: str, flag: str) -> bool:
    import os

    if kind not in _DOWNLOADED:
        return False
    from megatron.core.tokenizers.text.libraries.megatron_hf_tokenizer import MEGATRON_CACHE

    suffix = "_vocab" if flag == "--vocab-file" else "_merges"
    return os.path.exists(os.path.join(MEGATRON_CACHE, kind + suffix))


def _check_loss_scaling(args) -> None:
    """fp16's dynamic loss scaler (optimizer/__init__.py:654, built with the optimizer once
    the model is) asserts its floor is no higher than its start (grad_scaler.py:110)."""
    if not getattr(args, "fp16", False) or getattr(args, "loss_scale", None):
        return
    low, start = args.min_loss_scale, args.initial_loss_scale
    if low is not None and start is not None and low > start:
        raise PluginError(f"--min-loss-scale {low} is above --initial-loss-scale {start}: the "
                          "dynamic loss scale starts at the second and never drops below the "
                          "first")


def _check_precision_aware_optimizer(args) -> None:
    """OptimizerConfig.__post_init__ asserts it (optimizer_config.py) in a traceback, when
    the training loop builds the optimizer."""
    if (getattr(args, "use_precision_aware_optimizer", False)
            and not getattr(args, "use_distributed_optimizer", False)):
        raise PluginError("--use-precision-aware-optimizer works with the distributed "
                          "optimizer only: add --use-distributed-optimizer, or drop "
                          "--use-precision-aware-optimizer")


def _check_optimizer_package(args) -> None:
    """Megatron's optimizers other than Adam and SGD come from the emerging-optimizers
    package, which megatron-core imports if present and asks for only when the optimizer
    is built, after the model (optimizer/__init__.py:599 for lion, :756 for the others)."""
    from megatron.core.optimizer import HAVE_EMERGING_OPTIMIZERS

    optimizer = getattr(args, "optimizer", "adam")
    if optimizer not in ("adam", "sgd") and not HAVE_EMERGING_OPTIMIZERS:
        raise PluginError(f"--optimizer {optimizer} needs the Python package "
                          "emerging-optimizers (0.2 or newer), which is not installed: pip "
                          "install emerging-optimizers, or give --optimizer adam or sgd")


def _check_moe_layer_pattern(args) -> None:
    from integration.layer_layout import moe_layer_pattern_problem

    problem = moe_layer_pattern_problem(args)
    if problem:
        raise PluginError(problem)


def _check_pipeline_stage_layers(args) -> None:
    from integration.layer_layout import pipeline_stages_problem

    problem = pipeline_stages_problem(args)
    if problem:
        raise PluginError(problem)
