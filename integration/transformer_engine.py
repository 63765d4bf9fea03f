"""`--transformer-impl` as megaseek's entry points take it: which modules Megatron builds.

Megatron 0.19.2's default is `transformer_engine` (Transformer Engine's modules, with its
FP8 and fused kernels). `megaseek pretrain` builds Megatron's local modules unless the flag
asks for TE (`integration.pretrain.with_defaults`, `integration.gpt.layer_specs`); the
launcher keeps the script's and Megatron's default. On both paths:
- an implementation other than `local` where Transformer Engine does not import is refused
  at start-up (`check_installed`), not replaced: Megatron would fail building the first
  layer, or with the CPU's defaults train local modules under a TE flag;
- each enabled plugin composes with TE's modules or refuses them by name
  (`plugins.TransformerEngine`, checked by the registry).
"""

from __future__ import annotations

import argparse

from plugins import TRANSFORMER_IMPL_FLAG, PluginError


def transformer_engine_imports() -> bool:
    """Whether Megatron found Transformer Engine (its own import-time answer)."""
    from megatron.core.extensions.transformer_engine import HAVE_TE

    return bool(HAVE_TE)


def check_installed(args: argparse.Namespace) -> None:
    """Start-up check: a Transformer Engine implementation needs Transformer Engine."""
    impl = getattr(args, "transformer_impl", "local")
    if impl == "local" or transformer_engine_imports():
        return
    raise PluginError(f"{TRANSFORMER_IMPL_FLAG} {impl} needs Transformer Engine, which is not "
                      f"installed here (`import transformer_engine` fails): pass "
                      f"{TRANSFORMER_IMPL_FLAG} local (Megatron's own modules)")
