"""Run `integration.pretrain` (or a launch script) under torchrun and read its results.

Each run is a real Megatron `pretrain()` on 2 ranks in subprocesses: gloo on the CPU, or
NCCL with one GPU a rank when MEGASEEK_TEST_BACKEND=nccl (tests/backend.py); the helpers
parse Megatron's own log lines and read its checkpoints back.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from tests import backend

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
             env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Runs `torchrun --nproc-per-node ranks` and returns its combined output; raises
    with the output's tail if the run fails. The selected test backend decides whether the
    ranks see the GPUs (`backend.launch_env`; skips when fewer GPUs than ranks are visible)
    and which Megatron flags the run adds (`backend.launch_args`); `env` is applied after."""
    launch = {**backend.launch_env(ranks), **(env or {})}
    args = [*args, *backend.launch_args(args)]
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(ranks), *module_or_script, *args], tmp_path, launch,
               timeout)


def run(cmd: list[str], tmp_path: Path, env: dict[str, str] | None = None,
        timeout: float = 300) -> str:
    """Runs `cmd` in `tmp_path` with the tests' environment and returns its combined output;
    raises with the output's tail if it fails."""
    run_env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1",
                   PYTHONWARNINGS="ignore", MEGASEEK_DATA_CACHE=str(tmp_path.parent / "data"),
                   **(env or {}))
    done = subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=timeout,
                          cwd=tmp_path)
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
