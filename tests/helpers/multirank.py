"""Run a function on several ranks of a torch.distributed process group.

    from tests.helpers.multirank import run_ranks

    def _sum(rank, world_size, base):          # must be module-level
        t = torch.tensor([base + rank])
        torch.distributed.all_reduce(t)
        return t.item()

    assert run_ranks(_sum, 2, 10) == [21, 21]

Each rank is a fresh process forked from a fork server that has imported torch and
Megatron once (the 'forkserver' method with `_PRELOAD`; 'spawn' for NCCL and under
TRITON_INTERPRET=1, see `_context`): a spawned rank would import them again, about 5 s of
CPU each, over the suite's few hundred ranks. The rank takes the caller's environment as
it is at the call, then imports ``fn`` by name, so ``fn`` must be defined at module level
of an importable module (not a lambda or a nested function), and its arguments and
return value must be picklable. The ranks rendezvous through a FileStore in a temporary
directory (no TCP ports, so ``pytest -n`` is safe). Without ``backend=``, the backend is the one MEGASEEK_TEST_BACKEND
selects (see tests/helpers/backend.py): gloo by default; with "nccl" each rank uses GPU `rank`, so
``fn`` puts its tensors on ``tests.helpers.backend.device()``, and the test is skipped when fewer
than ``world_size`` GPUs are visible. Tensors in the return value come back on the CPU.

``run_ranks`` never hangs: a rank that raises, or dies without reporting (for
instance through ``os._exit`` or a segfault), makes it raise ``RankFailed``
with that rank's traceback or exit code; ranks still running shortly after a
failure, or when ``timeout`` expires, are terminated and named in the error.
"""

import contextlib
import copy
import importlib
import os
import pickle
import queue as queue_module
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import backend as test_backend

__all__ = ["RankFailed", "run_ranks"]

# Seconds the surviving ranks get to finish once one rank has failed.
_FAILURE_GRACE_S = 3.0
# Seconds a rank must have been dead without a result before it is reported.
_DEAD_GRACE_S = 0.5
_CHILD_ENV = {"TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
# What the fork server imports before forking ranks (integration first: it makes Megatron
# importable on Python 3.11). Importing them starts no thread (OMP_NUM_THREADS=1), so a
# fork is safe.
# megatron.training and the plugins' modules are what a training run (`tests.helpers.training_runs`)
# imports besides.
_PRELOAD = ["torch", "torch.distributed", "integration", "megatron.core", "megatron.training",
            "plugins.mla.plugin", "plugins.moe.plugin", "plugins.fp8.plugin", "integration.gpt"]


class RankFailed(AssertionError):
    """One or more ranks raised, died, or did not finish in time."""


def forked_context():
    """The fork server's context (for `run_ranks` and `tests.helpers.training_runs`); start its
    processes inside `child_environment()`."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts (first call)
    return ctx


@contextlib.contextmanager
def child_environment():
    """`_CHILD_ENV` (where unset) in os.environ while processes start: children inherit it,
    and so does the fork server when the first start launches it (its imports read it)."""
    saved = {k: os.environ.get(k) for k in _CHILD_ENV}
    for k, v in _CHILD_ENV.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _context(backend: str):
    """The fork server's context; fresh spawned processes instead under TRITON_INTERPRET=1
    (Triton decides when it is imported whether its own library's kernels are
    interpreted, and the fork server imported it, through Megatron, without) and with
    NCCL (a process forked after its parent touched CUDA cannot use it, and Megatron's
    import may ask CUDA for its devices)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or backend == "nccl":
        return mp.get_context("spawn")
    return forked_context()


def _worker(fn_name, env, rank, world_size, backend, store_path, results, args, kwargs):
    try:
        # The caller's environment before `fn`'s module is imported: some modules read it
        # when they are imported (Triton's TRITON_INTERPRET, say), and the fork server's
        # is that of the first call.
        os.environ.clear()
        os.environ.update(env)
        module, qualname = fn_name
        fn = importlib.import_module(module)
        for part in qualname.split("."):
            fn = getattr(fn, part)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        try:
            value = _on_cpu(fn(rank, world_size, *args, **kwargs))
        finally:
            dist.destroy_process_group()
        # Pickle here so that an unpicklable result is reported, not lost.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def _on_cpu(value):
    """`value` with every tensor in it (in tuples, lists, dicts) moved to the CPU, so the
    test process never unpickles a GPU tensor."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu() if value.device.type != "cpu" else value
    if isinstance(value, dict):
        moved = copy.copy(value)  # keeps the dict's type (OrderedDict, defaultdict)
        moved.update((k, _on_cpu(v)) for k, v in value.items())
        return moved
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_on_cpu(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


def _stop(procs):
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()


def run_ranks(fn, world_size, *args, backend=None, timeout=120.0, **kwargs):
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes.

    Returns the ranks' return values as a list ordered by rank. Raises
    ``RankFailed`` if a rank raises or dies, or if not every rank has finished
    within ``timeout`` seconds (wall clock, process start-up included).
    """
    if backend is None:
        backend = test_backend.for_ranks(world_size)  # may skip: fewer GPUs than ranks
    ctx = _context(backend)
    results = ctx.Queue()
    procs = []
    try:
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
            store_path = os.path.join(tmp, "store")
            with child_environment():
                for rank in range(world_size):
                    p = ctx.Process(
                        target=_worker, name=f"rank{rank}", daemon=True,
                        args=((fn.__module__, fn.__qualname__), dict(os.environ), rank,
                              world_size, backend, store_path, results, args, kwargs),
                    )
                    p.start()
                    procs.append(p)
            return _collect(procs, results, timeout)
    finally:
        _stop(procs)
        results.close()
        results.cancel_join_thread()


def _collect(procs, results, timeout):
    values, failures, dead_since = {}, {}, {}
    pending = set(range(len(procs)))
    deadline = time.monotonic() + timeout
    timed_out = False
    while pending:
        now = time.monotonic()
        if now >= deadline:
            timed_out = not failures
            break
        try:
            rank, ok, payload = results.get(timeout=0.05)
        except queue_module.Empty:
            for rank in sorted(pending):
                code = procs[rank].exitcode
                if code is None:
                    continue
                if now - dead_since.setdefault(rank, now) >= _DEAD_GRACE_S:
                    pending.discard(rank)
                    failures[rank] = f"exited with code {code} without reporting a result"
                    deadline = min(deadline, now + _FAILURE_GRACE_S)
            continue
        pending.discard(rank)
        if ok:
            values[rank] = pickle.loads(payload)
        else:
            failures[rank] = f"raised:\n{payload}"
            deadline = min(deadline, time.monotonic() + _FAILURE_GRACE_S)
    if timed_out:
        raise RankFailed(
            f"run_ranks timed out after {timeout}s; ranks {sorted(pending)} of "
            f"{len(procs)} had not finished and were killed"
        )
    if failures:
        lines = [f"{len(failures)} of {len(procs)} ranks failed: {sorted(failures)}"]
        lines += [f"--- rank {r} {msg}" for r, msg in sorted(failures.items())]
        if pending:
            lines.append(f"ranks {sorted(pending)} were still running and were killed")
        raise RankFailed("\n".join(lines))
    return [values[r] for r in range(len(procs))]
