"""What the seams raise on a configuration or a checkpoint that does not fit the run: the
run's frame (`integration.hooks.megatron_run`) reports each as one `megaseek: error:`
line on rank 0, as argparse reports a bad flag."""

from __future__ import annotations


class MegatronRefused(ValueError):
    """Megatron's own argument validation failed (an `assert` or a ValueError raised in
    `validate_args`), or its parser refused the command line."""


class CheckpointMismatch(ValueError):
    """The checkpoint in --load does not hold what this run's model needs."""
