"""Megatron flags that a plugin's modules do not read, refused by name at start-up."""

from __future__ import annotations

import argparse
from typing import Any, Iterable, NamedTuple

# (argparse dest, flag, the values the plugin honours (Megatron's default first), why any
# other value is refused)
Refusal = tuple[str, str, tuple[Any, ...], str]


def recompute_granularity(args) -> str | None:
    """--recompute-granularity as Megatron's validation sets it: --recompute-activations
    is its spelling of 'selective' (arguments.py:589). The run plan is made before."""
    if getattr(args, "recompute_activations", False):
        return "selective"
    return getattr(args, "recompute_granularity", None)


def first_refused(args: argparse.Namespace, refusals: Iterable[Refusal]) -> str | None:
    """The error message for the first flag given a value the plugin does not honour
    (flags another enabled plugin implements, `Plugin.honours`, are that plugin's: the
    start-up check's `plugins.StartUpArguments` says which)."""
    elsewhere = getattr(args, "honoured_by_plugins", frozenset())
    for dest, flag, honoured, why in refusals:
        if dest in elsewhere:
            continue
        value = getattr(args, dest)
        if value not in honoured:
            shown = getattr(value, "name", value)  # an enum's value as its flag spells it
            given = flag if isinstance(value, bool) else f"{flag} {shown}"
            return f"{given} is not supported: {why}"
    return None


class WeightShardsPastTP(NamedTuple):
    """A flag that shards each weight over more ranks than its tensor-parallel group (GTP):
    Megatron's linears gather such a weight back inside their GEMM (the `_forward_impl`
    keyword gtp_remat_size, tensor_parallel/layers.py:517, megatron-core 0.19.2)."""

    flag: str  # --tensor-parallel-num-weight-shards or its expert twin
    shards: int
    ranks: int  # the tensor-parallel size the shards exceed
    ranks_flag: str


# Megatron's GTP flags: (the shards flag, its dest, the tensor-parallel size's dest and flag)
_WEIGHT_SHARDS = (
    ("--tensor-parallel-num-weight-shards", "tensor_parallel_num_weight_shards",
     "tensor_model_parallel_size", "--tensor-model-parallel-size"),
    ("--expert-tensor-parallel-num-weight-shards", "expert_tensor_parallel_num_weight_shards",
     "expert_tensor_parallel_size", "--expert-tensor-parallel-size"),
)
# (the shards flag, the flag of the tensor-parallel size it must not exceed)
WEIGHT_SHARD_FLAGS = tuple((flag, ranks_flag) for flag, _, _, ranks_flag in _WEIGHT_SHARDS)


def weights_sharded_past_tp(args: argparse.Namespace) -> WeightShardsPastTP | None:
    """The first GTP weight sharding the flags ask for, or None. Read before Megatron
    validates the arguments: an unset expert tensor-parallel size is the tensor-parallel
    size, as Megatron defaults it."""
    for flag, dest, ranks_dest, ranks_flag in _WEIGHT_SHARDS:
        shards = getattr(args, dest, None)
        ranks = getattr(args, ranks_dest, None) or args.tensor_model_parallel_size
        if shards is not None and shards > ranks:
            return WeightShardsPastTP(flag, shards, ranks, ranks_flag)
    return None
