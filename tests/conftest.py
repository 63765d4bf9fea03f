"""Shared pytest hooks.

- Tests marked ``gpu`` are skipped when CUDA is unavailable.
- Tests that start several ranks (through ``tests.helpers.multirank.run_ranks`` or a torchrun
  launch of ``tests.helpers.training_runs``) are marked ``multirank``: ``make test-gpu`` runs
  them with MEGASEEK_TEST_BACKEND=nccl (tests/helpers/backend.py), whose value is checked here
  at start-up.
- The `patcher` fixture: upstream changes made during a test are undone when it ends.
"""

import functools
import inspect

import pytest

from tests.helpers import backend


@pytest.fixture
def patcher():
    """An `upstream.patching.Patcher` whose changes are undone when the test ends, passed or
    failed (a test that checks what undoing restores calls `patcher.undo()` itself first)."""
    from tests.helpers.patching import patching

    with patching() as recorded:
        yield recorded


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "multirank: starts several ranks through the harness "
                   "(tests/helpers/backend.py); marked by conftest, run on NCCL by "
                   "`make test-gpu`")
    try:
        backend.selected()
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None


@functools.lru_cache(maxsize=None)
def _rank_starting_tests(path: str) -> frozenset:
    with open(path, encoding="utf-8") as f:
        return frozenset(backend.rank_starting_tests(f.read()))


def _qualname(item) -> str:
    name = item.function.__name__
    return f"{item.cls.__name__}.{name}" if item.cls is not None else name


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        path = inspect.getsourcefile(item.module) or str(item.path)
        if _qualname(item) in _rank_starting_tests(path):
            item.add_marker(pytest.mark.multirank)

    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)
