"""Megatron's `--delay-wgrad-compute` without Transformer Engine (plugin dualpipe).

Megatron implements the flag only in TE's linears and refuses it elsewhere; megaseek's
linears defer their weight gradients themselves (`plugins.common.wgrad`), so for a
TE-free run that enables the dualpipe plugin (whose schedule runs the W) two checks go:

- `DELAY_WGRAD_ARGUMENTS`: `validate_args` asserts `--transformer-impl transformer_engine`
  and TE versions for the flag; its block is narrowed to TE runs. It must be in place
  before `validate_args` runs and before the argument seam wraps it (`apply` refuses to
  replace a wrapper); its rewritten condition holds only for TE runs, so applying it to
  every run changes nothing for them;
- `DELAY_WGRAD_CONFIG`: `TransformerConfig.__post_init__` asserts
  `overlap_moe_expert_parallel_comm` with the flag (Megatron's W runs only inside its
  combined-1F1B MoE schedule); megaseek's W is the dualpipe schedule's own cell.

What the deferral cannot honour stays refused by name: `plugins.common.wgrad_checks`.
"""

from __future__ import annotations

import argparse
import inspect
import types

from upstream.megatron_modules import megatron_arguments, megatron_module
from upstream.patching import (EVERY_MACHINE, Fix, Patcher, plugin_scope, rewrite_function,
                               source_has)

VERSION = "megatron-core 0.19.2"

ARGUMENTS_CHECK = "    if args.delay_wgrad_compute:\n        assert args.transformer_impl == 'transformer_engine'"
ARGUMENTS_NARROWED = ("    if args.delay_wgrad_compute and args.transformer_impl == 'transformer_engine':"
                      "  # narrowed by megaseek: plugins.common.wgrad defers without TE\n"
                      "        assert args.transformer_impl == 'transformer_engine'")
CONFIG_CHECK = ("            assert (\n                self.overlap_moe_expert_parallel_comm\n"
                "            ), 'overlap_moe_expert_parallel_comm must be enabled when enabling "
                "delay_wgrad_compute'")
CONFIG_LIFTED = ("            pass  # lifted by megaseek: the dualpipe schedule runs the W "
                 "(plugins.common.wgrad)")


def _arguments():
    return megatron_arguments()


def _config_cls():
    return megatron_module("megatron.core.transformer.transformer_config").TransformerConfig


def _te_free_delay(args: argparse.Namespace) -> bool:
    return bool(args.delay_wgrad_compute) and args.transformer_impl == "local"


def _narrow_arguments_check(p: Patcher) -> None:
    arguments = _arguments()
    current = arguments.validate_args
    if inspect.unwrap(current) is not current:
        raise RuntimeError("delay-wgrad-without-te: validate_args is already wrapped (the "
                           "argument seam); apply this fix before it")
    p.setattr(arguments, "validate_args", rewrite_function(
        types.SimpleNamespace(validate_args=current), "validate_args",
        {ARGUMENTS_CHECK: ARGUMENTS_NARROWED}))


def _lift_config_check(p: Patcher) -> None:
    cls = _config_cls()
    p.setattr(cls, "__post_init__", rewrite_function(cls, "__post_init__",
                                                     {CONFIG_CHECK: CONFIG_LIFTED}))


SCOPE = plugin_scope("dualpipe", "--delay-wgrad-compute and --transformer-impl local",
                     _te_free_delay)
# Megatron checks its arguments before any plugin is known: the narrowed check is in place
# at every start-up on every machine (it changes nothing for TE runs), and the dualpipe
# plugin refuses the flag without TE where it is not enabled.

DELAY_WGRAD_ARGUMENTS = Fix(
    "delay-wgrad-without-te-arguments",
    f"megatron/training/arguments.py:1822-1852 ({VERSION})",
    "validate_args refuses --delay-wgrad-compute unless --transformer-impl "
    "transformer_engine (and checks TE versions for it); megaseek's local linears defer "
    "their weight gradients themselves, so the block is narrowed to TE runs. Needs to be "
    "in place before validate_args runs",
    lambda: source_has(_arguments().validate_args, ARGUMENTS_CHECK),
    _narrow_arguments_check, EVERY_MACHINE)

DELAY_WGRAD_CONFIG = Fix(
    "delay-wgrad-without-combined-1f1b",
    f"megatron/core/transformer/transformer_config.py:2749-2752 ({VERSION})",
    "TransformerConfig refuses delay_wgrad_compute without overlap_moe_expert_parallel_comm "
    "(Megatron runs the W only in its combined-1F1B MoE schedule); the dualpipe schedule "
    "runs megaseek's W cells itself",
    lambda: source_has(_config_cls().__post_init__, CONFIG_CHECK),
    _lift_config_check, SCOPE)


def delay_wgrad_fixes() -> tuple[Fix, ...]:
    """The fixes `--delay-wgrad-compute` needs without TE: the config's, for the dualpipe
    plugin's `fixes` hook (the arguments' is applied at start-up by the launch path)."""
    return (DELAY_WGRAD_CONFIG,)
