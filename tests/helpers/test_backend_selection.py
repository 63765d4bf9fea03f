"""The harness's choice of backend (tests/helpers/backend.py), checked on the CPU: gloo by default,
NCCL with one GPU per rank under MEGASEEK_TEST_BACKEND=nccl (what `make test-gpu` sets)
for every test that starts several ranks, and a skip naming both counts when the visible
GPUs cannot hold the ranks."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import backend, multirank, training_runs
from tests.helpers import paths
from tests.helpers.multirank import run_ranks

ROOT = paths.REPO
TESTS = paths.TESTS


@pytest.fixture
def nccl_with(monkeypatch):
    """NCCL mode with `gpus` visible GPUs (a fake count: this machine may have none)."""
    def select(gpus: int):
        monkeypatch.setenv(backend.ENV, "nccl")
        monkeypatch.setattr(backend, "visible_gpus", lambda: gpus)
    return select


def _backend_of_the_group(rank, world_size):
    return dist.get_backend(), backend.device().type


class _Started(Exception):
    """Raised by the recording context instead of starting a process."""


class _RecordingContext:
    """Stands in for the fork server's context: records each rank's worker arguments."""

    def __init__(self):
        self.workers = []
        self._real = mp.get_context("spawn")

    def set_forkserver_preload(self, modules):
        pass

    def Queue(self):  # noqa: N802 (multiprocessing's name)
        return self._real.Queue()

    def Process(self, target, name, daemon, args):  # noqa: N802
        # (fn's name, environment, rank, world_size, backend, store, results, ...)
        self.workers.append(args[2:])
        raise _Started


# --- run_ranks ----------------------------------------------------------------------------

def test_default_is_gloo_and_its_ranks_use_the_cpu(monkeypatch):
    monkeypatch.delenv(backend.ENV, raising=False)
    assert backend.selected() == "gloo" and backend.for_ranks(64) == "gloo"
    assert backend.selected({backend.ENV: ""}) == "gloo"
    assert run_ranks(_backend_of_the_group, 2) == [("gloo", "cpu")] * 2


def test_nccl_mode_makes_run_ranks_start_nccl_workers(nccl_with, monkeypatch):
    nccl_with(gpus=8)
    assert backend.for_ranks(4) == "nccl"
    ctx = _RecordingContext()
    monkeypatch.setattr(multirank.mp, "get_context", lambda method: ctx)
    with pytest.raises(_Started):
        run_ranks(_backend_of_the_group, 4)
    assert [(w[0], w[1], w[2]) for w in ctx.workers] == [(0, 4, "nccl")]
    # An explicit backend (the `gpu` tests' backend="nccl", or gloo) is kept.
    with pytest.raises(_Started):
        run_ranks(_backend_of_the_group, 2, backend="gloo")
    assert ctx.workers[-1][2] == "gloo"


def test_nccl_mode_skips_a_world_bigger_than_the_visible_gpus(nccl_with, monkeypatch):
    nccl_with(gpus=2)
    monkeypatch.setattr(multirank.mp, "get_context", lambda method: pytest.fail("spawned"))
    with pytest.raises(pytest.skip.Exception,
                       match=r"starts 4 ranks and 2 GPU\(s\) are visible") as info:
        run_ranks(_backend_of_the_group, 4)
    assert "MEGASEEK_TEST_BACKEND=nccl" in str(info.value)
    assert backend.for_ranks(2) == "nccl"  # as many ranks as GPUs: runs


def test_unknown_backend_fails_naming_the_variable(monkeypatch):
    monkeypatch.setenv(backend.ENV, "mpi")
    with pytest.raises(ValueError, match="MEGASEEK_TEST_BACKEND='mpi' is not a test backend"):
        backend.selected()
    with pytest.raises(ValueError, match="MEGASEEK_TEST_BACKEND"):
        run_ranks(_backend_of_the_group, 2)
    with pytest.raises(ValueError, match="MEGASEEK_TEST_BACKEND"):
        training_runs.torchrun(["-m", "integration.pretrain"], [], Path("."))


def test_unknown_backend_stops_pytest_at_start():
    env = dict(os.environ, **{backend.ENV: "nccl2"})
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                           "no:cacheprovider", str(Path(__file__))],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode != 0
    assert "MEGASEEK_TEST_BACKEND='nccl2' is not a test backend" in done.stdout + done.stderr


# --- training runs (rank subprocesses) -----------------------------------------------------

@pytest.fixture
def launched(monkeypatch, tmp_path):
    """Calls training_runs.pretrain with its rank processes recorded, not started; returns
    each rank's (command, environment)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    class RecordedRank:
        def poll(self):
            return 0

        def wait(self, timeout=None):
            return 0

    def record(cmd, env, cwd, out, err):
        ranks.append((cmd, env))
        return RecordedRank()

    monkeypatch.setattr(training_runs, "_start_rank", record)

    def launch(ranks_=2, args=()):
        ranks.clear()
        training_runs.pretrain(list(args), tmp_path / "run", ranks=ranks_)
        return list(ranks)
    ranks = []
    return launch


def test_gloo_training_runs_hide_the_gpus(monkeypatch, launched):
    monkeypatch.delenv(backend.ENV, raising=False)
    ranks = launched()
    assert [env["RANK"] for _, env in ranks] == ["0", "1"]
    for cmd, env in ranks:
        assert env["CUDA_VISIBLE_DEVICES"] == ""  # CUDA absent: upstream.cpu's flags, gloo
        assert env["WORLD_SIZE"] == "2" and env["MASTER_ADDR"] == "127.0.0.1"
        assert cmd[1:3] == ["-m", "integration.pretrain"]
        assert "--transformer-impl" not in cmd


def test_nccl_training_runs_keep_the_gpus_visible(nccl_with, launched):
    nccl_with(gpus=4)
    ranks = launched(4)
    assert [env["LOCAL_RANK"] for _, env in ranks] == ["0", "1", "2", "3"]  # each its GPU
    cmd, env = ranks[0]
    assert "CUDA_VISIBLE_DEVICES" not in env  # Megatron: NCCL, LOCAL_RANK's GPU
    assert cmd[cmd.index("--transformer-impl") + 1] == "local"
    assert "--no-gradient-accumulation-fusion" in cmd and "--distributed-backend" not in cmd
    # A flag the test gives is kept, not doubled.
    cmd, _ = launched(args=["--transformer-impl", "transformer_engine"])[0]
    assert cmd.count("--transformer-impl") == 1 and "transformer_engine" in cmd


def test_nccl_training_runs_skip_when_the_gpus_cannot_hold_the_ranks(nccl_with, launched):
    nccl_with(gpus=1)
    with pytest.raises(pytest.skip.Exception, match=r"starts 2 ranks and 1 GPU\(s\)"):
        launched(2)
    assert len(launched(1)) == 1


def test_a_failed_rank_ends_the_others_and_names_itself(tmp_path):
    """The direct launcher, as torchrun: the first rank to fail ends the run (rank 0 would
    otherwise wait for ever) and the error names it, with the ranks' output."""
    script = tmp_path / "job.py"
    script.write_text("import os, sys, time\n"
                      "print('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'])\n"
                      "if os.environ['RANK'] == '1':\n    sys.exit(3)\n"
                      "time.sleep(600)\n")
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"rank 1 exited 3") as failed:
        training_runs.torchrun([str(script)], [], tmp_path, ranks=2)
    assert time.monotonic() - started < 60
    assert "rank 0 of 2" in str(failed.value) and "rank 1 of 2" in str(failed.value)


# --- tolerances and devices ---------------------------------------------------------------

def test_tolerance_follows_the_backend_and_needs_a_reason(monkeypatch):
    monkeypatch.delenv(backend.ENV, raising=False)
    assert backend.tolerance(gpu=(1e-4, 1e-5), why="cuBLAS") == {"rtol": 0.0, "atol": 0.0}
    assert backend.tolerance(cpu=(1e-5, 0), gpu=(1e-4, 1e-5), why="x") == {"rtol": 1e-5,
                                                                            "atol": 0}
    monkeypatch.setenv(backend.ENV, "nccl")
    assert backend.tolerance(gpu=(1e-4, 1e-5), why="cuBLAS") == {"rtol": 1e-4, "atol": 1e-5}
    with pytest.raises(ValueError, match="say why"):
        backend.tolerance(gpu=(1e-4, 1e-5), why=" ")


def test_device_outside_a_process_group_is_the_cpu():
    assert not dist.is_initialized()
    assert backend.device().type == "cpu"


# --- `make test-gpu` ----------------------------------------------------------------------

def _make_n(target: str) -> list[list[str]]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(["make", "-n", target], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines() if "pytest" in line]


def test_make_test_gpu_runs_the_multirank_tests_on_nccl_serially():
    (words,) = _make_n("test-gpu")
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):  # leading VAR=value words
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert env.get(backend.ENV) == "nccl", words
    assert backend.selected(env) == "nccl"
    assert words[1:3] == ["-m", "pytest"]
    assert words[words.index("-m", 3) + 1] == "multirank"
    assert "-n" not in words and not any(w.startswith("-n") and w[2:].isdigit() for w in words)
    # `make test` (CI here) leaves the variable alone: gloo.
    (plain,) = _make_n("test")
    assert not any(w.startswith(backend.ENV) for w in plain)


def test_make_test_gpu_selects_every_rank_starting_test():
    """Collects what `make test-gpu` runs and checks it against the test files: every test
    that calls run_ranks with more than one rank or launches torchrun is in it."""
    env = dict(os.environ, **{backend.ENV: "nccl"})
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                           "no:cacheprovider", "-m", "multirank", "tests"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    selected = {re.sub(r"\[.*\]$", "", line.strip())
                for line in done.stdout.splitlines() if "::" in line}
    expected = set()
    for path in sorted(TESTS.rglob("test_*.py")):
        for name in backend.rank_starting_tests(path.read_text()):
            expected.add(f"{path.relative_to(ROOT).as_posix()}::{name.replace('.', '::')}")
    assert expected and expected == selected
    # Each way of starting ranks is seen: TP equivalence through run_ranks, a helper's
    # run_ranks (moe_dispatch), training through pretrain, a module's own torchrun helper.
    for test in ("tests/plugins/mla/test_attention.py::test_tensor_parallel_equals_single_rank",
                 "tests/plugins/moe/test_dispatch.py::test_matches_single_process_oracle",
                 "tests/integration/test_training.py::test_resume_is_bit_exact",
                 "tests/plugins/ema/test_ema.py::test_resume_continues_the_ema_and_evaluates_it",
                 "tests/plugins/dualpipe/test_overlap.py::"
                 "test_the_forward_computes_while_the_other_chunks_all_to_all_is_in_flight"):
        assert test in selected, test
    one_rank = "tests/plugins/mla/test_attention.py::test_matches_hugging_face_deepseek_v3"
    assert one_rank not in selected


def test_rank_starting_tests_follow_helpers_and_skip_one_rank():
    source = '''
def helper(w):
    return run_ranks(fn, w)

def indirect():
    return helper(2)

def test_direct():
    run_ranks(fn, 2)

def test_keyword():
    run_ranks(fn, world_size=4)

def test_one_rank():
    run_ranks(fn, 1, timeout=5)

def test_through_helpers():
    indirect()

def test_training(tmp_path):
    out = pretrain([], tmp_path)

class TestLaunch:
    def _go(self):
        return torchrun(["x"], [], None)

    def test_method(self):
        self._go()

def test_nothing():
    assert True
'''
    assert backend.rank_starting_tests(source) == {
        "test_direct", "test_keyword", "test_through_helpers", "test_training",
        "TestLaunch.test_method"}


# --- every rank goes through the harness --------------------------------------------------

HARNESS = {TESTS / "helpers" / name for name in ("multirank.py", "training_runs.py", "backend.py")}
HARNESS.add(Path(__file__).resolve())
# How a test could start ranks on its own; the backend would then not follow the harness.
BYPASSES = re.compile(r"torch\.distributed\.run|init_process_group|torch\.multiprocessing\."
                      r"spawn|mp\.spawn|\btorchrun\s+--|\bdist\.launch\b")


def test_no_test_starts_ranks_outside_the_harness():
    offenders = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
                 for path in sorted(TESTS.rglob("*.py")) if path.resolve() not in HARNESS
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if BYPASSES.search(line)]
    assert not offenders, ("start ranks through tests/helpers/multirank.py or "
                           "tests/helpers/training_runs.py, whose backend MEGASEEK_TEST_BACKEND "
                           "selects:\n" + "\n".join(offenders))
