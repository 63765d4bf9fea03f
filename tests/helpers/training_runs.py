"""Run `integration.pretrain` (or a launch script) on several ranks and read its results.

Each run is a real Megatron `pretrain()` on 2 ranks in subprocesses: gloo on the CPU, or
NCCL with one GPU a rank when MEGASEEK_TEST_BACKEND=nccl (tests/helpers/backend.py); the helpers
parse Megatron's own log lines and read its checkpoints back.
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tests.helpers import backend, forked_command

# A two-layer MLA model chunk whose every GEMM dimension is a whole 128-tile (FP8 runs it),
# for the tests that build one chunk in process; `--plugins ...` follows.
MLA_CHUNK = ["--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "256",
             "--num-attention-heads", "4", "--seq-length", "8", "--max-position-embeddings",
             "8", "--micro-batch-size", "2", "--transformer-impl", "local",
             "--no-gradient-accumulation-fusion", "--swiglu", "--disable-bias-linear",
             "--no-bias-swiglu-fusion", "--normalization", "RMSNorm",
             "--no-persist-layer-norm", "--position-embedding-type", "none",
             "--hidden-dropout", "0", "--attention-dropout", "0", "--multi-latent-attention",
             "--q-lora-rank", "128", "--kv-lora-rank", "128", "--qk-head-dim", "32",
             "--qk-pos-emb-head-dim", "16", "--v-head-dim", "32"]

TINY_GPT = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "2", "--global-batch-size", "8",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
    "--seed", "1234", "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "2",
]



def mla_moe_ep2(moe_layer_freq: str) -> list[str]:
    """The tiny MLA + DeepSeekMoE model (plugins mla and moe), 4 experts split over 2
    expert-parallel ranks, MoE where `moe_layer_freq` (Megatron's pattern) puts it."""
    return [
        "--plugins", "mla", "moe", "--multi-latent-attention", "--q-lora-rank", "32",
        "--kv-lora-rank", "16", "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8",
        "--v-head-dim", "16", "--rope-type", "rope", "--normalization", "RMSNorm", "--swiglu",
        "--disable-bias-linear", "--num-experts", "4", "--moe-router-topk", "2",
        "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
        "--moe-router-bias-update-rate", "1e-3", "--moe-ffn-hidden-size", "32",
        "--moe-shared-expert-intermediate-size", "32", "--moe-router-load-balancing-type",
        "none", "--moe-layer-freq", moe_layer_freq, "--expert-model-parallel-size", "2",
    ]


_ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)")
_MTP_LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?mtp_1 loss: ([0-9.E+-]+)")
_VALIDATION = re.compile(r"validation loss at iteration (\d+) on validation set \| lm loss value: ([0-9.E+-]+)")


def torchrun(module_or_script: list[str], args: list[str], tmp_path: Path, ranks: int = 2,
             env: dict[str, str] | None = None, timeout: float = 300,
             launcher: str = "direct", grace: float = 0.0) -> str:
    """Runs `module_or_script args` on `ranks` ranks and returns their combined output
    (every rank's stdout, then every rank's stderr); raises with the output's tail if a
    rank fails. The selected test backend decides whether the ranks see the GPUs
    (`backend.launch_env`; skips when fewer GPUs than ranks are visible) and which Megatron
    flags the run adds (`backend.launch_args`); `env` is applied after.

    launcher "torchrun": PyTorch's `torchrun --standalone`, as users launch (the launch and
    shutdown tests). "direct": the ranks are started from here with the environment
    torchrun gives its workers, and the first to fail ends the others, as torchrun does;
    this saves torchrun's own process, a torch import (about 1.7 s of CPU), on each of the
    suite's hundred-odd runs, and the ranks are forked from the tests' fork server where
    they can be (`tests.helpers.forked_command`: no interpreter start and imports, about 4 s of
    CPU a rank). `grace` (direct only): seconds the other ranks get to end on
    their own after one fails, before they are terminated (torchrun gives none), so that a
    test can read what they report about the failure."""
    launch = {**backend.launch_env(ranks), **(env or {})}
    args = [*args, *backend.launch_args(args)]
    if launcher == "torchrun":
        return run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", str(ranks), *module_or_script, *args], tmp_path, launch,
                   timeout)
    if launcher != "direct":
        raise ValueError(f"launcher {launcher!r}: 'direct' or 'torchrun'")
    return _run_ranks([sys.executable, *module_or_script, *args], ranks, tmp_path, launch,
                      timeout, grace)


def _environment(tmp_path: Path, env: dict[str, str] | None) -> dict[str, str]:
    return dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1",
                PYTHONWARNINGS="ignore", MEGASEEK_DATA_CACHE=str(tmp_path.parent / "data"),
                **(env or {}))


_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")  # Linux's: "low high"


def _free_port() -> int:
    """A port for rank 0's TCPStore, free now and below the kernel's ephemeral range. A
    port the kernel picked (bind to 0) is released before rank 0 binds it, and meanwhile
    any connection (gloo opens many) may be given it as its ephemeral port: a run in CI
    failed so, EADDRINUSE. Ports below the range are only ever taken on purpose."""
    low = int(_EPHEMERAL.read_text().split()[0]) if _EPHEMERAL.exists() else 32768
    pick = random.Random()  # seeded by the OS: xdist workers draw differently
    for _ in range(100):
        port = pick.randrange(10000, low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in 10000-{low - 1} after 100 tries")


def _run_ranks(cmd: list[str], ranks: int, tmp_path: Path, env: dict[str, str] | None,
               timeout: float, grace: float) -> str:
    """`cmd` as ranks 0..ranks-1 of one job on this machine (torchrun's worker variables,
    rendezvous at 127.0.0.1 on a free port). Returns their output; when a rank exits
    non-zero the others are terminated and the output's tail is raised."""
    job = dict(_environment(tmp_path, env), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), WORLD_SIZE=str(ranks),
               LOCAL_WORLD_SIZE=str(ranks), GROUP_RANK="0", ROLE_RANK="0", ROLE_NAME="default")
    with tempfile.TemporaryDirectory(prefix="ranks-") as logs:
        outs = [open(os.path.join(logs, f"{r}.out"), "w+") for r in range(ranks)]
        errs = [open(os.path.join(logs, f"{r}.err"), "w+") for r in range(ranks)]
        procs = [_start_rank(cmd, dict(job, RANK=str(r), LOCAL_RANK=str(r),
                                       ROLE_WORLD_SIZE=str(ranks)), tmp_path, outs[r], errs[r])
                 for r in range(ranks)]
        failed = _wait_for_all(procs, timeout, grace)
        output = ""
        for file in outs + errs:
            file.seek(0)
            output += file.read()
            file.close()
    if failed is not None:
        raise AssertionError(f"{' '.join(cmd[1:3])}: {failed}:\n{output[-6000:]}")
    return output


def _start_rank(cmd: list[str], env: dict[str, str], cwd: Path, out, err):
    """One rank's process (Popen's poll / wait / terminate / kill): forked from the fork
    server where `tests.helpers.forked_command` can run `cmd` (no interpreter start, no imports),
    else a fresh one."""
    if forked_command.can_fork(cmd, env):
        return forked_command.start(cmd, env, cwd, out.name, err.name)
    return subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, env=env)


def _wait_for_all(procs: list[subprocess.Popen], timeout: float, grace: float) -> str | None:
    """Waits for every process; at the first non-zero exit (after `grace` more seconds for
    the others to end) or after `timeout` seconds, terminates the rest (kills what is left
    10 s later) and says what failed."""
    deadline, failed = time.monotonic() + timeout, None
    while True:
        codes = [p.poll() for p in procs]  # every rank's, each time
        if None not in codes:
            break
        if failed is None:
            failed = next((f"rank {r} exited {code}" for r, code in enumerate(codes)
                           if code not in (None, 0)), None)
            deadline = min(deadline, time.monotonic() + grace) if failed else deadline
        if time.monotonic() > deadline:
            failed = failed or f"timed out after {timeout:.0f} s"
            break
        time.sleep(0.05)
    failed = failed or next((f"rank {r} exited {code}" for r, code in enumerate(codes)
                             if code not in (None, 0)), None)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return failed


def run(cmd: list[str], tmp_path: Path, env: dict[str, str] | None = None,
        timeout: float = 300) -> str:
    """Runs `cmd` in `tmp_path` with the tests' environment and returns its combined output;
    raises with the output's tail if it fails."""
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env=_environment(tmp_path, env), timeout=timeout, cwd=tmp_path)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise AssertionError(f"{cmd[2]} exited {done.returncode}:\n{output[-6000:]}")
    return output


def pretrain(args: list[str], tmp_path: Path, **kwargs) -> str:
    return torchrun(["-m", "integration.pretrain"], TINY_GPT + args, tmp_path, **kwargs)


def losses(output: str) -> dict[int, float]:
    """Training loss per logged iteration, as Megatron prints it."""
    return {int(i): float(v) for i, v in _ITERATION.findall(output)}


def mtp_losses(output: str) -> dict[int, float]:
    """The first MTP depth's training loss per logged iteration (Megatron's `mtp_1 loss`)."""
    return {int(i): float(v) for i, v in _MTP_LOSS.findall(output)}


def logged_when_resumed(straight: str, start: int, parse=losses) -> dict[int, float]:
    """The losses a run resumed from iteration `start`'s checkpoint logs, from the output of
    the straight run that saved it and went on in memory: the same losses, but Megatron does
    not reset its loss sums after a run's first logged iteration (`training_log`,
    `is_first_iteration`), so every run's second line is the mean of its first two
    iterations' losses (the straight run's own line of iteration 2 too: hence `start` >= 2)."""
    logged = parse(straight)
    assert start >= 2 and sorted(logged) == list(range(1, max(logged) + 1))
    expected = {i: loss for i, loss in logged.items() if i > start}
    expected[start + 2] = (logged[start + 1] + logged[start + 2]) / 2
    return expected


def final_validation_loss(output: str) -> float:
    found = _VALIDATION.findall(output)
    assert found, "no final validation loss in the output"
    return float(found[-1][1])


def checkpoint_tensors(directory: Path, iteration: int) -> dict[str, torch.Tensor]:
    """Every tensor of a `torch_dist` checkpoint (model and optimizer state)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = directory.parent / f"{directory.name}-{iteration}.pt"
    dcp_to_torch_save(directory / f"iter_{iteration:07d}", flat)
    state = torch.load(flat, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
