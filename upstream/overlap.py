"""Megatron's `--overlap-moe-expert-parallel-comm` run by the dualpipe schedules (plugin
dualpipe).

`TransformerConfig.__post_init__` checks the flag against Megatron's own implementation
(its combined-1F1B schedule splits Megatron's MoE layer into per-stream callables). Two of
those checks are about that implementation only; the dualpipe schedule overlaps a whole
forward with a whole backward on separate communicators (`plugins.dualpipe.overlap`), so
for it they go:

- the token dispatcher must be `alltoall` or `flex`: megaseek's MoE layer dispatches by
  all-to-all whatever `--moe-token-dispatcher-type` says, and Megatron's own dispatchers
  communicate on groups the dualpipe plugin duplicates per chunk;
- the model must be bf16 or fp16: nothing in the overlap depends on the dtype.

Megatron's other checks of the flag stay (expert parallelism, no recomputation, at most
one MTP layer, no shared-expert overlap); the dualpipe plugin refuses what they refuse,
by name, before the config is built.
"""

from __future__ import annotations


from upstream.megatron_modules import megatron_module
from upstream.patching import Fix, Patcher, plugin_scope, rewrite_function, source_has

VERSION = "megatron-core 0.19.2"

DISPATCHER_CHECK = (
    "            assert self.moe_token_dispatcher_type in [\n"
    "                'alltoall',\n"
    "                'flex',\n"
    "            ], 'overlap_moe_expert_parallel_comm is supported with alltoall/flex token "
    "dispatcher'")
DTYPE_CHECK = (
    "            assert (\n"
    "                self.bf16 or self.fp16\n"
    "            ), 'overlap_moe_expert_parallel_comm is only supported with bf16 or fp16 model'")
LIFTED = "            pass  # lifted by megaseek: the dualpipe schedule's F&B overlap"


def _config_cls():
    return megatron_module(
        "megatron.core.transformer.transformer_config").TransformerConfig


def _lift(p: Patcher) -> None:
    cls = _config_cls()
    p.setattr(cls, "__post_init__", rewrite_function(
        cls, "__post_init__", {DISPATCHER_CHECK: LIFTED, DTYPE_CHECK: LIFTED}))


SCOPE = plugin_scope("dualpipe", "--overlap-moe-expert-parallel-comm",
                     lambda args: bool(getattr(args, "overlap_moe_expert_parallel_comm", False)))

OVERLAP_CONFIG = Fix(
    "moe-a2a-overlap-in-dualpipe",
    f"megatron/core/transformer/transformer_config.py:2682-2704 ({VERSION})",
    "TransformerConfig refuses overlap_moe_expert_parallel_comm unless the token "
    "dispatcher is alltoall/flex and the model bf16/fp16 (limits of Megatron's combined-"
    "1F1B implementation); the dualpipe schedule overlaps whole forwards and backwards on "
    "their own communicators, with any dispatcher and dtype",
    lambda: source_has(_config_cls().__post_init__, DISPATCHER_CHECK, DTYPE_CHECK),
    _lift, SCOPE)


def overlap_fixes() -> tuple[Fix, ...]:
    """What `--overlap-moe-expert-parallel-comm` needs, for the dualpipe plugin's `fixes`."""
    return (OVERLAP_CONFIG,)
