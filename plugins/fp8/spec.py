"""Put FP8 into a finished layer spec by mapping module classes: every linear slot of the
layer becomes its FP8 version (`FP8_VERSION`, classes of `plugins.fp8.modules`), whichever
plugin put the slot there, and with SwiGLU the MLPs' activation slot becomes `FP8SwiGLU`.
Each FP8 module gets `fp8_backend` and `fp8_cache_weights` in its params. Embedding, output
head, router, norms and the attention core are not in these slots, so they stay in the
training dtype, as in DeepSeek-V3; so does every slot named in `exclude`
(`--fp8-exclude-modules`), with everything under it."""

from __future__ import annotations

import copy
import dataclasses
import functools

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from plugins.common.experts import LocalExperts
from plugins.common.linear import ReplicatedLinear
from plugins.common.parallel_linear import DEFERRING_VERSION
from plugins.fp8.modules import (
    FP8ColumnParallelLinear,
    FP8LocalExperts,
    FP8ReplicatedLinear,
    FP8RowParallelLinear,
)
from plugins.fp8.slots import EXCLUDABLE
from plugins.fp8.swiglu import FP8SwiGLU, SwiGLU

FP8_VERSION = {
    ColumnParallelLinear: FP8ColumnParallelLinear,  # Megatron's: attention, MLP, experts
    RowParallelLinear: FP8RowParallelLinear,
    ReplicatedLinear: FP8ReplicatedLinear,          # MLA's down-projections
    LocalExperts: FP8LocalExperts,                  # the moe plugin's routed experts
    # Megatron's linears as `--delay-wgrad-compute` maps them (whichever transform runs
    # first): the FP8 versions defer by themselves.
    DEFERRING_VERSION[ColumnParallelLinear]: FP8ColumnParallelLinear,
    DEFERRING_VERSION[RowParallelLinear]: FP8RowParallelLinear,
}


def _convert(node, params: dict, swiglu: bool, exclude: frozenset[str]):
    def convert(child):
        return _convert(child, params, swiglu, exclude)

    if isinstance(node, type) and node in FP8_VERSION:
        return ModuleSpec(module=FP8_VERSION[node], params=dict(params))
    if isinstance(node, ModuleSpec):
        if node.module in FP8_VERSION:
            node.module = FP8_VERSION[node.module]
            node.params = {**node.params, **params}
        node.submodules = convert(node.submodules)
        return node
    if isinstance(node, functools.partial):  # e.g. Megatron's MLP.as_mlp_submodule
        return functools.partial(node.func, *(convert(a) for a in node.args),
                                 **{k: convert(v) for k, v in node.keywords.items()})
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        for field in dataclasses.fields(node):
            if field.name not in exclude:
                setattr(node, field.name, convert(getattr(node, field.name)))
        if swiglu and isinstance(node, MLPSubmodules):
            # Megatron's local spec leaves this slot empty (the MLP then applies
            # config.activation_func); with config.use_te_activation_func, which the plugin
            # sets, the MLP calls the module here instead: one that caches its input in
            # FP8, or in an MLP with an excluded projection the plain SwiGLU.
            kept = exclude & {"linear_fc1", "linear_fc2"}
            node.activation_func = SwiGLU if kept else FP8SwiGLU
    return node


def with_fp8_linears(layer_spec: ModuleSpec, backend: str, swiglu: bool = False,
                     cache_weights: bool = False, exclude: tuple[str, ...] = ()) -> ModuleSpec:
    """FP8 linears everywhere in the layer but under the slots named in `exclude` (of
    `EXCLUDABLE`); with `swiglu`, MLPs also get the SwiGLU that caches its input in FP8;
    with `cache_weights`, each FP8 module keeps its FP8 weights through the step
    (`plugins.fp8.weight_cache`)."""
    unknown = sorted(set(exclude) - set(EXCLUDABLE))
    if unknown:
        raise ValueError(f"--fp8-exclude-modules {' '.join(unknown)}: unknown; choose from "
                         f"{', '.join(EXCLUDABLE)}")
    params = {"fp8_backend": backend, "fp8_cache_weights": cache_weights}
    return _convert(copy.deepcopy(layer_spec), params, swiglu, frozenset(exclude))


FP8_MODULES = frozenset(FP8_VERSION.values())


def count_fp8_linears(spec) -> int:
    """How many linear slots of a spec hold an FP8 module (for tests and logs)."""
    if isinstance(spec, ModuleSpec):
        return (spec.module in FP8_MODULES) + count_fp8_linears(spec.submodules)
    if isinstance(spec, functools.partial):
        return sum(count_fp8_linears(v) for v in (*spec.args, *spec.keywords.values()))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return sum(count_fp8_linears(getattr(spec, f.name)) for f in dataclasses.fields(spec))
    return 0
