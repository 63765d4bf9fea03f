"""Parse a Megatron command line with megaseek's plugins, and build the GPT model from it,
as the launch path does."""

from __future__ import annotations

import sys

import integration  # noqa: F401  (megatron.training on Python 3.11)
from plugins import default_registry


def enabled(argv: list[str], monkeypatch):
    """(args, the run plan's enabled plugins) for `argv`, the plan's overrides applied to
    `args`, as the launch path has them before Megatron validates them; raises PluginError
    where start-up would."""
    from megatron.training.arguments import parse_args

    registry = default_registry()
    monkeypatch.setattr(sys, "argv", ["pretrain", *argv])
    args = parse_args(extra_args_provider=registry.add_arguments)
    plan = registry.plan(args)
    plan.apply_overrides(args)
    return args, list(plan.plugins)


def validated(argv: list[str]):
    """(args, the run plan's enabled plugins) for `argv` after Megatron's own validation as
    well (its argument dump silenced), as the launch path has them when it builds the
    model."""
    import contextlib
    import io

    from megatron.training.arguments import parse_args, validate_args

    registry = default_registry()
    saved, sys.argv = sys.argv, ["pretrain", *argv]
    try:
        args = parse_args(extra_args_provider=registry.add_arguments)
    finally:
        sys.argv = saved
    plan = registry.plan(args)
    plan.apply_overrides(args)
    with contextlib.redirect_stdout(io.StringIO()):
        validate_args(args, {})
    return args, list(plan.plugins)


def fixes_of(plugins) -> list:
    """The upstream fixes the enabled plugins need for their run."""
    return [fix for p in plugins if p.fixes is not None for fix in p.fixes()]


def gpt_model(args, plugins, vocab_size: int):
    """Megatron's GPTModel from its (local, block) spec as the plugins transform it,
    initialized from seed 0."""
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.training.argument_utils import core_transformer_config_from_args

    from plugins import transform_spec

    config = core_transformer_config_from_args(args)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                      normalization=args.normalization)
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    return GPTModel(config=config, transformer_layer_spec=transform_spec(plugins, spec),
                    vocab_size=vocab_size, max_sequence_length=args.max_position_embeddings,
                    position_embedding_type=args.position_embedding_type)
