"""Megatron's private names that plugin modules override or call, each with its probe.

A plugin that overrides a private method relies on more than Megatron promises: were
`ColumnParallelLinear._forward_impl` renamed, the fp8 plugin's linears would keep their
replacement under the old name and run Megatron's GEMM in the training dtype, silently.
So every such name is recorded here as a `Fix` that patches nothing (`patches_nothing`;
`megaseek fixes` lists them), whose probe reads True while the name is as the plugin module
relies on and raises `PrivateNameChanged`, naming what changed and the module to review,
when it is not. The plugin modules run their probe (`require`) where they first rely on
the name, so a changed Megatron fails at start-up rather than in a wrong run.

- `FP8_LINEARS_FORWARD_IMPL`, `DEFERRING_LINEARS_FORWARD_IMPL`: the GEMM of Megatron's
  column- and row-parallel linears, which the fp8 plugin's linears and the deferring
  linears of `--delay-wgrad-compute` replace;
- `EMA_PARAM_RANGE_MAP`: the distributed optimizer's shard of each parameter, which the
  EMA follows;
- `DUALPIPE_DEFAULT_GROUPS`: the process groups Megatron's schedules fall back on, which
  the dualpipe schedules fall back on too.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

from upstream.megatron_modules import megatron_module
from upstream.patching import Fix, Scope, patches_nothing, source_has

VERSION = "megatron-core 0.19.2"

# Recorded for every run: the probe runs where a plugin module relies on the name.
PLUGIN_MODULES = Scope("private Megatron names a plugin module relies on (probed where it "
                       "does)", lambda args: True)


class PrivateNameChanged(RuntimeError):
    """The installed Megatron changed a private name a plugin module relies on."""


def require(fix: Fix) -> None:
    """Runs `fix`'s probe: raises `PrivateNameChanged` where Megatron changed the name."""
    fix.still_needed()


def _changed(fix_name: str, module: str, what: str) -> PrivateNameChanged:
    return PrivateNameChanged(f"{what} (megaseek was written against {VERSION}); review "
                              f"{module}, which relies on it (fix {fix_name})")


def _layers():
    return megatron_module("megatron.core.tensor_parallel.layers")


# --- the linears' GEMM: `_forward_impl` ------------------------------------------------------

# The keywords Megatron's linears pass to `self._forward_impl` (layers.py:1168-1184 and
# :1459-1469): a replacement must take each of them, and says what it does with each.
COLUMN_KEYWORDS = frozenset({
    "input", "weight", "bias", "gradient_accumulation_fusion", "allreduce_dgrad",
    "sequence_parallel", "grad_output_buffer", "wgrad_deferral_limit", "tp_group",
    "gtp_remat_size"})
ROW_KEYWORDS = COLUMN_KEYWORDS - {"wgrad_deferral_limit"}
# What `_forward_impl` passes them on to, by name (layers.py:755-766); the deferring
# linears call Megatron's `_forward_impl` with these where they do not defer.
LINEAR_PARAMETERS = ("input", "weight", "bias", "gradient_accumulation_fusion",
                     "allreduce_dgrad", "sequence_parallel", "grad_output_buffer",
                     "wgrad_deferral_limit", "tp_group", "gtp_remat_size")
_OWN_SIGNATURE = "(self, input, weight, *args, **kwargs)"


def forward_impl_keywords(cls: type) -> list[frozenset[str]]:
    """The keywords of each `self._forward_impl(...)` call in `cls.forward` (a call with
    positional or unpacked arguments is refused: a replacement takes keywords)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "_forward_impl"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "self"):
            if node.args or any(k.arg is None for k in node.keywords):
                raise ValueError(f"{cls.__name__}.forward calls self._forward_impl with "
                                 "positional or unpacked arguments")
            found.append(frozenset(k.arg for k in node.keywords))
    return found


def _forward_impl_unchanged(fix_name: str, module: str, wants_parameters: bool) -> bool:
    """Megatron's column- and row-parallel linears each define `_forward_impl(self, input,
    weight, *args, **kwargs)` and call it once from `forward`, by keyword, with the
    keywords above; with `wants_parameters`, it passes them on to
    `linear_with_grad_accumulation_and_async_allreduce`'s parameters of those names."""
    layers = _layers()
    for cls, keywords in ((layers.ColumnParallelLinear, COLUMN_KEYWORDS),
                          (layers.RowParallelLinear, ROW_KEYWORDS)):
        own = vars(cls).get("_forward_impl")
        if own is None:
            raise _changed(fix_name, module, f"{cls.__name__} defines no _forward_impl")
        if str(inspect.signature(own)) != _OWN_SIGNATURE:
            raise _changed(fix_name, module, f"{cls.__name__}._forward_impl takes "
                           f"{inspect.signature(own)}, not {_OWN_SIGNATURE}")
        try:
            calls = forward_impl_keywords(cls)
        except ValueError as error:
            raise _changed(fix_name, module, str(error)) from None
        if len(calls) != 1:
            raise _changed(fix_name, module, f"{cls.__name__}.forward calls "
                           f"self._forward_impl {len(calls)} times, not once")
        if calls[0] != keywords:
            raise _changed(fix_name, module, f"{cls.__name__}.forward passes "
                           f"_forward_impl {sorted(calls[0])}, not {sorted(keywords)}")
    if wants_parameters:
        given = tuple(inspect.signature(
            layers.linear_with_grad_accumulation_and_async_allreduce).parameters)
        if given != LINEAR_PARAMETERS:
            raise _changed(fix_name, module, "linear_with_grad_accumulation_and_async_"
                           f"allreduce takes {given}, not {LINEAR_PARAMETERS}")
    return True


_LAYERS_PLACE = ("megatron/core/tensor_parallel/layers.py:1094,1168-1184 "
                 "(ColumnParallelLinear._forward_impl), :1424,1459-1469 "
                 "(RowParallelLinear._forward_impl)")

FP8_LINEARS_FORWARD_IMPL = Fix(
    "private:fp8-linears-forward-impl",
    f"{_LAYERS_PLACE} ({VERSION})",
    "plugins/fp8/modules.py replaces each FP8 linear's _forward_impl (the GEMM Megatron's "
    "forward calls between its own communication) with the FP8 GEMM; it honours input, "
    "weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel and "
    "tp_group, and takes the other keywords Megatron passes without using them",
    lambda: _forward_impl_unchanged("private:fp8-linears-forward-impl",
                                    "plugins/fp8/modules.py", wants_parameters=False),
    patches_nothing, PLUGIN_MODULES)

DEFERRING_LINEARS_FORWARD_IMPL = Fix(
    "private:deferring-linears-forward-impl",
    f"{_LAYERS_PLACE}; :755-766 (linear_with_grad_accumulation_and_async_allreduce) "
    f"({VERSION})",
    "plugins/common/parallel_linear.py overrides _forward_impl in its deferring column- and "
    "row-parallel linears (--delay-wgrad-compute): the weight gradient's GEMM is handed to "
    "the W; where nothing defers, Megatron's _forward_impl runs with every keyword passed on",
    lambda: _forward_impl_unchanged("private:deferring-linears-forward-impl",
                                    "plugins/common/parallel_linear.py", wants_parameters=True),
    patches_nothing, PLUGIN_MODULES)


# --- the distributed optimizer's shards: `_get_model_param_range_map` -------------------------

def _param_range_map_unchanged() -> bool:
    name, module = "private:ema-param-range-map", "plugins/ema/ema.py"
    distributed = megatron_module("megatron.core.optimizer.distrib_optimizer")
    optimizer = distributed.DistributedOptimizer
    method = vars(optimizer).get("_get_model_param_range_map")
    if method is None:
        raise _changed(name, module, "DistributedOptimizer has no _get_model_param_range_map")
    if tuple(inspect.signature(method).parameters) != ("self", "param"):
        raise _changed(name, module, "DistributedOptimizer._get_model_param_range_map takes "
                       f"{inspect.signature(method)}, not (self, param)")
    if not (source_has(method, 'gbuf_range_map["param_map"][param]')
            and source_has(optimizer._build_model_gbuf_param_range_map,
                           '"param": sub_param_range')):
        raise _changed(name, module, "DistributedOptimizer._get_model_param_range_map(param) "
                       "no longer returns the param_map entry whose 'param' is the range of "
                       "the parameter this rank owns")
    return True


EMA_PARAM_RANGE_MAP = Fix(
    "private:ema-param-range-map",
    f"megatron/core/optimizer/distrib_optimizer.py:786-794 "
    f"(DistributedOptimizer._get_model_param_range_map), :190-195 ({VERSION})",
    "plugins/ema/ema.py (owned_shards) calls the distributed optimizer's "
    "_get_model_param_range_map(param)['param'] for the range of each parameter this rank's "
    "FP32 main shard holds, and tells a distributed optimizer by that method; Megatron has "
    "no public accessor for it",
    _param_range_map_unchanged, patches_nothing, PLUGIN_MODULES)


# --- the schedules' default process groups: `_build_default_pg_collection` --------------------

def _default_groups_unchanged() -> bool:
    name, module = "private:dualpipe-default-groups", "plugins/dualpipe/schedule.py"
    schedules = megatron_module("megatron.core.pipeline_parallel.schedules")
    build = getattr(schedules, "_build_default_pg_collection", None)
    if build is None:
        raise _changed(name, module, "megatron.core.pipeline_parallel.schedules has no "
                       "_build_default_pg_collection")
    if inspect.signature(build).parameters:
        raise _changed(name, module, "schedules._build_default_pg_collection takes "
                       f"{inspect.signature(build)}, not ()")
    if not source_has(schedules.forward_backward_pipelining_with_interleaving,
                      "pg_collection = _build_default_pg_collection()"):
        raise _changed(name, module, "Megatron's interleaved schedule no longer falls back "
                       "on schedules._build_default_pg_collection() without pg_collection")
    return True


DUALPIPE_DEFAULT_GROUPS = Fix(
    "private:dualpipe-default-groups",
    f"megatron/core/pipeline_parallel/schedules.py:672 (_build_default_pg_collection), "
    f":1028 ({VERSION})",
    "plugins/dualpipe/schedule.py calls schedules._build_default_pg_collection() when "
    "Megatron's loop passes no pg_collection, as Megatron's own schedules do",
    _default_groups_unchanged, patches_nothing, PLUGIN_MODULES)


FIXES: tuple[Fix, ...] = (FP8_LINEARS_FORWARD_IMPL, DEFERRING_LINEARS_FORWARD_IMPL,
                          EMA_PARAM_RANGE_MAP, DUALPIPE_DEFAULT_GROUPS)
