"""upstream.cpu / upstream.compat fixes, the CpuTorch proxy, and the patching tools.

`cpu.install()` and `compat.install()` change Megatron modules in this process: every
test that installs undoes it (fixtures with yield, or try/finally), so that the
`still_needed` probes below always look at the upstream code.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
from pathlib import Path

import pytest
import torch

import integration  # noqa: F401  (makes megatron.training importable on Python 3.11)
from upstream import compat, cpu
from upstream.cpu_device import CpuTorch, NullEvent
from upstream.patching import Patcher, rewrite_function, source_has


def _training():
    return importlib.import_module("megatron.training.training")


def _assert_nothing_installed():
    training = _training()
    assert training.torch is torch, "upstream.cpu is installed: some test did not undo it"
    utils = importlib.import_module("megatron.core.datasets.utils")
    assert utils.compile_helpers is not compat._prebuilt_dataset_helpers, (
        "upstream.compat is installed: some test did not undo it")


@pytest.fixture
def cpu_installed():
    patcher = cpu.install()
    assert patcher is not None, "cpu.install() applied nothing on a machine without CUDA"
    try:
        yield patcher
    finally:
        patcher.undo()


@pytest.fixture
def compat_installed():
    patcher = compat.install()
    try:
        yield patcher
    finally:
        patcher.undo()


# --- the proxy fixes (every fix's probe and upstream place: tests/upstream/test_registry.py)

_PY_REFERENCE = re.compile(r"([\w/.]+\.py)(?::([\d,\- ]+))?")
PROXY_FIXES = tuple(f for f in cpu.FIXES if f.name.startswith("cpu-torch:"))


def test_every_cuda_calling_module_has_a_proxy_fix():
    assert sorted(f.name.removeprefix("cpu-torch:") for f in PROXY_FIXES) == sorted(
        cpu.CUDA_CALLING_MODULES)


@pytest.mark.parametrize("fix", PROXY_FIXES, ids=[f.name for f in PROXY_FIXES])
def test_proxy_fix_names_its_module_file(fix):
    module_name = fix.name.removeprefix("cpu-torch:")
    assert module_name in cpu.CUDA_CALLING_MODULES
    module_file = Path(importlib.import_module(module_name).__file__).as_posix()
    first = _PY_REFERENCE.match(fix.upstream)
    assert first is not None, fix.upstream
    assert module_file.endswith("/" + first.group(1)), (module_file, fix.upstream)


# --- scope: where cpu.install() applies ----------------------------------------------------

def test_install_does_nothing_where_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu.cuda_is_absent() is False
    patcher = cpu.install()
    try:
        assert patcher is None
        assert _training().torch is torch
    finally:
        if patcher is not None:
            patcher.undo()


def test_install_forced_where_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    training = _training()
    patcher = cpu.install(force=True)
    try:
        assert patcher is not None
        assert isinstance(training.torch, CpuTorch)
    finally:
        if patcher is not None:
            patcher.undo()
    assert training.torch is torch


def test_install_applies_without_cuda():
    assert not torch.cuda.is_available()  # this test is about a machine without CUDA
    assert cpu.cuda_is_absent() is True
    patcher = cpu.install()
    try:
        assert patcher is not None
        for name in cpu.CUDA_CALLING_MODULES:
            assert isinstance(importlib.import_module(name).torch, CpuTorch), name
        # Each proxy module has its own proxy; the rest of the process keeps torch.
        assert torch.cuda.current_device is not CpuTorch.cuda.current_device
        assert sys.modules["torch"] is torch
    finally:
        if patcher is not None:
            patcher.undo()
    for name in cpu.CUDA_CALLING_MODULES:
        assert importlib.import_module(name).torch is torch, name


def test_install_is_idempotent(cpu_installed):
    training = _training()
    proxy = training.torch
    assert cpu.install() is None
    assert cpu.install(force=True) is None
    assert training.torch is proxy


def test_undo_restores_every_replaced_attribute():
    training = _training()
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    language_module = importlib.import_module(
        "megatron.core.models.common.language_module.language_module")
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    arguments = importlib.import_module("megatron.training.arguments")
    originals = {
        "get_model": (training, training.get_model),
        "initialize_megatron": (training, training.initialize_megatron),
        "build": (training, training.build_train_valid_test_data_iterators),
        "clip": (clip_grads, clip_grads.clip_grad_by_total_norm_fp32),
        "clip-by-name": (optimizer, optimizer.clip_grad_by_total_norm_fp32),
        "get_rng": (random, random._get_cuda_rng_state),
        "set_rng": (random, random._set_cuda_rng_state),
        "arch": (arguments, arguments.get_device_arch_version),
    }
    setup = vars(language_module.LanguageModule)["setup_embeddings_and_output_layer"]

    patcher = cpu.install()
    try:
        assert patcher is not None
        for key, (owner, value) in originals.items():
            attr = {"build": "build_train_valid_test_data_iterators",
                    "clip": "clip_grad_by_total_norm_fp32",
                    "clip-by-name": "clip_grad_by_total_norm_fp32",
                    "get_rng": "_get_cuda_rng_state", "set_rng": "_set_cuda_rng_state",
                    "arch": "get_device_arch_version"}.get(key, key)
            assert getattr(owner, attr) is not value, f"{key} was not replaced"
    finally:
        if patcher is not None:
            patcher.undo()
    assert training.get_model is originals["get_model"][1]
    assert training.initialize_megatron is originals["initialize_megatron"][1]
    assert training.build_train_valid_test_data_iterators is originals["build"][1]
    assert clip_grads.clip_grad_by_total_norm_fp32 is originals["clip"][1]
    assert optimizer.clip_grad_by_total_norm_fp32 is originals["clip-by-name"][1]
    assert random._get_cuda_rng_state is originals["get_rng"][1]
    assert random._set_cuda_rng_state is originals["set_rng"][1]
    assert arguments.get_device_arch_version is originals["arch"][1]
    assert vars(language_module.LanguageModule)["setup_embeddings_and_output_layer"] is setup


# --- behaviour of specific CPU fixes -------------------------------------------------------

def _tracker():
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    return random.CudaRNGStatesTracker()


def test_rng_tracker_needs_cuda_without_install():
    _assert_nothing_installed()
    tracker = _tracker()
    with pytest.raises((RuntimeError, AssertionError)):
        tracker.add("a", 1)


def test_rng_tracker_forks_the_cpu_generator(cpu_installed):
    tracker = _tracker()
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    tracker.add("a", 1)
    tracker.add("b", 2)
    assert torch.equal(torch.get_rng_state(), before)  # add() puts the state back

    with tracker.fork("a"):
        a1 = torch.rand(4)
    with tracker.fork("b"):
        b1 = torch.rand(4)
    with tracker.fork("a"):
        a2 = torch.rand(4)

    assert not torch.equal(a1, b1)
    assert not torch.equal(a1, a2)  # forking 'a' again continues its stream
    # The default CPU generator outside the forks is unaffected by them.
    assert torch.equal(torch.get_rng_state(), before)
    # The forked streams are the seeded ones.
    assert torch.equal(torch.cat([a1, a2]),
                       torch.rand(8, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(b1, torch.rand(4, generator=torch.Generator().manual_seed(2)))


def test_rng_tracker_nested_forks(cpu_installed):
    tracker = _tracker()
    tracker.add("a", 11)
    tracker.add("b", 22)
    before = torch.get_rng_state()
    with tracker.fork("a"):
        a1 = torch.rand(2)
        with tracker.fork("b"):
            b1 = torch.rand(2)
        a2 = torch.rand(2)  # back on 'a', where it left off
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.cat([a1, a2]),
                       torch.rand(4, generator=torch.Generator().manual_seed(11)))
    assert torch.equal(b1, torch.rand(2, generator=torch.Generator().manual_seed(22)))


def test_rng_tracker_duplicate_seed_and_unknown_name(cpu_installed):
    tracker = _tracker()
    tracker.add("a", 5)
    with pytest.raises(Exception, match="seed 5 already exists"):
        tracker.add("other", 5)
    with pytest.raises(Exception, match="not added"):
        with tracker.fork("missing"):
            pass


def test_rng_state_functions_use_the_cpu_generator(cpu_installed):
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    torch.manual_seed(7)
    state = random._get_cuda_rng_state()
    assert torch.equal(state, torch.get_rng_state())
    first = torch.rand(3)
    random._set_cuda_rng_state(state)
    assert torch.equal(torch.rand(3), first)


def test_fork_warning_about_cpu_rng_is_dropped(cpu_installed, caplog):
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    logger = logging.getLogger(random.__name__)
    with caplog.at_level(logging.WARNING, logger=random.__name__):
        tracker = _tracker()
        tracker.add("a", 3)
        with tracker.fork("a"):
            torch.rand(4)
        logger.warning("another warning from the same logger")
    assert "CPU RNG state changed" not in caplog.text
    assert "another warning from the same logger" in caplog.text


def test_undo_removes_the_rng_warning_filter():
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    patcher = cpu.install()
    assert patcher is not None
    patcher.undo()
    assert cpu._drop_cpu_rng_warning not in logging.getLogger(random.__name__).filters


def test_dataloader_draws_from_global_rng():
    assert cpu.dataloader_draws_from_global_rng() is True


def test_data_iterators_do_not_touch_the_cpu_generator(monkeypatch):
    training = _training()
    calls = []

    def fake_build(*args, **kwargs):
        calls.append((args, kwargs))
        return torch.rand(3)  # draws from the default generator, as a DataLoader does

    monkeypatch.setattr(training, "build_train_valid_test_data_iterators", fake_build)
    patcher = cpu.install()
    try:
        assert patcher is not None
        wrapped = training.build_train_valid_test_data_iterators
        assert wrapped is not fake_build
        torch.manual_seed(0)
        before = torch.get_rng_state()
        drawn = wrapped(1, key=2)
        assert torch.equal(torch.get_rng_state(), before)
        assert torch.equal(drawn, torch.rand(3, generator=torch.Generator().manual_seed(0)))
        assert calls == [((1,), {"key": 2})]
    finally:
        if patcher is not None:
            patcher.undo()
    assert training.build_train_valid_test_data_iterators is fake_build


def test_initialize_megatron_allows_no_cuda(cpu_installed):
    training = _training()
    initialize = importlib.import_module("megatron.training.initialize")
    patched = training.initialize_megatron
    assert patched.func is initialize.initialize_megatron
    assert patched.keywords == {"allow_no_cuda": True}
    assert patched.__name__ == "initialize_megatron"


def test_device_arch_version_is_zero(cpu_installed):
    arguments = importlib.import_module("megatron.training.arguments")
    assert arguments.get_device_arch_version() == 0


def _clip_params():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    params[0].grad = torch.tensor([3.0, 0.0])
    params[1].grad = torch.tensor([4.0])
    return params


def test_clip_grads_upstream_needs_cuda_tensors():
    _assert_nothing_installed()
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    with pytest.raises(AssertionError):
        clip_grads.clip_grad_by_total_norm_fp32(_clip_params(), max_norm=1.0, total_norm=5.0)


def test_clip_grads_on_cpu(cpu_installed):
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    assert optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
    params = _clip_params()
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=5.0)
    assert torch.allclose(params[0].grad, torch.tensor([0.6, 0.0]), atol=1e-6)
    assert torch.allclose(params[1].grad, torch.tensor([0.8]), atol=1e-6)
    # A norm already under the limit leaves the gradients alone.
    params = _clip_params()
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=10.0, total_norm=5.0)
    assert torch.equal(params[1].grad, torch.tensor([4.0]))


def _string_constants(code) -> set[str]:
    found = set()
    for const in code.co_consts:
        if isinstance(const, str):
            found.add(const)
        elif isinstance(const, (tuple, frozenset)):  # e.g. `x in ['a', 'b']`
            found |= {c for c in const if isinstance(c, str)}
        elif hasattr(const, "co_consts"):
            found |= _string_constants(const)
    return found


def test_rewritten_megatron_functions(cpu_installed):
    training = _training()
    language_module = importlib.import_module(
        "megatron.core.models.common.language_module.language_module")
    distopt = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    cls = distopt.DistributedOptimizer

    assert not source_has(training.get_model, "model_module.cuda(")
    assert not source_has(language_module.LanguageModule.setup_embeddings_and_output_layer,
                          "weight.data.cuda()")
    build = _string_constants(cls._build_model_and_main_param_groups.__code__)
    assert "torch.FloatTensor" in build and "torch.cuda.FloatTensor" not in build
    assert "torch.BFloat16Tensor" in build and "torch.cuda.BFloat16Tensor" not in build
    init = _string_constants(cls.__init__.__code__)
    assert "torch.HalfTensor" in init and "torch.cuda.HalfTensor" not in init
    # The rewrites see the module's patched torch.
    assert isinstance(training.get_model.__globals__["torch"], CpuTorch)


# --- compat fixes --------------------------------------------------------------------------

def test_compat_install_and_undo(compat_installed):
    for fix in compat.FIXES:
        assert fix.still_needed() is False, f"{fix.name} is not recognised as applied"
    utils = importlib.import_module("megatron.core.datasets.utils")
    utils.compile_helpers()  # the prebuilt helpers import; no `make`, no sys.exit
    # A second install applies nothing, so undoing it changes nothing.
    again = compat.install()
    again.undo()
    assert utils.compile_helpers is compat._prebuilt_dataset_helpers


def test_compat_undo_restores_upstream():
    distopt = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    utils = importlib.import_module("megatron.core.datasets.utils")
    cls = distopt.DistributedOptimizer
    names = ("state_dict", "load_state_dict", "_set_main_param_and_optimizer_states")
    originals = {name: vars(cls)[name] for name in names}
    compile_helpers = utils.compile_helpers
    checkpointing = importlib.import_module("megatron.training.checkpointing")
    load_checkpoint = checkpointing.load_checkpoint
    patcher = compat.install()
    try:
        for name in names:
            assert vars(cls)[name] is not originals[name], name
        assert utils.compile_helpers is compat._prebuilt_dataset_helpers
        assert checkpointing.load_checkpoint is not load_checkpoint
    finally:
        patcher.undo()
    assert checkpointing.load_checkpoint is load_checkpoint
    for name in names:
        assert vars(cls)[name] is originals[name], name
    assert utils.compile_helpers is compile_helpers
    assert all(fix.still_needed() for fix in compat.FIXES)


# --- CpuTorch ------------------------------------------------------------------------------

def test_cpu_torch_factories_map_cuda_to_cpu():
    fake = CpuTorch()
    assert fake.zeros(2, device="cuda").device.type == "cpu"
    assert fake.tensor([1], device=torch.device("cuda", 0)).device.type == "cpu"
    assert fake.ones(3, device="cuda:1").device.type == "cpu"
    assert fake.empty(1, device=0).device.type == "cpu"  # a bare index means CUDA
    assert fake.arange(3, device="cuda").tolist() == [0, 1, 2]
    assert fake.zeros_like(torch.ones(2), device="cuda").device.type == "cpu"
    assert fake.full((2,), 7, device="cuda").tolist() == [7, 7]
    assert fake.tensor([1.5], device="cpu").device.type == "cpu"
    assert fake.zeros(2).device.type == "cpu"
    # Other arguments pass through.
    assert fake.zeros(2, dtype=torch.int64, device="cuda").dtype == torch.int64


def test_cpu_torch_forwards_everything_else():
    fake = CpuTorch()
    assert fake.cat is torch.cat
    assert fake.float32 is torch.float32
    assert fake.nn is torch.nn
    assert fake.distributed is torch.distributed


def test_cpu_cuda_is_the_cpu():
    fake = CpuTorch()
    assert fake.cuda.current_device() == torch.device("cpu")
    assert fake.cuda.device_count() == 1
    assert fake.cuda.memory_allocated() == 0
    assert fake.cuda.is_current_stream_capturing() is False
    fake.cuda.synchronize()
    fake.cuda.empty_cache()
    fake.cuda.set_device(0)
    with fake.cuda.stream(fake.cuda.Stream()):
        pass
    with fake.cuda.current_stream():
        pass
    with fake.cuda.nvtx.range("x"):
        pass
    # The real torch.cuda of the process is untouched.
    assert torch.cuda.current_device is not fake.cuda.current_device


def test_cpu_cuda_rng_is_the_cpu_generator():
    fake = CpuTorch()
    torch.manual_seed(42)
    assert torch.equal(fake.cuda.get_rng_state(), torch.get_rng_state())
    state = fake.cuda.get_rng_state()
    first = torch.rand(2)
    fake.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(2), first)
    fake.cuda.manual_seed(3)
    assert torch.equal(torch.rand(2), torch.rand(2, generator=torch.Generator().manual_seed(3)))


def test_cpu_cuda_events():
    fake = CpuTorch()
    start = fake.cuda.Event(enable_timing=True)
    end = fake.cuda.Event(enable_timing=True)
    assert isinstance(start, NullEvent)
    start.record()
    end.record()
    end.synchronize()
    assert end.query() is True
    elapsed = start.elapsed_time(end)
    assert isinstance(elapsed, float) and elapsed >= 0.0
    stream = fake.cuda.Stream()
    assert isinstance(stream.record_event(), NullEvent)
    assert stream.record_event(start) is start


# --- rewrite_function and source_has -------------------------------------------------------

_CONSTANT = 5


def sample_function(x):
    return x + 1


def uses_global():
    return _CONSTANT


def with_multiline_string():
    text = """first
second"""
    return text + "!"


class Base:
    def greet(self):
        return "base"


class Child(Base):
    def greet(self):
        return "child+" + super().greet()

    @staticmethod
    def twice(x):
        return x * 2

    @classmethod
    def make(cls):
        return cls.__name__ + "!"


THIS = sys.modules[__name__]


def test_rewrite_function_applies_replacements():
    new = rewrite_function(THIS, "sample_function", {"x + 1": "x + 2"})
    assert new(1) == 3
    assert sample_function(1) == 2  # the original is untouched
    assert new.__name__ == "sample_function"
    assert source_has(sample_function, "x + 1")
    assert not source_has(new, "x + 1")  # a probe for the replaced text reads False now
    assert source_has(new, "return x + 2")  # the rewrite's own text


def test_rewrites_of_one_function_compose(patcher):
    """Two fixes of one function (e.g. fp8's two TransformerConfig checks): the second
    rewrites the first's text, and each probe sees only its own text gone."""
    patcher.setattr(THIS, "sample_function",
                    rewrite_function(THIS, "sample_function", {"x + 1": "x + 2"}))
    assert source_has(THIS.sample_function, "return")
    patcher.setattr(THIS, "sample_function",
                    rewrite_function(THIS, "sample_function", {"x + 2": "(x + 2) * 10"}))
    assert THIS.sample_function(1) == 30
    assert not source_has(THIS.sample_function, "x + 1")
    patcher.undo()
    assert THIS.sample_function(1) == 2


def test_rewrite_function_missing_pattern():
    with pytest.raises(RuntimeError, match="not found"):
        rewrite_function(THIS, "sample_function", {"x + 1": "x + 2", "x - 1": "x"})
    with pytest.raises(RuntimeError, match="sample_function"):
        rewrite_function(THIS, "sample_function", {"no such text": ""})


def test_rewrite_function_uses_module_globals(monkeypatch):
    new = rewrite_function(THIS, "uses_global", {"return _CONSTANT": "return _CONSTANT * 10"})
    assert new() == 50
    monkeypatch.setattr(THIS, "_CONSTANT", 6)
    assert new() == 60


def test_rewrite_method_with_zero_argument_super(patcher):
    new = rewrite_function(Child, "greet", {'"child+"': '"kid+"'})
    assert new(Child()) == "kid+base"
    patcher.setattr(Child, "greet", new)
    assert Child().greet() == "kid+base"
    patcher.undo()
    assert Child().greet() == "child+base"


def test_rewrite_keeps_staticmethod_and_classmethod(patcher):
    twice = rewrite_function(Child, "twice", {"x * 2": "x * 3"})
    make = rewrite_function(Child, "make", {'"!"': '"?"'})
    assert isinstance(twice, staticmethod)
    assert isinstance(make, classmethod)
    assert source_has(twice, "x * 3") and not source_has(twice, "x * 2")
    patcher.setattr(Child, "twice", twice)
    patcher.setattr(Child, "make", make)
    assert Child.twice(2) == 6
    assert Child().twice(2) == 6
    assert Child.make() == "Child?"
    assert not source_has(Child.twice, "x * 2")  # the function behind the staticmethod
    patcher.undo()
    assert Child.twice(2) == 4
    assert Child.make() == "Child!"
    assert source_has(Child.twice, "x * 2")


def test_rewrite_keeps_multiline_strings():
    new = rewrite_function(THIS, "with_multiline_string", {'"!"': '"?"'})
    assert new() == "first\nsecond?"


# --- Patcher -------------------------------------------------------------------------------

class Holder:
    attr = 1
    none = None


class SubHolder(Holder):
    pass


def test_patcher_restores_and_deletes():
    patcher = Patcher()
    patcher.setattr(Holder, "attr", 2)
    patcher.setattr(Holder, "added", 3)
    patcher.setattr(Holder, "none", 4)
    assert (Holder.attr, Holder.added, Holder.none) == (2, 3, 4)
    patcher.undo()
    assert Holder.attr == 1
    assert Holder.none is None and "none" in vars(Holder)
    assert not hasattr(Holder, "added")
    patcher.undo()  # nothing left to undo
    assert Holder.attr == 1


def test_patcher_same_attribute_twice_restores_the_first_original():
    patcher = Patcher()
    patcher.setattr(Holder, "attr", 2)
    patcher.setattr(Holder, "attr", 3)
    assert Holder.attr == 3
    patcher.undo()
    assert Holder.attr == 1


def test_patcher_inherited_attribute_is_deleted_not_copied():
    patcher = Patcher()
    patcher.setattr(SubHolder, "attr", 9)
    assert SubHolder.attr == 9 and Holder.attr == 1
    patcher.undo()
    assert "attr" not in vars(SubHolder)
    assert SubHolder.attr == 1


def test_patcher_on_a_module():
    patcher = Patcher()
    patcher.setattr(THIS, "_CONSTANT", 99)
    patcher.setattr(THIS, "_ADDED_BY_TEST", True)
    assert uses_global() == 99
    patcher.undo()
    assert uses_global() == 5
    assert not hasattr(THIS, "_ADDED_BY_TEST")
