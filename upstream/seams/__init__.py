"""Where plugins attach to Megatron's training loop (megatron-core 0.19.2).

Megatron offers no hook for most of what plugins need, so each attachment replaces one
name that Megatron looks up at call time. Each is a `Fix` (file:line, reason, a probe
that fails once upstream changes the place it attaches to), built for one run by a
factory that takes what the plugins provide, and applied through a `Patcher`, so that
every change is undone when the run ends. One module per seam:

- `arguments`:
  - `plugin_arguments`: every parse of Megatron's arguments knows the plugin flags; the
    script's own parse also enables the plugins (the launcher's way in);
  - `argument_errors_refused`: a command line Megatron's parser refuses raises instead of
    printing argparse's usage on every rank;
  - `checks_before_argument_dump`: start-up checks run before Megatron validates its
    arguments and before it prints them; its failed checks are said in words;
- `model`: the one wrapper of `GPTModel.__init__`, which the seams that shape a model
  attach to; `model_specs` through it: every `GPTModel` built gets its layer spec (a
  layer's, or a block's, one per layer) and its MTP block spec through the plugins'
  transforms, whichever way the model is built (a script's model provider, or `pretrain`
  without one);
- `loop`:
  - `schedule`: Megatron's `get_forward_backward_func` answers with a plugin's schedule;
  - `before_gradient_checks`: callbacks run once the step's backward passes are done,
    before Megatron checks and reduces the gradients, with the iteration;
  - `after_optimizer_step`: callbacks run after each successful step, with the iteration;
  - `after_training`: callbacks run when Megatron's training loop ends;
- `placement`: `pipeline_placement`: which stages each rank's pipeline chunks build (and,
  where the plugin says, with which process groups), as a `Placement` says;
- `checkpoint_state`: plugin state saved and loaded with Megatron's checkpoint;
- `checkpoint_mismatch` (`checkpoint_mismatch_named`), `scheduler_mismatch`
  (`scheduler_mismatch_named`): a checkpoint that does not fit the run (its model, its
  optimizer's parameter groups, its learning-rate schedule) fails naming the flags;
- `evaluation`: `evaluation_passes`: extra passes of Megatron's evaluation, on the same
  batches;
- `errors`: what the seams raise for the run's frame to report (`MegatronRefused`,
  `CheckpointMismatch`);
- `listing`: `all_seams()`, every seam (for `megaseek fixes`).
"""

from __future__ import annotations

from upstream.patching import Scope

VERSION = "megatron-core 0.19.2"
# A seam is attached for a run when an enabled plugin provides its hook.
SEAM = Scope("seam, when an enabled plugin provides the hook", lambda args: True)
