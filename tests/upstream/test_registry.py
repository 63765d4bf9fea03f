"""`upstream.registry.all_fixes()`: every change megaseek makes to upstream code, listed
once, each with its scope, its upstream place and a probe; nothing patches upstream from
outside `upstream/`; each conditional fix applies only where its scope holds.

The probes are asserted True here: when an upgrade of megatron-core (or Python) makes a
fix unnecessary, its test fails and the fix can go.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import inspect
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import integration  # noqa: F401  (megatron.training on Python 3.11)
import upstream
from tests.helpers import paths
from upstream import compat, cpu, transformer
from upstream.patching import EVERY_MACHINE, Fix, Patcher, apply_fixes
from upstream.registry import all_fixes

VERSION = "megatron-core 0.19.2"
REPO = paths.REPO
ALL = all_fixes()


def _assert_nothing_installed():
    training = importlib.import_module("megatron.training.training")
    assert training.torch is torch, "upstream.cpu is installed: some test did not undo it"


# --- the probes ----------------------------------------------------------------------------

def test_installed_megatron_core_is_the_version_the_fixes_name():
    assert importlib.metadata.version("megatron-core") == "0.19.2"


@pytest.mark.parametrize("fix", ALL, ids=[f.name for f in ALL])
def test_fix_still_needed(fix):
    _assert_nothing_installed()
    assert fix.still_needed() is True


def test_fix_names_are_unique():
    names = [f.name for f in ALL]
    assert len(names) == len(set(names))


def _megatron_root() -> Path:
    """The folder that holds the `megatron` package (a namespace package: no __file__)."""
    core = importlib.import_module("megatron.core")
    return Path(core.__file__).parent.parent.parent


_PY_REFERENCE = re.compile(r"([\w/.]+\.py)(?::([\d,\- ]+))?")
_FILES: list[Path] = []


def _megatron_files() -> list[Path]:
    if not _FILES:
        _FILES.extend((_megatron_root() / "megatron").rglob("*.py"))
    return _FILES


def _candidates(path: str) -> list[Path]:
    root = _megatron_root()
    if path.startswith(("megatron/", "torch/")):
        return [root / path] if (root / path).is_file() else []
    # relative to a module's folder, e.g. "training.py", "models/gpt.py"
    return [p for p in _megatron_files() if p.as_posix().endswith("/" + path)]


@pytest.mark.parametrize("fix", ALL, ids=[f.name for f in ALL])
def test_fix_names_its_upstream_place(fix):
    assert fix.reason.strip() and fix.scope.label.strip()
    references = _PY_REFERENCE.findall(fix.upstream)
    assert references, f"{fix.name}: no file named in {fix.upstream!r}"
    # The fixes of Megatron-LM's launch scripts name that repository's release; the
    # others the installed megatron-core (and its files).
    if "Megatron-LM" in fix.upstream:
        references = [r for r in references if _candidates(r[0])]
    else:
        assert VERSION in fix.upstream, fix.upstream
    for path, lines in references:
        candidates = _candidates(path)
        assert candidates, f"{fix.name}: {path} is not a file of the installed megatron/torch"
        numbers = [int(n) for n in re.findall(r"\d+", lines or "")]
        if numbers and len(candidates) == 1:
            length = len(candidates[0].read_text().splitlines())
            assert max(numbers) <= length, f"{fix.name}: {path} has only {length} lines"


# --- one registry: every Fix of the project is in it ---------------------------------------

def _project_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def _calls(tree: ast.AST, name: str) -> list[int]:
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call) and (
        getattr(node.func, "id", None) == name or getattr(node.func, "attr", None) == name)]


def test_fixes_are_defined_in_upstream_only():
    """No `Fix` record and no rewrite of upstream code outside `upstream/`."""
    found = []
    for path in _project_files("plugins", "integration", "bench"):
        tree = ast.parse(path.read_text())
        for name in ("Fix", "rewrite_function"):
            found += [f"{path.relative_to(REPO)}:{line} {name}(" for line in _calls(tree, name)]
    assert not found, found


def test_plugins_and_bench_patch_nothing():
    """Plugins get their upstream changes applied through their `fixes` hook; they and the
    benchmarks hold no Patcher of their own."""
    found = []
    for path in _project_files("plugins", "bench"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "upstream.patching":
                found += [f"{path.relative_to(REPO)}:{node.lineno} imports {a.name}"
                          for a in node.names if a.name in ("Patcher", "rewrite_function")]
        found += [f"{path.relative_to(REPO)}:{line} Patcher()" for line in _calls(tree, "Patcher")]
    assert not found, found


def _module_level_fixes(module) -> list[Fix]:
    found = []
    for value in vars(module).values():
        if isinstance(value, Fix):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            found += [v for v in value if isinstance(v, Fix)]
    return found


def _everything_on() -> argparse.Namespace:
    """Arguments under which every plugin-scoped fix applies."""
    return argparse.Namespace(
        plugins=["mla", "moe", "fp8", "dualpipe"], num_experts=4,
        recompute_granularity="selective",
        recompute_modules=["layernorm", "mla_up_proj", "moe_act", "mlp"],
        exp_avg_dtype="bf16", exp_avg_sq_dtype="bf16", use_precision_aware_optimizer=False,
        delay_wgrad_compute=True, transformer_impl="local")


def test_all_fixes_lists_every_fix_defined_in_the_project():
    listed = {f.name for f in ALL}
    defined = {}
    for info in pkgutil.iter_modules(upstream.__path__, "upstream."):
        for fix in _module_level_fixes(importlib.import_module(info.name)):
            defined[fix.name] = info.name
    from plugins import builtin_plugins

    from plugins.config import read

    for plugin in builtin_plugins():
        if plugin.fixes is not None:
            fixes = list(plugin.fixes(read(plugin.config, _everything_on())))
            assert fixes, f"plugin {plugin.name}: its fixes hook returns nothing"
            defined.update({fix.name: f"plugin {plugin.name}" for fix in fixes})
    missing = {name: where for name, where in defined.items() if name not in listed}
    assert not missing, f"defined but not in upstream.registry.all_fixes(): {missing}"


def test_upstream_reaches_megatron_through_one_accessor():
    """Every module under upstream/ imports Megatron's modules through
    `upstream.megatron_modules`, none with an importlib helper of its own."""
    found = []
    for path in sorted((REPO / "upstream").rglob("*.py")):
        if path.name == "megatron_modules.py":
            continue
        tree = ast.parse(path.read_text())
        found += [f"{path.relative_to(REPO)}:{line} import_module(" for line in
                  _calls(tree, "import_module")]
        found += [f"{path.relative_to(REPO)}:{node.lineno} def {node.name}" for node in
                  ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == "_module"]
    assert not found, found


def test_each_seam_module_is_small():
    sizes = {path.name: len(path.read_text().splitlines())
             for path in (REPO / "upstream" / "seams").glob("*.py")}
    assert {"arguments.py", "model.py", "loop.py", "placement.py", "checkpoint_state.py",
            "evaluation.py", "errors.py"} <= set(sizes)
    assert max(sizes.values()) <= 300, sizes


def test_gpt_model_init_is_wrapped_once_whatever_seams_shape_the_model(patcher):
    """The spec seam and the placement seam both attach to GPTModel's construction: one
    wrapper runs both steps, in the order they were attached, and undoing them restores
    Megatron's own __init__."""
    from megatron.core.models.gpt import GPTModel

    from upstream.seams.model import model_specs, plugin_specs_in_place
    from upstream.seams.placement import Placement, pipeline_placement

    megatrons = GPTModel.__init__
    model_specs(lambda spec: spec).apply(patcher)
    pipeline_placement(Placement(1, 1, lambda rank, chunk: 0)).apply(patcher)
    assert GPTModel.__init__.__wrapped__ is megatrons
    assert [step.name for step in GPTModel.__init__.megaseek_build_steps] == [
        "plugin specs", "pipeline placement"]
    assert plugin_specs_in_place()
    patcher.undo()
    assert GPTModel.__init__ is megatrons and not plugin_specs_in_place()


def test_the_spec_seam_sees_the_mtp_block_spec_however_it_is_passed():
    """Issue 25: the release pretrain_gpt.py under DualPipeV built its MTP layer with
    Megatron's own MLA, because a wrapper that rebound GPTModel's arguments passed
    `mtp_block_spec` positionally and the spec seam looked for it among the keywords
    only. The one wrapper binds the arguments by name: every build step sees the MTP
    block spec, passed by keyword (Megatron's GPT builder) or by position."""
    from megatron.core.models.gpt import GPTModel

    from upstream.seams.model import model_specs
    from upstream.seams.placement import Placement, pipeline_placement

    class Built(Exception):
        """Stops the construction once the specs have been seen."""

    seen: list = []

    def transform(spec):
        seen.append(spec)
        if spec == "layer":  # the layer spec comes after the MTP block spec
            raise Built
        return spec

    positions = list(inspect.signature(GPTModel.__init__).parameters)[1:]
    by_position = [None] * positions.index("mtp_block_spec") + ["mtp"]  # every argument
    by_position[positions.index("transformer_layer_spec")] = "layer"
    patcher = Patcher()
    try:
        model_specs(transform).apply(patcher)
        pipeline_placement(Placement(1, 1, lambda rank, chunk: 0)).apply(patcher)
        for args, kwargs in ((by_position, {}),
                             ([None, "layer", 128, 64], {"mtp_block_spec": "mtp"})):
            seen.clear()
            with pytest.raises(Built):
                GPTModel.__init__(object.__new__(GPTModel), *args, **kwargs)
            assert seen == ["mtp", "layer"]
    finally:
        patcher.undo()


def test_megaseek_fixes_prints_every_fix_with_scope_place_and_state(capsys):
    from integration.cli import main

    main(["fixes"])
    out = capsys.readouterr().out
    for fix in ALL:
        line = next((line for line in out.splitlines() if line.startswith(fix.name + " ")), None)
        assert line is not None, f"{fix.name} not listed"
        assert line.split()[-1] == "needed", line
        assert fix.upstream in out
    for scope in {f.scope.label for f in ALL}:
        assert f"# {scope}\n" in out
    assert f"{len(ALL)} upstream changes; {len(ALL)} still needed" in out


# --- scopes: each conditional fix applies only where its condition holds --------------------

def test_machine_scopes_hold_before_arguments_are_parsed():
    assert EVERY_MACHINE.holds(None)
    assert all(f.applies(None) for f in compat.FIXES)
    assert all(f.applies(None) for f in cpu.FIXES)  # this machine has no CUDA
    assert not any(f.applies(None) for f in transformer.FIXES)  # those read flags


def _args(**overrides) -> argparse.Namespace:
    args = dict(plugins=[], num_experts=None, recompute_granularity=None,
                recompute_modules=None, exp_avg_dtype="fp32", exp_avg_sq_dtype="fp32",
                use_precision_aware_optimizer=False, delay_wgrad_compute=False,
                transformer_impl="local")
    args.update(overrides)
    return argparse.Namespace(**args)


def _names(fixes) -> list[str]:
    return [fix.name for fix in fixes]


LAYERNORM = dict(recompute_granularity="selective", recompute_modules=["layernorm"])


@pytest.mark.parametrize("args, expected", [
    (_args(), []),
    (_args(num_experts=4, **LAYERNORM), []),  # the flags without --plugins fp8 / mla
    (_args(plugins=["fp8"]), []),
    (_args(plugins=["fp8"], num_experts=4), ["fp8-moe-without-te"]),
    (_args(plugins=["fp8"], **LAYERNORM), ["fp8-norm-recompute-without-te"]),
    (_args(plugins=["fp8"], recompute_granularity="full", recompute_modules=["layernorm"]),
     ["fp8-recompute-without-te"]),
    (_args(plugins=["fp8"], recompute_granularity="selective", recompute_modules=["mlp"]),
     ["fp8-recompute-without-te"]),
    (_args(plugins=["fp8"], recompute_granularity="selective", recompute_modules=["moe_act"]),
     ["fp8-norm-recompute-without-te"]),
    (_args(plugins=["mla"], **LAYERNORM), ["mla-own-layernorm-recompute"]),
    (_args(plugins=["mla", "fp8"], num_experts=4, **LAYERNORM),
     ["fp8-moe-without-te", "fp8-norm-recompute-without-te", "mla-own-layernorm-recompute"]),
    (_args(exp_avg_dtype="bf16"), ["bf16-moments-adam-class", "bf16-moments-config-check"]),
    (_args(exp_avg_sq_dtype=torch.bfloat16),
     ["bf16-moments-adam-class", "bf16-moments-config-check"]),
    (_args(exp_avg_dtype="bf16", use_precision_aware_optimizer=True), []),  # TE's own
    (_args(plugins=["dualpipe"], delay_wgrad_compute=True),
     ["delay-wgrad-without-combined-1f1b"]),
    (_args(delay_wgrad_compute=True), []),  # without the plugin: refused at start-up
    (_args(plugins=["dualpipe"], delay_wgrad_compute=True,
           transformer_impl="transformer_engine"), []),  # TE's own deferral
], ids=["nothing", "flags-without-plugins", "fp8-dense", "fp8-moe", "fp8-layernorm",
        "fp8-full-recompute", "fp8-mlp-recompute", "fp8-moe-act", "mla-layernorm", "mla-fp8-moe-layernorm",
        "bf16-exp-avg", "bf16-exp-avg-sq", "precision-aware", "dualpipe-wgrad",
        "wgrad-without-dualpipe", "wgrad-with-te"])
def test_conditional_fixes_apply_only_where_their_scope_holds(args, expected):
    """The fixes a run's plugins offer (each from its `fixes` hook, with its config) where
    their scopes hold: a plugin's fixes only while it is enabled."""
    from plugins import builtin_plugins
    from plugins.config import read

    applied = []
    for plugin in builtin_plugins():
        enabled = plugin.name in args.plugins or (plugin.enabled_by is not None
                                                  and plugin.enabled_by(args))
        if enabled and plugin.fixes is not None:
            applied += plugin.fixes(read(plugin.config, args))
    conditional = {f.name for f in ALL if f.scope.label not in (
        EVERY_MACHINE.label, cpu.CPU_ONLY.label, compat.PYTHON_BEFORE_3_12.label)
        and not f.name.startswith(("seam:", "cpu-launch"))}
    assert set(_names(applied)) <= conditional
    assert sorted(_names(applied)) == sorted(expected)


def _post_init():
    from megatron.core.transformer.transformer_config import TransformerConfig

    return vars(TransformerConfig)["__post_init__"]


def _fp8_config(**kwargs):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=128, num_attention_heads=4, fp8="e4m3",
                             fp8_recipe="blockwise", **kwargs)


@pytest.mark.parametrize("plugins", [[], ["fp8"]], ids=["without-fp8", "with-fp8"])
def test_enabled_plugins_apply_their_fixes_only_with_their_flags(plugins, monkeypatch, patcher):
    """As the launch path does: each enabled plugin's fixes, applied where still needed.
    Without --plugins fp8 Megatron keeps its checks; with it, both TE checks are lifted
    (two rewrites of one function, composed) and Megatron's config builds."""
    from tests.helpers.plugin_args import enabled

    argv = ["--num-layers", "2", "--hidden-size", "256", "--num-attention-heads", "4",
            "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "2",
            "--transformer-impl", "local", "--no-gradient-accumulation-fusion",
            "--num-experts", "4", "--recompute-granularity", "selective",
            # (layernorm alone needs --plugins mla, moe_act --plugins moe)
            "--recompute-modules", "moe_act", "--plugins", "moe", *plugins,
            "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
            "--moe-router-load-balancing-type", "none"]
    if plugins:
        argv += ["--fp8-format", "e4m3", "--fp8-recipe", "blockwise"]
    args, enabled_plugins = enabled(argv, monkeypatch)
    assert [p.name for p in enabled_plugins] == ["moe", *plugins]
    fp8_plugins = [p for p in enabled_plugins if p.name == "fp8"]  # (moe's: tests/plugins/moe/)
    upstream_post_init = _post_init()
    for plugin in fp8_plugins:
        apply_fixes(plugin.fixes(), patcher)
    if "fp8" in plugins:
        assert patcher.changes == 2
        _fp8_config(num_moe_experts=4, **LAYERNORM)  # builds
        assert not any(fix.still_needed() for fix in fp8_plugins[0].fixes())
    else:
        assert patcher.changes == 0 and _post_init() is upstream_post_init
        with pytest.raises(ValueError, match="transformer-engine"):
            _fp8_config(num_moe_experts=4, **LAYERNORM)
    patcher.undo()
    assert _post_init() is upstream_post_init


def test_megatron_refuses_fp8_moe_and_norm_recompute_without_te():
    """What the two fp8 fixes lift, each on its own."""
    _assert_nothing_installed()
    with pytest.raises(ValueError, match="supports MoE FP8 training"):
        _fp8_config(num_moe_experts=4)
    with pytest.raises(ValueError, match="layernorm recompute for fp8 needs"):
        _fp8_config(**LAYERNORM)


def test_megatron_layernorm_recompute_needs_te_on_cpu():
    """What the mla plugin works around (and patches nothing for): Megatron's own
    'layernorm' recompute reaches for Transformer Engine even without FP8."""
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    patcher = cpu.install()
    try:
        with pytest.raises(NameError, match="FP8GlobalStateManager"):
            random.CheckpointWithoutOutput().checkpoint(torch.nn.functional.relu,
                                                        torch.ones(2, requires_grad=True))
        recorded = Patcher()
        transformer.MLA_LAYERNORM_RECOMPUTE.apply(recorded)
        assert recorded.changes == 0
    finally:
        if patcher is not None:
            patcher.undo()


def test_typing_override_is_applied_once_at_import():
    import typing

    import typing_extensions

    assert typing.override is typing_extensions.override
    assert apply_fixes([compat.TYPING_OVERRIDE], Patcher()).changes == 0


# --- Megatron's private names that plugin modules rely on ---------------------------------

def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _megatron_private_names() -> set[str]:
    """Every private name megatron's sources define: functions, methods, assignments."""
    defined = re.compile(r"(?:def |self\.|^)(_[A-Za-z]\w*)\s*(?:\(|=[^=])", re.MULTILINE)
    return {name for path in _megatron_files() for name in defined.findall(path.read_text())
            if _private(name)}


def _project_names() -> set[str]:
    """The names megaseek defines itself (any private name it may read of its own)."""
    names = set()
    for path in _project_files("plugins", "integration", "upstream"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return names


def _root(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _megatron_bases(path: Path) -> dict[str, set[str]]:
    """Per class of a plugin module whose bases include a Megatron class: the private
    names those Megatron classes define (what the class can override)."""
    parts = path.relative_to(REPO).with_suffix("").parts
    module = importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    found = {}
    for cls in vars(module).values():
        if isinstance(cls, type) and cls.__module__ == module.__name__:
            names = {name for base in cls.__mro__ if base.__module__.startswith("megatron.")
                     for name in vars(base) if _private(name)}
            if names:
                found[cls.__name__] = names
    return found


def _private_megatron_uses() -> set[tuple[str, str]]:
    """(plugin file, private Megatron name) for every private name of a Megatron class a
    plugin class overrides (a method of its own, or `self._name = ...`), and every
    private name a plugin module reads from something not its own: `x._name`, or
    `hasattr`/`getattr(x, "_name")` (torch's own private functions, `torch._...`, are
    torch's and not counted)."""
    megatron, ours = _megatron_private_names(), _project_names()
    uses = set()
    for path in _project_files("plugins"):
        where = path.relative_to(REPO).as_posix()
        tree = ast.parse(path.read_text())
        bases = _megatron_bases(path)
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name in bases):
            for node in ast.walk(cls):
                if isinstance(node, ast.FunctionDef) and node.name in bases[cls.name]:
                    uses.add((where, node.name))
                elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                        and _root(node) == "self" and node.attr in bases[cls.name]):
                    uses.add((where, node.attr))
        for node in ast.walk(tree):
            read = None
            if isinstance(node, ast.Attribute) and _private(node.attr) and _root(node) != "torch":
                read = node.attr
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
                    "hasattr", "getattr") and len(node.args) >= 2
                    and isinstance(node.args[1], ast.Constant)
                    and _private(str(node.args[1].value))):
                read = node.args[1].value
            if read is not None and read in megatron and read not in ours:
                uses.add((where, read))
    return uses


def test_every_private_megatron_name_a_plugin_relies_on_has_a_probe():
    """Each private Megatron name a plugin overrides or reads is named (its upstream
    place) by a `private:` record whose reason names the plugin file: its probe says when
    Megatron changes it."""
    from upstream import private_names

    uses = _private_megatron_uses()
    # The scan sees each kind of use: a method set on the instance, a method of the class,
    # a function of a Megatron module, a method of an object the plugin is handed.
    assert {("plugins/fp8/modules.py", "_forward_impl"),
            ("plugins/common/parallel_linear.py", "_forward_impl"),
            ("plugins/dualpipe/schedule.py", "_build_default_pg_collection"),
            ("plugins/ema/ema.py", "_get_model_param_range_map")} <= uses
    records = [f for f in ALL if f.name.startswith("private:")]
    assert set(records) == set(private_names.FIXES)
    uncovered = sorted((where, name) for where, name in uses if not any(
        where in f.reason and name in f.upstream for f in records))
    assert not uncovered, f"private Megatron names without a probe: {uncovered}"


def _calls_forward_impl_with_a_new_keyword(self, input_):
    return self._forward_impl(input=input_, weight=self.weight, bias=None,
                              gradient_accumulation_fusion=False, allreduce_dgrad=False,
                              sequence_parallel=False, grad_output_buffer=None,
                              wgrad_deferral_limit=None, tp_group=None, gtp_remat_size=1,
                              fp4_recipe=None)


def _linear_with_a_new_parameter(input, weight, bias, gradient_accumulation_fusion,
                                 allreduce_dgrad, sequence_parallel, grad_output_buffer=None,
                                 wgrad_deferral_limit=0, tp_group=None, gtp_remat_size=1,
                                 fp4_recipe=None):
    raise AssertionError("never called")


def _megatron_changes(change: str, monkeypatch) -> None:
    """What a later Megatron might do to each private name (undone after the test)."""
    layers = importlib.import_module("megatron.core.tensor_parallel.layers")
    if change == "forward-impl-renamed":
        monkeypatch.delattr(layers.RowParallelLinear, "_forward_impl")
    elif change == "forward-impl-new-keyword":
        monkeypatch.setattr(layers.ColumnParallelLinear, "forward",
                            _calls_forward_impl_with_a_new_keyword)
    elif change == "linear-new-parameter":
        monkeypatch.setattr(layers, "linear_with_grad_accumulation_and_async_allreduce",
                            _linear_with_a_new_parameter)
    elif change == "param-range-map-renamed":
        distributed = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
        monkeypatch.delattr(distributed.DistributedOptimizer, "_get_model_param_range_map")
    elif change == "default-groups-renamed":
        schedules = importlib.import_module("megatron.core.pipeline_parallel.schedules")
        monkeypatch.delattr(schedules, "_build_default_pg_collection")


@pytest.mark.parametrize("fix_name, change, message", [
    ("private:fp8-linears-forward-impl", "forward-impl-renamed",
     "RowParallelLinear defines no _forward_impl"),
    ("private:fp8-linears-forward-impl", "forward-impl-new-keyword",
     r"ColumnParallelLinear.forward passes _forward_impl \[.*'fp4_recipe'"),
    ("private:deferring-linears-forward-impl", "forward-impl-renamed",
     "RowParallelLinear defines no _forward_impl"),
    ("private:deferring-linears-forward-impl", "linear-new-parameter",
     "linear_with_grad_accumulation_and_async_allreduce takes .*'fp4_recipe'"),
    ("private:ema-param-range-map", "param-range-map-renamed",
     "DistributedOptimizer has no _get_model_param_range_map"),
    ("private:dualpipe-default-groups", "default-groups-renamed",
     "schedules has no _build_default_pg_collection"),
])
def test_private_name_probe_fails_loudly_when_megatron_changes_it(fix_name, change, message,
                                                                   monkeypatch):
    from upstream.private_names import PrivateNameChanged, require

    fix = next(f for f in ALL if f.name == fix_name)
    assert fix.still_needed() is True
    module = re.search(r"plugins/\S+\.py", fix.reason).group(0)
    _megatron_changes(change, monkeypatch)
    with pytest.raises(PrivateNameChanged, match=message) as raised:
        require(fix)
    assert f"review {module}" in str(raised.value) and fix_name in str(raised.value)
    # The probes of other private names still hold.
    for other in ALL:
        if other.name.startswith("private:") and other.upstream.split()[0] != fix.upstream.split()[0]:
            assert other.still_needed() is True


def test_plugin_modules_run_their_probe_before_relying_on_the_name(monkeypatch):
    """The EMA probes before it reads the optimizer's shards, the dualpipe schedule before
    it falls back on Megatron's groups; the linears' modules at import
    (test_private_linears_refuse_to_import_on_a_changed_megatron)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from plugins.dualpipe.schedule import Settings, Step
    from plugins.ema.ema import owned_shards
    from upstream.private_names import PrivateNameChanged

    _megatron_changes("param-range-map-renamed", monkeypatch)
    with pytest.raises(PrivateNameChanged, match="review plugins/ema/ema.py"):
        owned_shards([], optimizer=object())
    _megatron_changes("default-groups-renamed", monkeypatch)
    chunk = torch.nn.Linear(2, 2)
    chunk.config = TransformerConfig(num_layers=2, hidden_size=8, num_attention_heads=2)
    with pytest.raises(PrivateNameChanged, match="review plugins/dualpipe/schedule.py"):
        Step(Settings("dualpipev"), forward_step_func=None, data_iterator=None,
             model=[chunk, chunk], num_microbatches=4, seq_length=8, micro_batch_size=1)


def test_private_linears_refuse_to_import_on_a_changed_megatron():
    import subprocess
    import sys

    code = ("import importlib, integration\n"
            "from megatron.core.tensor_parallel import layers\n"
            "del layers.ColumnParallelLinear._forward_impl\n"
            "for name in ('plugins.common.parallel_linear', 'plugins.fp8.modules'):\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception as error:\n"
            "        print(name, type(error).__name__, error)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300).stdout
    assert ("plugins.common.parallel_linear PrivateNameChanged ColumnParallelLinear defines "
            "no _forward_impl") in out and "review plugins/common/parallel_linear.py" in out
    assert "plugins.fp8.modules PrivateNameChanged" in out and "review plugins/fp8/modules.py" in out
