"""Put FP8 linears into a layer spec: every Megatron column-/row-parallel linear of the
transformer layer (attention projections, MLP, experts) becomes its FP8 version, and
modules of other plugins that run their own GEMMs in FP8 when given a backend (MLA's
replicated down-projections) opt in with a class attribute `accepts_fp8_backend = True`
and get `fp8_backend` and `fp8_cache_weights` in their params. Embedding, output head,
router, norms and the attention core are not in these slots, so they stay in the training
dtype, as in DeepSeek-V3."""

from __future__ import annotations

import copy
import dataclasses
import functools

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron.core.transformer.mlp import MLPSubmodules

from plugins.fp8.linear import FP8ColumnParallelLinear, FP8RowParallelLinear
from plugins.fp8.swiglu import FP8SwiGLU

FP8_VERSION = {ColumnParallelLinear: FP8ColumnParallelLinear,
               RowParallelLinear: FP8RowParallelLinear}


def _takes_fp8(module) -> bool:
    return module in FP8_VERSION or getattr(module, "accepts_fp8_backend", False)


def _convert(node, params: dict, swiglu: bool):
    if isinstance(node, type) and _takes_fp8(node):
        return ModuleSpec(module=FP8_VERSION.get(node, node), params=dict(params))
    if isinstance(node, ModuleSpec):
        if _takes_fp8(node.module):
            node.module = FP8_VERSION.get(node.module, node.module)
            node.params = {**node.params, **params}
        node.submodules = _convert(node.submodules, params, swiglu)
        return node
    if isinstance(node, functools.partial):  # e.g. Megatron's MLP.as_mlp_submodule
        return functools.partial(node.func, *(_convert(a, params, swiglu) for a in node.args),
                                 **{k: _convert(v, params, swiglu) for k, v in node.keywords.items()})
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        for field in dataclasses.fields(node):
            setattr(node, field.name, _convert(getattr(node, field.name), params, swiglu))
        if swiglu and isinstance(node, MLPSubmodules):
            node.activation_func = FP8SwiGLU
    return node


def with_fp8_linears(layer_spec: ModuleSpec, backend: str, swiglu: bool = False,
                     cache_weights: bool = False) -> ModuleSpec:
    """FP8 linears everywhere in the layer; with `swiglu`, MLPs also get the SwiGLU that
    caches its input in FP8 (Megatron routes the activation through that slot when
    `config.use_te_activation_func` is set, which the plugin does); with `cache_weights`,
    each keeps its FP8 weight through the step (`plugins.fp8.weight_cache`)."""
    params = {"fp8_backend": backend, "fp8_cache_weights": cache_weights}
    return _convert(copy.deepcopy(layer_spec), params, swiglu)


def count_fp8_linears(spec) -> int:
    """How many linear slots of a spec are FP8 (for tests and logs)."""
    if isinstance(spec, ModuleSpec):
        own = spec.params.get("fp8_backend") is not None
        return own + count_fp8_linears(spec.submodules)
    if isinstance(spec, functools.partial):
        return sum(count_fp8_linears(v) for v in (*spec.args, *spec.keywords.values()))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return sum(count_fp8_linears(getattr(spec, f.name)) for f in dataclasses.fields(spec))
    return 0
