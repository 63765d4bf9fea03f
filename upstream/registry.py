"""Every change megaseek makes to upstream code, in one list (`megaseek fixes` prints it).

Where each is defined (its scope), and who applies it:
- `compat.TYPING_OVERRIDE` (Python < 3.12): `import integration`;
- `compat.FIXES` (every machine), `cpu.FIXES` (CPU only): `compat.install()`,
  `cpu.install()` at the start of a run; `cpu.LAUNCH_SCRIPT_FIXES`: the launcher;
- `transformer.FIXES` (plugin fp8 or mla, with the flags that need them), `moe.FIXES`
  (plugin moe, with the recomputation flags that need them) and
  `optimizer.bf16_moments_fixes` (`--exp-avg-dtype`/`--exp-avg-sq-dtype bf16`) and
  `wgrad.delay_wgrad_fixes` (plugin dualpipe, `--delay-wgrad-compute` without TE) and
  `overlap.overlap_fixes` (plugin dualpipe, `--overlap-moe-expert-parallel-comm`): the
  enabled plugins' `fixes` hooks, applied by the launch path;
- `wgrad.DELAY_WGRAD_ARGUMENTS` (every run): the launch path, before Megatron parses;
- `seams` (an enabled plugin provides the hook): the launch path (`seams.listing`);
- `checkpoint_files` (every run: checksums, verified loads, failed saves named),
  `mtp_validation` (every run: MTP's loss in the validation results) and
  `mtp_training_log` (every run: MTP's training loss over the advanced iterations):
  `integration.hooks.megatron_run`;
- `private_names` (patch nothing): Megatron's private names that plugin modules override
  or call; each module runs the probe where it relies on the name;
- `shutdown.PROCESS_GROUPS_LEFT_ALIVE`: recorded only; both entry points call `end_run`.

Fixes built by a factory from what a plugin provides (an optimizer class, a callback)
are listed here as built with placeholders: for listing and probing, not for applying.
"""

from __future__ import annotations

from upstream import (checkpoint_files, compat, cpu, moe, mtp_training_log, mtp_validation,
                      optimizer, overlap, private_names, shutdown, transformer, wgrad)
from upstream.patching import Fix
from upstream.seams.listing import all_seams


def all_fixes() -> tuple[Fix, ...]:
    return (
        compat.TYPING_OVERRIDE,
        *compat.FIXES,
        *cpu.FIXES,
        *cpu.LAUNCH_SCRIPT_FIXES,
        *transformer.FIXES,
        *moe.FIXES,
        *optimizer.bf16_moments_fixes(adam_class=None),
        wgrad.DELAY_WGRAD_ARGUMENTS,
        *wgrad.delay_wgrad_fixes(),
        *overlap.overlap_fixes(),
        *all_seams(),
        checkpoint_files.checksums_as_written([]),
        checkpoint_files.manifest_after_async_save(),
        checkpoint_files.verified_load(),
        checkpoint_files.failed_save_named([]),
        mtp_validation.MTP_VALIDATION_LOSS,
        mtp_training_log.MTP_LOSS_OF_SKIPPED_ITERATIONS,
        shutdown.PROCESS_GROUPS_LEFT_ALIVE,
        *private_names.FIXES,
    )
