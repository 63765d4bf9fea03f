"""Where plugins attach to Megatron's training loop (megatron-core 0.19.2).

Megatron offers no hook for most of what plugins need, so each attachment replaces one
name that Megatron looks up at call time. Each is a `Fix` (file:line, reason, a probe
that fails once upstream changes the place it attaches to), built for one run by a
factory that takes what the plugins provide, and applied through a `Patcher`, so that
every change is undone when the run ends:

- `plugin_arguments`: every parse of Megatron's arguments knows the plugin flags; the
  script's own parse also enables the plugins (the launcher's way in);
- `argument_errors_refused`: a command line Megatron's parser refuses raises instead of
  printing argparse's usage on every rank;
- `checks_before_argument_dump`: start-up checks run before Megatron validates its
  arguments and before it prints them; its failed checks are said in words;
- `model_specs`: every `GPTModel` built gets its layer spec (a layer's, or a block's, one
  per layer) and its MTP block spec through the plugins' transforms, whichever way the
  model is built (a script's model provider, or `pretrain` without one);
- `schedule`: Megatron's `get_forward_backward_func` answers with a plugin's schedule;
- `before_gradient_checks`: callbacks run once the step's backward passes are done,
  before Megatron checks and reduces the gradients, with the iteration;
- `after_optimizer_step`: callbacks run after each successful step, with the iteration;
- `after_training`: callbacks run when Megatron's training loop ends;
- `pipeline_placement`: which stages each rank's pipeline chunks build (and, where the
  plugin says, with which process groups);
- `checkpoint_state`: plugin state saved and loaded with Megatron's checkpoint;
- `checkpoint_mismatch_named`, `scheduler_mismatch_named`: a checkpoint that does not fit
  the run fails naming the flags;
- `evaluation_passes`: extra passes of Megatron's evaluation, on the same batches.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass
from functools import wraps
from typing import Any, Callable, Iterable

from upstream.patching import Fix, Patcher, Scope, source_has

VERSION = "megatron-core 0.19.2"
# A seam is attached for a run when an enabled plugin provides its hook.
SEAM = Scope("seam, when an enabled plugin provides the hook", lambda args: True)


def _module(name: str):
    return importlib.import_module(name)


def megatron_training():
    """megatron.training.training, imported when a seam is applied (not when upstream/ is)."""
    return _module("megatron.training.training")


def megatron_checkpointing():
    """megatron.training.checkpointing, imported when a seam is applied."""
    return _module("megatron.training.checkpointing")


# --- arguments ---------------------------------------------------------------------------

def plugin_arguments(add_arguments: Callable, on_parsed: Callable[[Any], None]) -> Fix:
    """`add_arguments(parser)` runs in every parse of Megatron's arguments (megatron.training
    parses again for its own probes, e.g. ft_integration.py:78); `on_parsed(args)` after
    the parse that `parse_and_validate_args` makes (the script's)."""

    def apply(patcher: Patcher) -> None:
        arguments = _module("megatron.training.arguments")
        parse_args, parse_and_validate_args = arguments.parse_args, arguments.parse_and_validate_args

        @wraps(parse_args)
        def parse_args_with_plugin_flags(extra_args_provider=None, ignore_unknown_args=False):
            def provide(parser):
                parser = add_arguments(parser)
                return extra_args_provider(parser) if extra_args_provider else parser

            return parse_args(provide, ignore_unknown_args)

        @wraps(parse_and_validate_args)
        def parse_validate_and_enable(*args, **kwargs):
            parsed = parse_and_validate_args(*args, **kwargs)
            on_parsed(parsed)
            return parsed

        patcher.setattr(arguments, "parse_args", parse_args_with_plugin_flags)
        patcher.setattr(arguments, "parse_and_validate_args", parse_validate_and_enable)

    return Fix(
        "seam:plugin-arguments",
        f"megatron/training/arguments.py parse_args, parse_and_validate_args ({VERSION})",
        "a launch script passes only its own extra_args_provider; the plugin flags join "
        "every parse, and the plugins are enabled right after the script's",
        lambda: source_has(_module("megatron.training.arguments").parse_and_validate_args,
                           "parse_args("),
        apply, SEAM)


class MegatronRefused(ValueError):
    """Megatron's own argument validation failed (an `assert` or a ValueError raised in
    `validate_args`), or its parser refused the command line."""


def checks_before_argument_dump(check: Callable[[Any], None],
                                check_first: Callable[[Any], None] | None = None) -> Fix:
    """`check(args)` runs at the end of Megatron's `validate_args`, before it prints the
    argument dump, so that a configuration error is the first thing the user reads;
    `check_first(args)` runs before `validate_args` (for values its own checks would misread
    or crash on). An assertion of Megatron's own validation becomes a `MegatronRefused`
    that says it in words (`upstream.argument_words`) with its place."""

    def apply(patcher: Patcher) -> None:
        arguments = _module("megatron.training.arguments")
        print_args, validate_args = arguments._print_args, arguments.validate_args

        @wraps(validate_args)
        def validate_or_refuse(args, *rest, **kwargs):
            if check_first is not None:
                check_first(args)
            try:
                return validate_args(args, *rest, **kwargs)
            except (AssertionError, ValueError) as error:
                if not _raised_by_megatron(error):
                    raise  # e.g. a plugin's PluginError from the check above
                raise MegatronRefused(_quoted(error, args)) from error

        patcher.setattr(arguments, "validate_args", validate_or_refuse)

        @wraps(print_args)
        def check_then_print(title, args):
            if title == "arguments":
                check(args)
            print_args(title, args)

        patcher.setattr(arguments, "_print_args", check_then_print)

    return Fix(
        "seam:checks-before-argument-dump",
        f"megatron/training/arguments.py:1904 (validate_args ends with "
        f"_print_args('arguments', args)) ({VERSION})",
        "Megatron prints some 800 argument lines before returning; plugin checks run "
        "before them, and its own failed checks are said in words instead of raised as "
        "AssertionError tracebacks",
        lambda: source_has(_module("megatron.training.arguments").validate_args,
                           '_print_args("arguments", args)'),
        apply, SEAM)


def _raised_by_megatron(error: Exception) -> bool:
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"{os.sep}megatron{os.sep}" in frames[-1].filename


def _quoted(error: Exception, args: Any = None) -> str:
    import traceback

    from upstream.argument_words import assert_condition, in_words

    frame = traceback.extract_tb(error.__traceback__)[-1]
    where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
    condition = (assert_condition(frame.filename, frame.lineno)
                 if isinstance(error, AssertionError) else None)
    said = in_words(condition, str(error).strip(), args)
    return f"Megatron's argument check failed: {said} (megatron/training/{where})"


def argument_errors_refused() -> Fix:
    """A command line Megatron's parser refuses (an unknown flag, a bad value) raises
    `MegatronRefused` with argparse's message, so that the run ends with one line on rank
    0 as every refusal does, instead of argparse's usage and error printed by every rank."""

    def apply(patcher: Patcher) -> None:
        import argparse

        arguments = _module("megatron.training.arguments")
        parse_args = arguments.parse_args

        def refuse(parser, message):
            raise MegatronRefused(message)

        @wraps(parse_args)
        def parse_or_refuse(*args, **kwargs):
            with patcher.scoped(argparse.ArgumentParser, "error", refuse):
                return parse_args(*args, **kwargs)

        patcher.setattr(arguments, "parse_args", parse_or_refuse)

    return Fix(
        "seam:argument-errors-refused",
        f"megatron/training/arguments.py parse_args: parser.parse_args / parse_known_args "
        f"({VERSION}); argparse.ArgumentParser.error prints the usage and exits",
        "each rank parses the command line and argparse prints its usage and error on every "
        "one; the error is raised instead, and reported once by the run's frame",
        lambda: source_has(_module("megatron.training.arguments").parse_args, "parse_args(")
        or source_has(_module("megatron.training.arguments").parse_args, "parse_known_args("),
        apply, SEAM)


# --- model specs -------------------------------------------------------------------------

def model_specs(transform: Callable[[Any], Any]) -> Fix:
    """`transform(spec) -> spec` for GPTModel's `transformer_layer_spec` and
    `mtp_block_spec`."""

    def apply(patcher: Patcher) -> None:
        from megatron.core.models.gpt import GPTModel

        init = GPTModel.__init__

        @wraps(init)
        def init_with_plugin_specs(self, config, transformer_layer_spec, *rest, **kwargs):
            if kwargs.get("mtp_block_spec") is not None:
                kwargs["mtp_block_spec"] = transform(kwargs["mtp_block_spec"])
            init(self, config, transform(transformer_layer_spec), *rest, **kwargs)

        init_with_plugin_specs.megaseek_plugin_specs = True  # see plugin_specs_in_place()
        patcher.setattr(GPTModel, "__init__", init_with_plugin_specs)

    return Fix(
        "seam:model-specs",
        f"megatron/core/models/gpt/gpt_model.py GPTModel.__init__ ({VERSION}); built from "
        "a script's model provider (training.py:1706 get_model) or without one "
        "(training/models/gpt.py:307 GPTModelBuilder.build_model)",
        "both of Megatron's model-building paths end in GPTModel(config, "
        "transformer_layer_spec, ..., mtp_block_spec=...): the one place to rewrite specs",
        lambda: source_has(_module("megatron.core.models.gpt.gpt_model").GPTModel.__init__,
                           "transformer_layer_spec", "mtp_block_spec"),
        apply, SEAM)


def plugin_specs_in_place() -> bool:
    """Whether GPTModel is built with the plugins' specs (`model_specs` applied): a spec
    that relies on the plugins' modules asks before Megatron builds from it."""
    from megatron.core.models.gpt import GPTModel

    return getattr(GPTModel.__init__, "megaseek_plugin_specs", False)


# --- schedule ------------------------------------------------------------------------------

def schedule(forward_backward: Callable[..., Any]) -> Fix:
    def apply(patcher: Patcher) -> None:
        training = megatron_training()

        @wraps(training.get_forward_backward_func)
        def get_forward_backward_func(*unused, **unused_kw):
            return forward_backward

        patcher.setattr(training, "get_forward_backward_func", get_forward_backward_func)

    return Fix(
        "seam:schedule",
        f"megatron/training/training.py:98 (import), :3614 train, :4198 evaluate ({VERSION})",
        "get_forward_backward_func (schedules.py:48) is a plain if/else with no registry; "
        "training looks the name up in its module at each call",
        lambda: source_has(megatron_training().train_step, "get_forward_backward_func(")
        or source_has(megatron_training().train, "get_forward_backward_func("),
        apply, SEAM)


# --- gradient checks ---------------------------------------------------------------------------

def before_gradient_checks(callbacks: Callable[[], list[Callable[[int], None]]]) -> Fix:
    """Each of `callbacks()` runs with the iteration being computed (Megatron's count, as in
    `after_optimizer_step`) before Megatron's own end-of-step work on the gradients:
    `finalize_model_grads`, which every schedule calls once after its last backward (and
    which reduces them), and each DDP bucket group's inf/NaN check (`check_grads`, which
    with `--overlap-grad-reduce` can run inside the last backward). Both wait for the GPU
    already (the reduction, the check's norms), so a callback that reads a device value
    there adds no new wait to the step; one that raises fails the step before Megatron's
    checks, which do not know where a bad value came from. A callback may run more than
    once per step (once per bucket group, then at finalize)."""

    def apply(patcher: Patcher) -> None:
        from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup

        training = megatron_training()
        finalize, check_grads = training.finalize_model_grads, _ParamAndGradBucketGroup.check_grads

        def run_callbacks() -> None:
            from megatron.training import get_args

            iteration = get_args().curr_iteration + 1
            for callback in callbacks():
                callback(iteration)

        @wraps(finalize)
        def callbacks_then_finalize(*args, **kwargs):
            run_callbacks()
            return finalize(*args, **kwargs)

        @wraps(check_grads)
        def callbacks_then_check(self, *args, **kwargs):
            run_callbacks()
            return check_grads(self, *args, **kwargs)

        patcher.setattr(training, "finalize_model_grads", callbacks_then_finalize)
        patcher.setattr(_ParamAndGradBucketGroup, "check_grads", callbacks_then_check)

    def probe() -> bool:
        from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup

        return (source_has(megatron_training().train, "config.finalize_model_grads_func = "
                           "finalize_model_grads")
                and source_has(_ParamAndGradBucketGroup.start_grad_sync, "self.check_grads("))

    return Fix(
        "seam:before-gradient-checks",
        f"megatron/training/training.py:3550 (train sets config.finalize_model_grads_func "
        f"from its module's name), core/distributed/param_and_grad_buffer.py:650 "
        f"(start_grad_sync calls check_grads) ({VERSION})",
        "Megatron has no callback between the backward passes and its gradient checks; "
        "train looks finalize_model_grads up in its module, start_grad_sync calls "
        "check_grads as a method",
        probe, apply, SEAM)


# --- optimizer step --------------------------------------------------------------------------

def after_optimizer_step(callbacks_for: Callable[[list, Any], list[Callable[[int], None]]]) -> Fix:
    """`callbacks_for(model_chunks, optimizer)` when Megatron builds the optimizer; each
    callback then runs after every successful step with the iteration that step completes
    (Megatron's count: `args.curr_iteration` + 1, training.py:3811, so it continues
    across a resume)."""

    def apply(patcher: Patcher) -> None:
        training = megatron_training()
        build_optimizer = training.get_megatron_optimizer

        @wraps(build_optimizer)
        def get_megatron_optimizer(config, model_chunks, *args, **kwargs):
            optimizer = build_optimizer(config, model_chunks, *args, **kwargs)
            _run_after_step(optimizer, callbacks_for(model_chunks, optimizer))
            return optimizer

        patcher.setattr(training, "get_megatron_optimizer", get_megatron_optimizer)

    return Fix(
        "seam:after-optimizer-step",
        f"megatron/training/training.py:71 (import of get_megatron_optimizer), "
        f":2474 optimizer.step() in train_step ({VERSION})",
        "Megatron has no step callback; the optimizer it builds gets one wrapped around "
        "its step",
        lambda: source_has(megatron_training().train_step, "optimizer.step()"),
        apply, SEAM)


def _run_after_step(optimizer, callbacks: list[Callable[[int], None]]) -> None:
    if not callbacks:
        return
    step = optimizer.step

    @wraps(step)
    def step_then_callbacks(*args, **kwargs):
        result = step(*args, **kwargs)
        update_successful = result[0] if isinstance(result, tuple) else bool(result)
        if update_successful:
            from megatron.training import get_args

            iteration = get_args().curr_iteration + 1
            for callback in callbacks:
                callback(iteration)
        return result

    optimizer.step = step_then_callbacks


def after_training(callback: Callable[[], None]) -> Fix:
    """`callback()` once Megatron's `train()` has returned, or is leaving through its
    early-exit `sys.exit` (--exit-interval, --exit-duration-in-mins, the signal handler);
    not when it raised (its error is the one to see)."""

    def apply(patcher: Patcher) -> None:
        training = megatron_training()
        train = training.train

        @wraps(train)
        def train_then_callback(*args, **kwargs):
            try:
                result = train(*args, **kwargs)
            except SystemExit:
                callback()
                raise
            callback()
            return result

        patcher.setattr(training, "train", train_then_callback)

    return Fix(
        "seam:after-training",
        f"megatron/training/training.py:1423 pretrain calls train(), which returns at "
        f":4157 or leaves through sys.exit at :4155 ({VERSION})",
        "Megatron has no end-of-training callback; pretrain looks train up in its module "
        "at the call",
        lambda: source_has(megatron_training().pretrain, "= train("),
        apply, SEAM)


# --- pipeline placement -------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """Which pipeline stage each model chunk of each rank builds.

    `stage(rank, chunk)` names the stage that chunk `chunk` of pipeline rank `rank`
    builds. Stage 0 holds the embedding, the last stage the output head, the loss and
    MTP. With `copies` = 1 the model is cut into `pipeline_size x chunks_per_rank` stages
    whose layers Megatron's interleaved split gives out (Megatron's own placement is
    `stage = chunk * pipeline_size + rank`; DualPipeV's is `rank` for chunk 0 and
    `2 * pipeline_size - 1 - rank` for chunk 1). With `copies` = 2 every stage is built by
    two ranks (DualPipe: `pipeline_size` stages, as Megatron splits them without virtual
    stages); the copy on the lower rank is the one checkpoints hold, the other starts
    from its weights.

    `process_groups(chunk, given)`, where given, answers the process groups chunk `chunk`
    is built with instead of `given` (Megatron's `pg_collection`, None for parallel_state's).
    Every rank asks it for every chunk in the same order, so it may create groups.
    """

    pipeline_size: int
    chunks_per_rank: int
    stage: Callable[[int, int], int]
    copies: int = 1
    process_groups: Callable[[int, Any], Any] | None = None

    @property
    def stages(self) -> int:
        return self.pipeline_size * self.chunks_per_rank // self.copies

    def megatron_coordinates(self, rank: int, chunk: int) -> tuple[int, int | None]:
        """The (pipeline rank, virtual stage) whose layers Megatron's split gives to this
        chunk's stage; virtual stage None: the split without virtual stages."""
        stage = self.stage(rank, chunk)
        if self.stages == self.pipeline_size:
            return stage, None
        return stage % self.pipeline_size, stage // self.pipeline_size

    def is_first(self, rank: int, chunk: int) -> bool:
        return self.stage(rank, chunk) == 0

    def is_last(self, rank: int, chunk: int) -> bool:
        return self.stage(rank, chunk) == self.stages - 1

    def holders(self, stage: int) -> list[tuple[int, int]]:
        """(rank, chunk) of every copy of a stage, the checkpointed copy first."""
        return [(r, c) for r in range(self.pipeline_size) for c in range(self.chunks_per_rank)
                if self.stage(r, c) == stage]

    def check(self) -> None:
        built = sorted(self.stage(r, c) for r in range(self.pipeline_size)
                       for c in range(self.chunks_per_rank))
        if built != sorted(list(range(self.stages)) * self.copies):
            raise ValueError(f"a placement must build every stage {self.copies} time(s); it "
                             f"builds {built}")


_LAYER_SPLIT_USERS = (  # modules that imported Megatron's layer split functions by name
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.attention",
    "megatron.core.models.gpt.gpt_layer_specs",
)


def pipeline_placement(placement: Placement) -> Fix:
    """Megatron's layer split answers for the placement's stages, and each chunk it builds
    gets pre_process (embedding) / post_process (head, loss) and MTP by its stage."""

    def apply(patcher: Patcher) -> None:
        from megatron.core import parallel_state

        layer = _module("megatron.core.transformer.transformer_layer")
        block = _module("megatron.core.transformer.transformer_block")
        offset, count = layer.get_transformer_layer_offset, block.get_num_layers_to_build

        def placed(function):
            @wraps(function)
            def at_placed_stage(config, vp_stage=None, pp_rank=None):
                rank = parallel_state.get_pipeline_model_parallel_rank() if pp_rank is None else pp_rank
                pp, vp = placement.megatron_coordinates(rank, vp_stage or 0)
                if vp is not None:
                    return function(config, vp_stage=vp, pp_rank=pp)
                # Stages split as without virtual stages, though the rank builds two chunks
                # (config's virtual size asks for them): the split reads it only here.
                virtual = config.virtual_pipeline_model_parallel_size
                config.virtual_pipeline_model_parallel_size = None
                try:
                    return function(config, vp_stage=None, pp_rank=pp)
                finally:
                    config.virtual_pipeline_model_parallel_size = virtual

            return at_placed_stage

        for name in _LAYER_SPLIT_USERS:
            module = _module(name)
            for attribute, original in (("get_transformer_layer_offset", offset),
                                        ("get_num_layers_to_build", count)):
                if getattr(module, attribute, None) is original:
                    patcher.setattr(module, attribute, placed(original))

        # Asked per chunk (ignore_virtual=False), "first/last stage" means the placement's;
        # asked per rank, it keeps meaning the first/last pipeline rank.
        first_stage = parallel_state.is_pipeline_first_stage
        last_stage = parallel_state.is_pipeline_last_stage

        def chunk_or_rank(per_rank, per_chunk):
            @wraps(per_rank)
            def stage_predicate(ignore_virtual=True, vp_stage=None):
                if ignore_virtual or vp_stage is None:
                    return per_rank(ignore_virtual=ignore_virtual, vp_stage=vp_stage)
                return per_chunk(parallel_state.get_pipeline_model_parallel_rank(), vp_stage)

            return stage_predicate

        patcher.setattr(parallel_state, "is_pipeline_first_stage",
                        chunk_or_rank(first_stage, placement.is_first))
        patcher.setattr(parallel_state, "is_pipeline_last_stage",
                        chunk_or_rank(last_stage, placement.is_last))

        # Which batch fields a rank reads: a rank that holds the first stage in one chunk
        # and the last in another (DualPipeV's rank 0) reads them all, as without a pipeline.
        utils = _module("megatron.core.utils")
        batch_broadcast = utils.get_batch_on_this_tp_rank
        broadcast_signature = inspect.signature(batch_broadcast)

        @wraps(batch_broadcast)
        def batch_for_this_ranks_stages(*args, **kwargs):
            bound = broadcast_signature.bind(*args, **kwargs)
            rank = parallel_state.get_pipeline_model_parallel_rank()
            chunks = range(placement.chunks_per_rank)
            first = any(placement.is_first(rank, c) for c in chunks)
            last = any(placement.is_last(rank, c) for c in chunks)
            bound.arguments["is_pipeline_first_stage"] = first
            bound.arguments["is_pipeline_last_stage"] = last
            if first and last:
                bound.arguments["pipeline_model_parallel_size"] = 1
            return batch_broadcast(*bound.args, **bound.kwargs)

        # Launch scripts import it by name (Megatron-LM's pretrain_gpt.py runs as __main__).
        for module in [utils, *[m for name, m in list(sys.modules.items())
                                if name == "__main__" or name.startswith("megatron.")]]:
            if getattr(module, "get_batch_on_this_tp_rank", None) is batch_broadcast:
                patcher.setattr(module, "get_batch_on_this_tp_rank", batch_for_this_ranks_stages)

        gpt_model = _module("megatron.core.models.gpt.gpt_model")
        patcher.setattr(gpt_model, "mtp_on_this_rank", lambda *a, vp_stage=None, **k: placement.is_last(
            parallel_state.get_pipeline_model_parallel_rank(), vp_stage or 0))

        # The embedding's copies (stage 0's and the MTP stage's) may sit on one rank, which
        # Megatron's embedding group (a group of ranks) cannot tie: its group is made the
        # first pipeline rank alone (its all-reduces become no-ops), and the copies are tied
        # here at build and by `sum_embedding_copies` after each backward.
        initialize = parallel_state.initialize_model_parallel

        @wraps(initialize)
        def initialize_with_local_embedding_copies(*args, **kwargs):
            kwargs["get_embedding_ranks"] = _first_pipeline_rank_only
            return initialize(*args, **kwargs)

        patcher.setattr(parallel_state, "initialize_model_parallel",
                        initialize_with_local_embedding_copies)

        from megatron.core.models.gpt import GPTModel

        init = GPTModel.__init__
        signature = inspect.signature(init)
        built: dict[int, Any] = {}  # this rank's chunks, as they are built

        @wraps(init)
        def init_at_stage(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            rank = parallel_state.get_pipeline_model_parallel_rank()
            chunk = bound.arguments.get("vp_stage") or 0
            bound.arguments["pre_process"] = placement.is_first(rank, chunk)
            bound.arguments["post_process"] = placement.is_last(rank, chunk)
            if placement.process_groups is not None:
                bound.arguments["pg_collection"] = placement.process_groups(
                    chunk, bound.arguments.get("pg_collection"))
            init(*bound.args, **bound.kwargs)
            holders = placement.holders(placement.stage(rank, chunk))
            if len(holders) > 1:
                _same_weights_as_first_copy(self, holders, rank)
            built[chunk] = self
            first, mtp = _embedding_copies(list(built.values()))
            if first is not None and mtp is not None and len(built) == placement.chunks_per_rank:
                # After every copy of stage 0 holds the same weights (above): the MTP
                # stage's embedding starts from it, as Megatron's all-reduce would make it.
                mtp.embedding.word_embeddings.weight.data.copy_(
                    first.embedding.word_embeddings.weight.data)

        patcher.setattr(GPTModel, "__init__", init_at_stage)

    return Fix(
        "seam:pipeline-placement",
        f"megatron/core/transformer/transformer_layer.py:59 get_transformer_layer_offset, "
        f"transformer_block.py:70 get_num_layers_to_build, models/gpt/gpt_model.py "
        f"GPTModel.__init__ (pre_process, post_process, pg_collection; built by "
        f"training.py:1730-1760 get_model or training/models/gpt.py:307), :160 "
        f"mtp_on_this_rank, "
        f"core/parallel_state.py:1994 is_pipeline_first_stage, :2004 is_pipeline_last_stage, "
        f"core/utils.py:2119 get_batch_on_this_tp_rank (launch scripts' get_batch passes "
        f"the rank's first/last flags), core/parallel_state.py:618,1269 "
        f"initialize_model_parallel(get_embedding_ranks), models/common/language_module/"
        f"language_module.py:247-306 and distributed/finalize_model_grads.py:146-260 (the "
        f"MTP stage's embedding copy, tied over the embedding group) ({VERSION})",
        "Megatron places stages interleaved only (stage = chunk x PP + rank) and decides "
        "embedding, head and MTP by the first/last pipeline rank; a chunk's first/last "
        "stage (e.g. which batch fields get_batch reads) is asked of parallel_state; the "
        "MTP stage's embedding copy is tied to stage 0's by an all-reduce over a group of "
        "ranks, which cannot tie two copies on one rank",
        lambda: source_has(megatron_training().get_model, "is_pp_first_stage(", "is_vp_first_stage(")
        and source_has(_module("megatron.core.models.gpt.gpt_model").GPTModel.__init__,
                       "mtp_on_this_rank("),
        apply, SEAM)


def _first_pipeline_rank_only(pipeline_ranks: list[int], *unused) -> list[int]:
    return pipeline_ranks[:1]


def _embedding_copies(chunks: list) -> tuple[Any, Any]:
    """This rank's chunk that embeds the input (stage 0) and its chunk that runs MTP on
    another stage (which keeps its own copy of the embedding), or None for either."""
    from megatron.core.utils import get_attr_wrapped_model

    models = [get_attr_wrapped_model(c, "pre_process", return_model_obj=True) for c in chunks]
    first = next((m for m in models if m.pre_process), None)
    mtp = next((m for m in models if getattr(m, "mtp_process", False) and not m.pre_process),
               None)
    return first, mtp


def sum_embedding_copies(chunks: list) -> None:
    """Where this rank holds both stage 0 and the MTP stage (DualPipeV's rank 0), both
    embedding copies take the sum of their gradients (first + MTP, the same bits on every
    rank), as Megatron's embedding all-reduce gives copies on two ranks. Call it on the
    gradient buffers before they are reduced across data-parallel ranks."""
    first, mtp = _embedding_copies(chunks)
    if first is None or mtp is None:
        return
    mine = first.embedding.word_embeddings.weight.main_grad
    other = mtp.embedding.word_embeddings.weight.main_grad
    total = mine + other
    mine.copy_(total)
    other.copy_(total)


def _same_weights_as_first_copy(model, holders: list[tuple[int, int]], rank: int) -> None:
    """A stage built by several ranks: every copy starts from the first copy's weights
    (Megatron seeds each pipeline rank's initialisation differently); only the first
    copy's tensors are the checkpoint's (the others are marked replicas, as Megatron marks
    data-parallel ones) and count in the gradient norm."""
    import torch
    from megatron.core import parallel_state

    group = parallel_state.get_pipeline_model_parallel_group()
    peers = torch.distributed.get_process_group_ranks(group)
    first = holders[0][0]
    for tensor in [*model.parameters(), *model.buffers()]:
        staged = tensor.data if tensor.device.type != "cpu" or not torch.cuda.is_available() \
            else tensor.data.cuda()
        if rank == first:
            for other, _ in holders[1:]:
                torch.distributed.send(staged, peers[other], group=group)
        else:
            torch.distributed.recv(staged, peers[first], group=group)
            tensor.data.copy_(staged)
    if rank != first:
        # Megatron counts a parameter marked shared once (its gradient norm skips it,
        # optimizer/clip_grads.py param_is_not_shared), as for tied embeddings.
        for parameter in model.parameters():
            parameter.shared = True
        sharded_state_dict = model.sharded_state_dict

        @wraps(sharded_state_dict)
        def as_replica(*args, **kwargs):
            return _marked_replica(sharded_state_dict(*args, **kwargs))

        model.sharded_state_dict = as_replica


def _marked_replica(state):
    """The same sharded state with every tensor and object marked as not the main replica
    (Megatron saves a shard from its main replica only)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    for value in nested_values(state):
        if isinstance(value, ShardedBase) and hasattr(value, "replica_id"):
            replica = value.replica_id
            value.replica_id = ((1, *replica[1:]) if isinstance(replica, tuple) and replica
                                else 1)
    return state


# --- checkpoint state ---------------------------------------------------------------------------

def checkpoint_state(states: Callable[[], dict[str, Any]]) -> Fix:
    """`states()[name]` (asked for when a checkpoint is saved or loaded, once the model
    exists) has `sharded_state_dict()` (saved under 'megaseek:' + name with Megatron's
    torch_dist checkpoint), `state_dict()` (plain tensors, for the other formats, which
    pickle what they save: asked for on every rank as the save begins, as only some ranks
    write a torch-format checkpoint) and `load_state_dict(state)` (given what was loaded,
    or None when the checkpoint holds nothing for it)."""

    def apply(patcher: Patcher) -> None:
        checkpointing = megatron_checkpointing()
        generate_state_dict, load_checkpoint, save_checkpoint = (
            checkpointing.generate_state_dict, checkpointing.load_checkpoint,
            checkpointing.save_checkpoint)
        loading: dict[str, Any] = {}  # while load_checkpoint runs: checkpoint keys present
        saving: dict[str, Any] = {}  # while a save in another format runs: the plain states

        @wraps(save_checkpoint)
        def save_with_plain_states(*args, **kwargs):
            from megatron.training import get_args

            if get_args().ckpt_format != "torch_dist":  # as generate_state_dict decides
                saving.update({name: state.state_dict() for name, state in states().items()})
            try:
                return save_checkpoint(*args, **kwargs)
            finally:
                saving.clear()

        @wraps(generate_state_dict)
        def with_plugin_state(args, *rest, **kwargs):
            state_dict = generate_state_dict(args, *rest, **kwargs)
            for name, state in states().items():
                if args.ckpt_format != "torch_dist":
                    state_dict[_KEY + name] = (saving[name] if name in saving
                                               else state.state_dict())
                    continue
                sharded = state.sharded_state_dict()
                if "present" in loading and not _keys(sharded) <= loading["present"]:
                    continue  # not in the checkpoint being loaded: the plugin is told so
                state_dict[_KEY + name] = sharded
            return state_dict

        @wraps(load_checkpoint)
        def load_with_plugin_state(model, *args, **kwargs):
            from megatron.training import get_args

            loading["present"] = _checkpoint_keys(get_args())
            base_load = checkpointing._load_base_checkpoint
            loaded: dict[str, Any] = {}

            @wraps(base_load)
            def keep_plugin_state(*a, **kw):
                result = base_load(*a, **kw)
                state_dict = result[0]
                if isinstance(state_dict, dict):
                    loaded.update({k: v for k, v in state_dict.items() if k.startswith(_KEY)})
                return result

            try:
                with patcher.scoped(checkpointing, "_load_base_checkpoint", keep_plugin_state):
                    result = load_checkpoint(model, *args, **kwargs)
            finally:
                loading.clear()
            for name, state in states().items():
                state.load_state_dict(loaded.get(_KEY + name))
            return result

        patcher.setattr(checkpointing, "generate_state_dict", with_plugin_state)
        patcher.setattr(checkpointing, "load_checkpoint", load_with_plugin_state)
        patcher.setattr(checkpointing, "save_checkpoint", save_with_plain_states)
        # training.py imports both by name.
        training = megatron_training()
        for attribute, replacement in (("load_checkpoint", load_with_plugin_state),):
            if hasattr(training, attribute):
                patcher.setattr(training, attribute, replacement)
        if getattr(training, "save_checkpoint", None) is save_checkpoint:
            patcher.setattr(training, "save_checkpoint", save_with_plain_states)

    return Fix(
        "seam:checkpoint-state",
        f"megatron/training/checkpointing.py:1296 generate_state_dict (save :752, load "
        f":2311/:2408; sharded for torch_dist only, :1321), :552 save_checkpoint (a torch-"
        f"format save generates it on data-parallel rank 0 alone, :737), :2066 "
        f"load_checkpoint, :1633 _load_base_checkpoint ({VERSION})",
        "save and load both build their sharded state dict in generate_state_dict; plugin "
        "state joins it under its own key and is handed back after the load",
        lambda: source_has(megatron_checkpointing().load_checkpoint, "generate_state_dict(",
                           "_load_base_checkpoint(") and
        source_has(megatron_checkpointing().generate_state_dict,
                   "if args.ckpt_format == 'torch_dist':"),
        apply, SEAM)


_KEY = "megaseek:"


def _plugins_saved_in(keys: set[str]) -> set[str]:
    """The plugins whose state the checkpoint holds ('megaseek:NAME.<key>')."""
    return {key[len(_KEY):].split(".", 1)[0] for key in keys if key.startswith(_KEY)}


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


def _keys(sharded: Any) -> set[str]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return {getattr(v, "key") for v in nested_values(sharded) if hasattr(v, "key")}


def _checkpoint_keys(args) -> set[str]:
    """The sharded keys of the checkpoint `load_checkpoint` is about to read (empty when
    there is none, or it is not a torch_dist checkpoint)."""
    from megatron.core.dist_checkpointing.core import check_is_distributed_checkpoint
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    checkpointing = megatron_checkpointing()
    load_dir = getattr(args, "load", None)
    if not load_dir:
        return set()
    tracker = checkpointing.get_checkpoint_tracker_filename(load_dir)
    if not os.path.isfile(tracker):
        return set()
    iteration, release = checkpointing.read_metadata(tracker)
    if getattr(args, "ckpt_step", None) is not None:
        iteration, release = args.ckpt_step, False
    directory = checkpointing.get_checkpoint_name(load_dir, iteration, release,
                                                  return_base_dir=True)
    if not check_is_distributed_checkpoint(directory):
        return set()
    metadata = load_sharded_metadata(directory)
    return set(metadata) | {v.key for v in metadata.values() if hasattr(v, "key")}


class CheckpointMismatch(ValueError):
    """The checkpoint in --load does not hold what this run's model needs."""


# Flags that shape the model, compared with the ones a checkpoint was saved with.
_MODEL_FLAGS = ("plugins", "num_layers", "hidden_size", "ffn_hidden_size",
                "num_attention_heads", "group_query_attention", "num_query_groups",
                "kv_channels", "multi_latent_attention", "q_lora_rank", "kv_lora_rank",
                "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "num_experts",
                "moe_layer_freq", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
                "normalization", "swiglu", "add_bias_linear", "qk_layernorm",
                "untie_embeddings_and_output_weights", "position_embedding_type",
                "mtp_num_layers", "transformer_impl")


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
            saved_by = _plugins_saved_in(_checkpoint_keys(run_args))
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
        lambda: source_has(_module("megatron.core.dist_checkpointing.strategies.torch")
                           .MCoreLoadPlanner._validate_global_shapes, "raise KeyError(",
                           "'Global shape mismatch for loaded (") and
        source_has(_module("megatron.core.optimizer.optimizer")
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


# The learning-rate schedule's values a checkpoint keeps (OptimizerParamScheduler.
# load_state_dict's names): as said to the user, the unit of its figures and the flags it
# comes from. Megatron names its lengths "iterations" but keeps them in samples
# (training.py:1914: iterations x --global-batch-size), so they are said in samples.
_SCHEDULER_FLAGS = {
    "learning rate": ("learning rate", "", "--lr"),
    "minimum learning rate": ("minimum learning rate", "", "--min-lr"),
    "warmup iterations": ("warmup length", " samples", "--lr-warmup-iters x --global-batch-size, "
                          "or --lr-warmup-fraction, --lr-warmup-samples"),
    "total number of iterations": ("decay length", " samples", "--lr-decay-iters, or "
                                   "--train-iters where --lr-decay-iters is not given, x "
                                   "--global-batch-size; or --lr-decay-samples"),
    "learning rate decay style": ("learning rate decay style", "", "--lr-decay-style"),
    "start weight decay": ("start weight decay", "", "--start-weight-decay (or --weight-decay)"),
    "end weight decay": ("end weight decay", "", "--end-weight-decay (or --weight-decay)"),
    "total number of weight decay iterations": ("weight decay length", " samples",
                                                "--train-iters x --global-batch-size, or "
                                                "--train-samples"),
    "weight decay incr style": ("weight decay incr style", "", "--weight-decay-incr-style"),
}


def scheduler_mismatch_named() -> Fix:
    """A resumed run whose learning-rate schedule differs from the checkpoint's (a changed
    --train-iters, --lr, ...) fails naming the value, both figures, the flags it comes from
    and the two flags that settle it, instead of the scheduler's AssertionError."""

    def apply(patcher: Patcher) -> None:
        scheduler = _module("megatron.core.optimizer_param_scheduler").OptimizerParamScheduler
        check_and_set = scheduler._check_and_set

        @wraps(check_and_set)
        def check_or_name_the_flags(self, cls_value, sd_value, name):
            try:
                return check_and_set(self, cls_value, sd_value, name)
            except AssertionError:
                from megatron.training import get_args

                said, unit, flags = _SCHEDULER_FLAGS.get(name, (name, "", "the schedule's flags"))
                raise CheckpointMismatch(
                    f"--load {get_args().load}: the checkpoint's learning-rate schedule has "
                    f"{said} {sd_value}{unit}, this run {cls_value}{unit} (from {flags}): give "
                    f"--override-opt_param-scheduler to use this run's values, or "
                    f"--use-checkpoint-opt_param-scheduler to keep the checkpoint's") from None

        patcher.setattr(scheduler, "_check_and_set", check_or_name_the_flags)

    return Fix(
        "seam:scheduler-mismatch-named",
        f"megatron/core/optimizer_param_scheduler.py:333 (_check_and_set asserts each "
        f"scheduler value equals the checkpoint's) ({VERSION})",
        "a resumed run with another --train-iters (or --lr, warmup, decay style) fails at "
        "load with an AssertionError that names no flag",
        lambda: source_has(_module("megatron.core.optimizer_param_scheduler")
                           .OptimizerParamScheduler._check_and_set, "assert cls_value == sd_value"),
        apply, SEAM)


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
    differ = _flags_that_differ(args, _MODEL_FLAGS)
    return (f"--load {args.load}: {what}: it was saved with another model configuration. "
            + ("Flags that differ: " + "; ".join(differ) + "." if differ else
               "Its saved arguments could not be compared.")
            + " Load it with the configuration it was saved with.")


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


# --- evaluation ------------------------------------------------------------------------------

def evaluation_passes(passes: Callable[[], Iterable[tuple[str, Callable[[], Any]]]]) -> Fix:
    """After each of Megatron's evaluations, every `(name, context)` of `passes()` evaluates again
    inside `context()`, on the same batches, its results printed on Megatron's line with the
    name after the loss: `validation loss (NAME) at iteration N | ...`, and written to
    TensorBoard and W&B under Megatron's tags with ` (NAME)` added (`lm loss validation
    (NAME)`), beside the raw weights' values rather than over them. The passes read no
    data: the validation position that a checkpoint saves is the first evaluation's."""
    def apply(patcher: Patcher) -> None:
        training = megatron_training()
        evaluate_and_print = training.evaluate_and_print_results
        print_rank_last = training.print_rank_last
        tensorboard_writer = training.get_tensorboard_writer
        wandb_writer = training.get_wandb_writer

        def labelled(name):
            def print_labelled(message):
                print_rank_last(message.replace(" loss at ", f" loss ({name}) at ", 1))

            return print_labelled

        def labelled_writer(get_writer, name):
            return lambda: _LabelledWriter.around(get_writer(), name)

        @wraps(evaluate_and_print)
        def with_extra_passes(prefix, forward_step_func, data_iterator, *args, **kwargs):
            from megatron.training import get_args

            recorded = _Recorded.wrap(data_iterator)
            result = evaluate_and_print(prefix, forward_step_func, recorded, *args, **kwargs)
            run_args = get_args()
            for name, context in passes():
                # Megatron's evaluate() counts the samples it reads (training.py:4294); the
                # count is saved and places the validation data on a resume. A pass reads
                # no new samples, so it leaves the count as the first evaluation left it.
                consumed = run_args.consumed_valid_samples
                with _restored(run_args, "consumed_valid_samples", consumed), context(), \
                        patcher.scoped(training, "print_rank_last", labelled(name)), \
                        patcher.scoped(training, "get_tensorboard_writer",
                                       labelled_writer(tensorboard_writer, name)), \
                        patcher.scoped(training, "get_wandb_writer",
                                       labelled_writer(wandb_writer, name)):
                    evaluate_and_print(prefix, forward_step_func, _Recorded.replay(recorded),
                                       *args, **kwargs)
            return result

        patcher.setattr(training, "evaluate_and_print_results", with_extra_passes)

    return Fix(
        "seam:evaluation-passes",
        f"megatron/training/training.py:4342 evaluate_and_print_results (prints with "
        f"print_rank_last, writes with get_tensorboard_writer and get_wandb_writer at "
        f":4359-4363), called at :4040, :1483, :1494; evaluate() adds to "
        f"args.consumed_valid_samples at :4294 ({VERSION})",
        "Megatron evaluates one set of weights; a plugin's pass runs the same evaluation "
        "again on the batches the first one read",
        lambda: source_has(megatron_training().evaluate_and_print_results, "evaluate(",
                           "print_rank_last(", "get_tensorboard_writer()", "get_wandb_writer()")
        and source_has(megatron_training().evaluate, "args.consumed_valid_samples +="),
        apply, SEAM)


@contextlib.contextmanager
def _restored(owner, name: str, value):
    """`owner.name` is `value` again when the block ends."""
    try:
        yield
    finally:
        setattr(owner, name, value)


class _LabelledWriter:
    """A TensorBoard writer (`add_scalar`) or W&B run (`log`) whose values go under their tag
    with ` (NAME)` added; everything else passes through."""

    def __init__(self, writer, name: str) -> None:
        self._writer, self._suffix = writer, f" ({name})"

    @classmethod
    def around(cls, writer, name: str):
        return None if writer is None else cls(writer, name)

    def add_scalar(self, tag, *args, **kwargs):
        return self._writer.add_scalar(tag + self._suffix, *args, **kwargs)

    def log(self, values: dict, *args, **kwargs):
        return self._writer.log({k + self._suffix: v for k, v in values.items()}, *args, **kwargs)

    def __getattr__(self, attribute):
        return getattr(self._writer, attribute)


class _Recorded:
    """An iterator that keeps what it yields, so that a second pass reads the same items."""

    def __init__(self, iterator) -> None:
        self.iterator, self.items = iterator, []

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.iterator)
        self.items.append(item)
        return item

    @classmethod
    def wrap(cls, data_iterator):
        if data_iterator is None:
            return None
        if isinstance(data_iterator, list):
            return [cls.wrap(d) for d in data_iterator]
        return cls(data_iterator)

    @staticmethod
    def replay(recorded):
        if recorded is None:
            return None
        if isinstance(recorded, list):
            return [_Recorded.replay(r) for r in recorded]
        return iter(list(recorded.items))


# --- the whole list, for `megaseek fixes` --------------------------------------------------------

def all_seams() -> tuple[Fix, ...]:
    """Every seam, built with placeholders (for listing and probing, not for applying)."""
    nothing = lambda *a, **k: None  # noqa: E731
    return (
        plugin_arguments(nothing, nothing),
        checks_before_argument_dump(nothing),
        model_specs(nothing),
        schedule(nothing),
        before_gradient_checks(tuple),
        after_optimizer_step(nothing),
        after_training(nothing),
        pipeline_placement(Placement(1, 1, lambda rank, chunk: 0)),
        checkpoint_state(dict),
        checkpoint_mismatch_named(),
        scheduler_mismatch_named(),
        argument_errors_refused(),
        evaluation_passes(tuple),
    )

