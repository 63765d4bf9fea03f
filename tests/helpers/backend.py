"""Which backend the tests' ranks use: gloo on the CPU (the default) or NCCL, one GPU a rank.

    MEGASEEK_TEST_BACKEND=gloo   every rank on the CPU, also on a GPU machine (CI here)
    MEGASEEK_TEST_BACKEND=nccl   every rank on its own GPU (`make test-gpu`)

The harness reads it in one place, here:
- `tests.helpers.multirank.run_ranks` (without an explicit `backend=`) asks `for_ranks(world_size)`;
- `tests.helpers.training_runs.torchrun` adds `launch_env(ranks)` to the subprocess's environment:
  in gloo mode the GPUs are hidden (CUDA_VISIBLE_DEVICES=""), so `upstream.cpu` applies
  and Megatron runs on gloo; in nccl mode they stay visible, Megatron picks NCCL and
  torchrun's LOCAL_RANK picks each rank's GPU;
- inside a rank, `device()` is where tensors and modules go;
- in the test, `tolerance(cpu=..., gpu=..., why=...)` states how close the parallel run must
  be to its one-rank oracle on each backend (exact on CPU is usually possible; GPU kernels
  change summation order with the shapes they see, and some use atomics).

In nccl mode a test that needs more GPUs than are visible is skipped, naming both counts.
`rank_starting_tests(source)` finds the tests that start several ranks, which conftest marks
`multirank` (what `make test-gpu` runs).
"""

from __future__ import annotations

import ast
import os

import torch

ENV = "MEGASEEK_TEST_BACKEND"
BACKENDS = ("gloo", "nccl")
EXACT = (0.0, 0.0)  # (rtol, atol)


def selected(environ=None) -> str:
    """The backend named by MEGASEEK_TEST_BACKEND (gloo when unset or empty)."""
    value = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    if not value:
        return "gloo"
    if value not in BACKENDS:
        raise ValueError(f"{ENV}={value!r} is not a test backend; use one of {BACKENDS}")
    return value


def visible_gpus() -> int:
    """GPUs this process sees (CUDA_VISIBLE_DEVICES applied); 0 without CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def require_gpus(world_size: int) -> None:
    """In nccl mode, skips the calling test unless `world_size` GPUs are visible."""
    if selected() != "nccl":
        return
    gpus = visible_gpus()
    if world_size > gpus:
        import pytest

        pytest.skip(f"{ENV}=nccl runs one GPU per rank: this test starts {world_size} ranks "
                    f"and {gpus} GPU(s) are visible")


def for_ranks(world_size: int) -> str:
    """The process-group backend for `run_ranks` (skips if the GPUs cannot hold the ranks)."""
    require_gpus(world_size)
    return selected()


def launch_env(ranks: int) -> dict[str, str]:
    """Environment a torchrun launch of `ranks` processes adds for the selected backend."""
    if selected() == "nccl":
        require_gpus(ranks)
        return {}  # GPUs visible: Megatron uses NCCL, LOCAL_RANK picks the GPU
    return {"CUDA_VISIBLE_DEVICES": ""}  # CUDA absent: upstream.cpu's flags and fixes, gloo


# Added to a training launch in nccl mode (unless given): the GPU twins of upstream.cpu's
# CPU_ARGUMENTS. The plugins under test are `--transformer-impl local` modules, and these
# fusions need packages a plain GPU machine may lack (Apex's fused wgrad accumulation and
# persistent layer norm, Megatron's compiled masked softmax, TE's fused RoPE); the fused
# bias-SwiGLU is refused by --plugins fp8 (it would keep its input in the training dtype),
# and is off on the CPU too.
GPU_ARGUMENTS = (
    ("--transformer-impl", "local"), ("--no-gradient-accumulation-fusion",),
    ("--no-masked-softmax-fusion",), ("--no-persist-layer-norm",), ("--no-rope-fusion",),
    ("--no-bias-swiglu-fusion",),
)


def launch_args(argv: list[str]) -> list[str]:
    """Megatron flags a training launch adds for the selected backend (on gloo, CUDA is
    hidden and `upstream.cpu.with_cpu_arguments` adds the CPU ones in the run itself)."""
    if selected() != "nccl":
        return []
    given = lambda flag: any(a == flag or a.startswith(flag + "=") for a in argv)  # noqa: E731
    return [part for flag in GPU_ARGUMENTS if not given(flag[0]) for part in flag]


def device() -> torch.device:
    """Where this rank's tensors go: its GPU when its process group is NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def tolerance(*, gpu: tuple[float, float], why: str,
              cpu: tuple[float, float] = EXACT) -> dict[str, float]:
    """`torch.testing.assert_close` keywords (rtol, atol) for the selected backend.

    `cpu` and `gpu` are (rtol, atol); `why` says what on the GPU makes the difference (it is
    required, so that every GPU tolerance in the tests carries its reason).
    """
    if not why.strip():
        raise ValueError("tolerance(): say why the GPU tolerance is what it is")
    rtol, atol = gpu if selected() == "nccl" else cpu
    return {"rtol": rtol, "atol": atol}


def assert_close(actual, expected, tol: dict[str, float], msg=None) -> None:
    """`torch.testing.assert_close` with `tol` (exact when both are 0), on the CPU copies."""
    torch.testing.assert_close(actual, expected, **tol, msg=msg)


# --- which tests start several ranks ------------------------------------------------------

LAUNCHERS = ("torchrun", "pretrain")  # tests.helpers.training_runs: always a torchrun launch


def _called_names(node: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Call)]


def _name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _starts_ranks_itself(call: ast.Call) -> bool:
    name = _name(call)
    if name in LAUNCHERS:
        return True
    if name != "run_ranks":
        return False
    world = call.args[1] if len(call.args) > 1 else next(
        (k.value for k in call.keywords if k.arg == "world_size"), None)
    return not (isinstance(world, ast.Constant) and world.value == 1)


def rank_starting_tests(source: str) -> set[str]:
    """Names of the module-level test functions (and Test* methods) in `source` that start
    more than one rank: they call `run_ranks` with a world size other than a literal 1, or
    launch torchrun (`torchrun`, `pretrain`), themselves or through a helper of the module."""
    tree = ast.parse(source)
    functions: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    functions[f"{node.name}.{item.name}"] = item
    starts = {name for name, fn in functions.items()
              if any(_starts_ranks_itself(c) for c in _called_names(fn))}
    changed = True
    while changed:  # through the module's own helpers
        changed = False
        for name, fn in functions.items():
            helpers = {n.split(".")[-1] for n in starts}
            if name not in starts and any(_name(c) in helpers for c in _called_names(fn)):
                starts.add(name)
                changed = True
    return {name for name in starts if name.split(".")[-1].startswith("test")}
