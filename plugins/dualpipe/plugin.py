"""The `dualpipe` plugin: `--plugins dualpipe --pipeline-schedule dualpipev|dualpipe`.

Attaches through the registry's hooks only: `placement` (which stages each rank's two
model chunks build), `schedule` (the forward-backward function Megatron's loop calls for
training and evaluation). Megatron builds the two chunks through its own model-chunk
mechanism: the plugin asks for two virtual stages per rank, which Megatron's placement
seam then puts where the schedule needs them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from plugins import Plugin, PluginError, TransformerEngine
from plugins.config import flag, megatron
from plugins.plan import Explained
from plugins.common.flags import recompute_granularity
from plugins.common.paths import unwritable_directory
from plugins.common.wgrad_checks import delay_wgrad_refusal
from plugins.dualpipe.layout import FIRST_FLAG, LAST_FLAG, LAYOUT_FLAG, LayoutError, StageLayout
from plugins.dualpipe.placement import DualPipePlacement
from plugins.dualpipe.program import Pipeline

SCHEDULES = ("dualpipev", "dualpipe")
# Where the run's cut is kept in Megatron's arguments, which hold none of the layout flags
# (`overrides`) and are saved with every checkpoint: a tool that rebuilds a checkpoint's
# model from them (integration/checkpoint_tool.py) builds the same stages.
SAVED_LAYOUT = "dualpipe_stage_layout"


@dataclass(frozen=True)
class DualPipePluginConfig:
    """The dualpipe plugin's flags, and the Megatron arguments its hooks read."""

    pipeline_schedule: str | None = flag(
        "--pipeline-schedule", None, choices=SCHEDULES,
        help="DeepSeek-V3's pipeline schedule: dualpipev (2 stages per rank in a V, loss on "
             "rank 0) or dualpipe (micro-batches from both ends, each stage held by two "
             "ranks)")
    pipeline_timeline: str | None = flag(
        "--pipeline-timeline", None, metavar="DIR",
        help="record when each pipeline cell ran, per rank, in DIR/timeline-rank{R}.jsonl "
             "(`megaseek schedule --from-run DIR`)")
    pipeline_model_parallel_size: int = megatron("pipeline_model_parallel_size", 1)
    num_layers: int | None = megatron("num_layers")
    mtp_num_layers: int | None = megatron("mtp_num_layers")
    pipeline_model_parallel_layout: str | None = megatron("pipeline_model_parallel_layout")
    decoder_first_pipeline_num_layers: int | None = megatron(
        "decoder_first_pipeline_num_layers")
    decoder_last_pipeline_num_layers: int | None = megatron("decoder_last_pipeline_num_layers")
    saved_stage_layout: str | None = megatron(SAVED_LAYOUT)
    account_for_embedding_in_pipeline_split: bool = megatron(
        "account_for_embedding_in_pipeline_split", False)
    account_for_loss_in_pipeline_split: bool = megatron("account_for_loss_in_pipeline_split",
                                                        False)
    delay_wgrad_compute: bool = megatron("delay_wgrad_compute", False)
    overlap_moe_expert_parallel_comm: bool = megatron("overlap_moe_expert_parallel_comm", False)
    transformer_impl: str = megatron("transformer_impl", "local")
    distributed_timeout_minutes: int | None = megatron("distributed_timeout_minutes")


def _flag(args, dest: str):
    return getattr(args, dest, None)


def check(config: DualPipePluginConfig, args) -> None:
    schedule = config.pipeline_schedule
    if schedule is None:
        raise PluginError("--plugins dualpipe needs --pipeline-schedule dualpipev (or dualpipe)")
    p = args.pipeline_model_parallel_size
    if p < 2:
        raise PluginError(f"--pipeline-schedule {schedule} needs "
                          f"--pipeline-model-parallel-size 2 or more (got {p})")
    if schedule == "dualpipe" and p % 2:
        raise PluginError(f"--pipeline-schedule dualpipe needs an even "
                          f"--pipeline-model-parallel-size (got {p}; use {p + 1})")
    for dest, flag in (("num_layers_per_virtual_pipeline_stage",
                        "--num-layers-per-virtual-pipeline-stage"),
                       ("num_virtual_stages_per_pipeline_rank",
                        "--num-virtual-stages-per-pipeline-rank")):
        if _flag(args, dest) is not None:
            raise PluginError(f"{flag} cannot be combined with --pipeline-schedule {schedule}, "
                              f"which places its own stages: drop {flag}")
    if not args.untie_embeddings_and_output_weights:
        raise PluginError(f"--pipeline-schedule {schedule} needs "
                          "--untie-embeddings-and-output-weights (as DeepSeek-V3): a tied "
                          "output layer would live on the same rank as its embedding in "
                          "another chunk, which Megatron's embedding group cannot tie")
    if _flag(args, "mtp_num_layers") and _flag(args, "use_distributed_optimizer") and _flag(
            args, "dist_ckpt_optim_fully_reshardable"):
        # Measured: a checkpoint saved this way holds the wrong optimizer state for the
        # embedding (its fp32 copy 0.13 off the weights) once rank 0 holds two embedding
        # copies (stage 0's and MTP's); the default format and DDP resume bit-exactly.
        raise PluginError(f"--dist-ckpt-optim-fully-reshardable cannot be combined with "
                          f"--mtp-num-layers under --pipeline-schedule {schedule}: Megatron's "
                          f"fully reshardable optimizer format saves the embedding's state "
                          f"wrongly when one rank holds two embedding copies; drop "
                          f"--dist-ckpt-optim-fully-reshardable (the default format resumes "
                          f"exactly)")
    if _flag(args, "overlap_param_gather_with_optimizer_step"):
        # Megatron allows it with virtual stages (which this plugin asks for); it starts
        # the first bucket's gather from its interleaved schedule's hooks, never called here.
        raise PluginError(f"--overlap-param-gather-with-optimizer-step cannot be combined with "
                          f"--pipeline-schedule {schedule}, whose schedules do not start "
                          f"Megatron's parameter gathers: drop it")
    if _flag(args, "overlap_moe_expert_parallel_comm"):
        _check_overlap(args)
    refused = delay_wgrad_refusal(args)
    if refused:
        raise PluginError(refused)
    timeline = config.pipeline_timeline
    unwritable = timeline and unwritable_directory(timeline)
    if unwritable:  # each rank writes its file at the end of the first step
        raise PluginError(f"--pipeline-timeline {timeline}: {unwritable}")
    try:
        layout = stage_layout(config)
    except LayoutError as why:
        raise PluginError(str(why)) from None
    if layout is None:
        _check_layers(args, schedule)
    else:
        for dest in ("account_for_embedding_in_pipeline_split",
                     "account_for_loss_in_pipeline_split"):
            if _flag(args, dest):  # Megatron's rule for its own layouts too
                raise PluginError(f"--{dest.replace('_', '-')} cannot be combined with "
                                  f"{_layout_flags(config)}, which place the embedding and "
                                  f"the loss themselves: drop --{dest.replace('_', '-')}")
    _check_microbatches(args, schedule)


def _layout_flags(config: DualPipePluginConfig) -> str:
    return " and ".join(flag for flag, value in (
        (LAYOUT_FLAG, config.pipeline_model_parallel_layout),
        (FIRST_FLAG, config.decoder_first_pipeline_num_layers),
        (LAST_FLAG, config.decoder_last_pipeline_num_layers)) if value is not None)


def stage_layout(config: DualPipePluginConfig) -> StageLayout | None:
    """The uneven layout the run's flags give the schedule's stages, checked (raises
    `LayoutError` naming the flag); None for Megatron's even split."""
    layout_text = config.pipeline_model_parallel_layout
    first = config.decoder_first_pipeline_num_layers
    last = config.decoder_last_pipeline_num_layers
    if layout_text is None and first is None and last is None:
        if config.saved_stage_layout is None:
            return None
        layout_text = config.saved_stage_layout  # a checkpoint's saved arguments
    if layout_text is not None and (first is not None or last is not None):
        raise LayoutError(f"{LAYOUT_FLAG} cannot be combined with {FIRST_FLAG} or "
                          f"{LAST_FLAG} (the layout already says every stage's layers): "
                          f"drop one")
    p = config.pipeline_model_parallel_size
    stages = Pipeline(config.pipeline_schedule, p, microbatches=0).stages
    mtp = config.mtp_num_layers or 0
    if layout_text is not None:
        layout = StageLayout.parse(layout_text)
    else:
        layout = StageLayout.split(config.num_layers, stages, first, last, mtp)
    layout.check(stages, config.num_layers, mtp, config.pipeline_schedule, p)
    return layout


def stages_said(config: DualPipePluginConfig) -> list[str]:
    """The start-up log's lines that say which stages each pipeline rank holds and what is
    in them (the layout's cut, else Megatron's even split), one line per rank."""
    p, schedule = config.pipeline_model_parallel_size, config.pipeline_schedule
    pipeline = Pipeline(schedule, p, microbatches=0)
    layout, given = stage_layout(config), ""
    if config.pipeline_model_parallel_layout is not None:
        given = f" ({LAYOUT_FLAG} {layout})"
    elif config.decoder_first_pipeline_num_layers is not None or \
            config.decoder_last_pipeline_num_layers is not None:
        given = " (" + " ".join(f"{flag} {count}" for flag, count in (
            (FIRST_FLAG, config.decoder_first_pipeline_num_layers),
            (LAST_FLAG, config.decoder_last_pipeline_num_layers)) if count is not None) \
            + f": {layout})"  # Megatron's uneven split, and the cut it gives
    elif layout is not None:
        given = f" (as the checkpoint was saved: {layout})"
    else:
        layout = StageLayout.even(config.num_layers, pipeline.stages, config.mtp_num_layers or 0,
                                  config.account_for_embedding_in_pipeline_split,
                                  config.account_for_loss_in_pipeline_split)
    lines = [f"megaseek: --pipeline-schedule {schedule} places its stages{given}:"]
    for rank in range(p):
        held = []
        for direction, stage in sorted(pipeline.place(rank, c) for c in range(pipeline.chunks)):
            held.append(f"stage {stage} ({layout.contents(stage)})")
            if pipeline.directions == 2:  # DualPipe: micro-batches enter at both ends
                held[-1] += (" of the micro-batches from rank 0" if direction == 0
                             else f" of those from rank {p - 1}")
        lines.append(f"megaseek:   rank {rank} holds {' and '.join(held)}")
    return lines


def overrides(config: DualPipePluginConfig) -> dict:
    """Megatron builds two model chunks per rank (one DDP wrapper, one data iterator each),
    as for its interleaved schedule; the placement seam decides which stages they are. The
    schedules call no parameter-gather hooks of Megatron's interleaved schedule (as
    Megatron turns them off without virtual stages). An uneven layout is the placement's
    to cut (Megatron would read it as interleaved stages), so Megatron is given none; the
    cut is kept beside its arguments (SAVED_LAYOUT), to be saved with them."""
    taken, layout = {}, stage_layout(config)
    if layout is not None:
        placed = Explained(None, "the schedule's placement cuts the layout's stages itself; "
                                 "Megatron would read them as interleaved ones")
        taken = {"pipeline_model_parallel_layout": placed,
                 "decoder_first_pipeline_num_layers": placed,
                 "decoder_last_pipeline_num_layers": placed,
                 SAVED_LAYOUT: Explained(str(layout), "the cut, saved with the checkpoint's "
                                                      "arguments for tools that rebuild it")}
    return {"num_virtual_stages_per_pipeline_rank": 2, "align_param_gather": False, **taken}


OVERLAP = "--overlap-moe-expert-parallel-comm"


def _check_overlap(args) -> None:
    """What the F&B overlap (plugins.dualpipe.overlap) cannot make correct, or pointless."""
    ep = args.expert_model_parallel_size
    if ep < 2:
        raise PluginError(f"{OVERLAP} needs --expert-model-parallel-size 2 or more (got {ep}): "
                          "without expert parallelism there is no all-to-all to overlap")
    # Both chunks' layers would communicate on these groups at once; only the
    # expert-parallel ones get a copy per chunk.
    etp = _flag(args, "expert_tensor_parallel_size") or args.tensor_model_parallel_size
    for flag, size in (("--tensor-model-parallel-size", args.tensor_model_parallel_size),
                       ("--context-parallel-size", args.context_parallel_size),
                       ("--expert-tensor-parallel-size", etp)):
        if size > 1:
            raise PluginError(f"{OVERLAP} with --pipeline-schedule needs {flag} 1 (got {size}): "
                              "the two overlapped chunks would interleave their collectives "
                              "on its group")
    # Recomputation saves and restores the random generator in backward, racing the
    # other chunk's dropout in forward.
    if recompute_granularity(args) is not None:
        raise PluginError(f"{OVERLAP} with --pipeline-schedule cannot be combined with "
                          "--recompute-granularity: drop it")
    if _flag(args, "overlap_param_gather"):
        raise PluginError(f"{OVERLAP} with --pipeline-schedule cannot be combined with "
                          "--overlap-param-gather (its forward hooks gather parameters on the "
                          "data-parallel group, shared by both chunks): drop it")
    import torch

    if torch.cuda.is_available():
        # Two threads issuing NCCL work on two communicators in different orders on
        # different ranks can deadlock (NCCL's rule: one order on every rank).
        raise PluginError(f"{OVERLAP} with --pipeline-schedule runs on gloo (CPU) only so "
                          "far: drop it on GPU")


def _stages(args, schedule: str) -> int:
    p = args.pipeline_model_parallel_size
    return 2 * p if schedule == "dualpipev" else p


def _check_layers(args, schedule: str) -> None:
    stages = _stages(args, schedule)
    layers = args.num_layers
    extra = int(bool(_flag(args, "account_for_embedding_in_pipeline_split"))) \
        + int(bool(_flag(args, "account_for_loss_in_pipeline_split")))
    if (layers + extra) % stages:
        smallest = stages * max(1, -(-(layers + extra) // stages)) - extra
        raise PluginError(f"--num-layers {layers} cannot be cut into the {stages} equal stages "
                          f"of --pipeline-schedule {schedule} on "
                          f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}: "
                          f"use a multiple of {stages} (e.g. --num-layers {smallest})"
                          + "".join(f"; --{dest.replace('_', '-')} counts one more layer "
                                    "(or drop it)" for dest in (
                              "account_for_embedding_in_pipeline_split",
                              "account_for_loss_in_pipeline_split") if _flag(args, dest))
                          + f"; or cut {stages} uneven stages with {LAYOUT_FLAG} (or "
                          f"{FIRST_FLAG} / {LAST_FLAG})")


def _check_microbatches(args, schedule: str) -> None:
    p = args.pipeline_model_parallel_size
    data_parallel = getattr(args, "data_parallel_size", None) or max(1, args.world_size // (
        args.tensor_model_parallel_size * p * args.context_parallel_size))
    per_microbatch = args.micro_batch_size * data_parallel
    # Megatron's default where the flag is not given: one micro-batch per data-parallel rank.
    global_batch = args.global_batch_size or per_microbatch
    microbatches = global_batch // per_microbatch
    pipeline = Pipeline(schedule, p, microbatches)
    try:
        pipeline.check()
    except ValueError as why:
        smallest = Pipeline.smallest_microbatches(schedule, p)
        raise PluginError(f"--global-batch-size {global_batch} gives {microbatches} "
                          f"micro-batches per step (--micro-batch-size {args.micro_batch_size} "
                          f"x {data_parallel} data-parallel ranks); {why}: use "
                          f"--global-batch-size {smallest * per_microbatch} or more") from None


def needed_by(args: argparse.Namespace) -> str | None:
    """Megatron's --delay-wgrad-compute without Transformer Engine: megaseek's linears
    defer their weight gradients, and only this plugin's schedules run them."""
    if _flag(args, "delay_wgrad_compute") and args.transformer_impl == "local":
        return ("--delay-wgrad-compute without Transformer Engine needs --plugins dualpipe "
                "--pipeline-schedule dualpipev (or dualpipe), whose schedules run the "
                "deferred weight gradients")
    return None


def transform_layer_spec(config: DualPipePluginConfig, layer_spec):
    """With --delay-wgrad-compute, Megatron's parallel linears become their deferring
    drop-ins (megaseek's own linears defer by their config)."""
    if not config.delay_wgrad_compute:
        return layer_spec
    from plugins.common.parallel_linear import with_deferring_linears

    return with_deferring_linears(layer_spec)


def fixes(config: DualPipePluginConfig):
    """Megatron's config checks for deferred weight gradients without TE and for the
    all-to-all overlap, lifted where the run asks for them."""
    from upstream.overlap import overlap_fixes
    from upstream.patching import applicable
    from upstream.wgrad import delay_wgrad_fixes

    return applicable(delay_wgrad_fixes() + overlap_fixes(), config)


def placement(config: DualPipePluginConfig) -> DualPipePlacement:
    pipeline = Pipeline(config.pipeline_schedule, config.pipeline_model_parallel_size,
                        microbatches=0)
    process_groups = None
    if config.overlap_moe_expert_parallel_comm:  # chunk 1 on its own communicators
        from datetime import timedelta

        from plugins.dualpipe.overlap import chunk_process_groups

        minutes = config.distributed_timeout_minutes
        process_groups = chunk_process_groups(timedelta(minutes=minutes) if minutes else None)
    layout = stage_layout(config)
    return DualPipePlacement(pipeline.ranks, pipeline.chunks,
                             lambda rank, chunk: pipeline.place(rank, chunk)[1],
                             copies=pipeline.directions, process_groups=process_groups,
                             layers=None if layout is None else layout.layers,
                             said=tuple(stages_said(config)))


def schedule(config: DualPipePluginConfig):
    from plugins.common.wgrad import take_deferred_weight_gradients
    from plugins.dualpipe.schedule import forward_backward

    return forward_backward(config.pipeline_schedule, timeline_dir=config.pipeline_timeline,
                            weight_gradients=take_deferred_weight_gradients
                            if config.delay_wgrad_compute else None,
                            overlap=config.overlap_moe_expert_parallel_comm)


DUALPIPE = Plugin(
    name="dualpipe",
    summary="DeepSeek-V3's DualPipe and DualPipeV pipeline schedules as Megatron schedules "
            "(--pipeline-schedule)",
    config=DualPipePluginConfig,
    check=check,
    overrides=overrides,
    needed_by=needed_by,
    transform_layer_spec=transform_layer_spec,
    fixes=fixes,
    placement=placement,
    schedule=schedule,
    slots=frozenset({"schedule", "placement"}),
    # Its schedules overlap whole chunks' all-to-alls (overlap.py), not Megatron's split
    # of a MoE layer, so a MoE plugin's refusal of the flag does not apply.
    honours=frozenset({"overlap_moe_expert_parallel_comm"}),
    transformer_engine=TransformerEngine(
        composes=True,
        effect="leaves TE's spec untouched: its schedules place the stages and call "
               "Megatron's forward step, with TE's first-micro-batch signal per chunk",
        gives_up="TE's own --delay-wgrad-compute (refused with the plugin; megaseek defers "
                 "the weight gradients of the local linears only)"),
)
