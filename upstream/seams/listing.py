"""Every seam, for `megaseek fixes` (upstream.registry.all_fixes)."""

from __future__ import annotations

from upstream.patching import Fix
from upstream.seams.arguments import (argument_errors_refused, checks_before_argument_dump,
                                      plugin_arguments)
from upstream.seams.checkpoint_mismatch import checkpoint_mismatch_named
from upstream.seams.checkpoint_state import checkpoint_state
from upstream.seams.evaluation import evaluation_passes
from upstream.seams.loop import (after_optimizer_step, after_training, before_gradient_checks,
                                 schedule)
from upstream.seams.model import model_specs
from upstream.seams.placement import Placement, pipeline_placement
from upstream.seams.scheduler_mismatch import scheduler_mismatch_named


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
