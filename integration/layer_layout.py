"""How the flags lay the decoder's layers out, checked against --num-layers at start-up
(megatron-core 0.19.2 checks them, if at all, when the model is built, in words that name
its config fields or an internal value rather than the flags).

- `--moe-layer-freq`: a ratio N (every Nth layer is MoE) or a list with one 0 (dense) or 1
  (MoE) per layer; gpt_layer_specs.py:647-671 reads it when the decoder's specs are made.
- `--decoder-first-pipeline-num-layers` / `--decoder-last-pipeline-num-layers`: an uneven
  pipeline split; TransformerConfig (transformer_config.py:1989-2040) gives the middle
  stages what is left, and lets a first stage larger than the model through (the next stage
  gets a negative count and builds nothing).
- An even split: validate_args (arguments.py:951-965) asserts --num-layers, plus one for
  each of --account-for-embedding-in-pipeline-split and --account-for-loss-in-pipeline-split,
  divides over the stages, naming `transformer_pipeline_model_parallel_size`.
"""

from __future__ import annotations

import argparse


def moe_layer_pattern_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with `--moe-layer-freq` for `--num-layers`, or None."""
    freq, layers = getattr(args, "moe_layer_freq", None), args.num_layers
    if freq is None or not getattr(args, "num_experts", None) or not layers:
        return None  # without experts no layer is MoE, and the flag is not read
    if isinstance(freq, int):
        if freq < 1:
            return (f"--moe-layer-freq {freq} must be 1 or more (every Nth layer is MoE), or "
                    "a list of 0 (dense) and 1 (MoE), one per layer")
        return None
    if len(freq) != layers:
        return (f"--moe-layer-freq has {len(freq)} entries for --num-layers {layers}: give "
                f"one 0 (dense) or 1 (MoE) per layer")
    stray = [entry for entry in freq if entry not in (0, 1)]
    if stray:
        return (f"--moe-layer-freq holds {stray[0]}: each entry is 0 (a dense layer) or 1 "
                "(an MoE layer)")
    return None


def _layout_given_otherwise(args: argparse.Namespace) -> bool:
    """A layout that validate_args and TransformerConfig check on their own paths."""
    return bool(getattr(args, "pipeline_model_parallel_layout", None)
                or getattr(args, "hybrid_layer_pattern", None)
                or getattr(args, "num_layers_per_virtual_pipeline_stage", None)
                or getattr(args, "num_virtual_stages_per_pipeline_rank", None))


_FIRST, _LAST = "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers"
_ACCOUNTED = (("account_for_embedding_in_pipeline_split",
               "--account-for-embedding-in-pipeline-split"),
              ("account_for_loss_in_pipeline_split", "--account-for-loss-in-pipeline-split"))


def pipeline_stages_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with how `args` split --num-layers over the pipeline stages, or None."""
    layers, stages = args.num_layers, args.pipeline_model_parallel_size or 1
    if not layers or layers < 1 or stages < 1 or _layout_given_otherwise(args):
        return None
    if getattr(args, "pipeline_schedule", None):
        return None  # a plugin's schedule places its own stages and checks their cut
    first = getattr(args, "decoder_first_pipeline_num_layers", None)
    last = getattr(args, "decoder_last_pipeline_num_layers", None)
    accounted = [flag for dest, flag in _ACCOUNTED if getattr(args, dest, False)]
    if first is None and last is None:
        if stages == 1:
            return None
        counted = layers + len(accounted)
        if counted % stages == 0:
            return None
        said = f"--num-layers {layers}" + "".join(f" + 1 for {flag}" for flag in accounted)
        return (f"{said} = {counted} layers must divide evenly over "
                f"--pipeline-model-parallel-size {stages} stages"
                + (f": change --num-layers, or drop {' and '.join(accounted)}" if accounted
                   else ": change --num-layers, or give --decoder-first-pipeline-num-layers / "
                        "--decoder-last-pipeline-num-layers for an uneven split"))
    given = [(flag, count) for flag, count in ((_FIRST, first), (_LAST, last))
             if count is not None]
    said = " and ".join(f"{flag} {count}" for flag, count in given)
    if stages == 1:
        return (f"{said}: an uneven pipeline split needs --pipeline-model-parallel-size 2 or "
                f"more (this run has one stage, which holds every layer): drop it")
    if accounted:
        return (f"{said} and {accounted[0]} both set the first or last stage's share: "
                "choose one")
    for flag, count in given:
        if count < 1:
            return f"{flag} {count} must be 1 or more"
    middle_stages = stages - len(given)
    middle_layers = layers - sum(count for _, count in given)
    if middle_layers < 0 or (middle_stages == 0 and middle_layers):
        return (f"{said} must add up to --num-layers {layers}"
                + (" (there are no middle stages to hold the rest)" if middle_layers > 0
                   else "") if middle_stages == 0 else
                f"{said}: more than --num-layers {layers}, leaving none for the other "
                f"{middle_stages} of --pipeline-model-parallel-size {stages} stages")
    if middle_layers < middle_stages or middle_layers % middle_stages:
        return (f"{said}: {middle_layers} of --num-layers {layers} left for the other "
                f"{middle_stages} of --pipeline-model-parallel-size {stages} stages, and each "
                "needs the same number, 1 or more")
    return None
