"""checkpoint_checksums: what megaseek's checkpoint checksums (`upstream.checkpoint_files`)
cost at save and at load, on one rank, through Megatron's torch_dist save and load of a
state dict of FP32 tensors, side by side in one run:

A  Megatron's save (`dist_checkpointing.save`, its torch_dist strategy; one data file)
B  A with the data file hashed as it is written (CRC-32) and its manifest entry written
C  Megatron's load of that checkpoint into the same tensors
D  C after `verify_checkpoint` (the data file read and hashed once more)

and a table of the hashes the manifest could use (CRC-32, BLAKE2b, SHA-256) on the same
bytes: throughput and time against A's save.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
import zlib

import integration  # noqa: F401  (first: makes megatron.training importable on 3.11)
import torch

from bench.result import Config, Result, Table
from bench.single_rank import megatron_single_rank
from bench.timing import interleaved, median

MIB = 2 ** 20
SIZE_MIB, SMOKE_SIZE_MIB = 256, 8
TENSOR_MIB = 16  # a weight of 4M FP32 values, like a large layer's
WARMUP, REPS = 1, 7
SMOKE_WARMUP, SMOKE_REPS = 1, 2
HASHES = {
    "CRC-32 (zlib.crc32)": lambda data: zlib.crc32(data),
    "BLAKE2b (hashlib)": lambda data: hashlib.blake2b(data).digest(),
    "SHA-256 (hashlib)": lambda data: hashlib.sha256(data).digest(),
}


def _state_dict(size_mib: int) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    generator = torch.Generator().manual_seed(0)
    count, numel = max(1, size_mib // TENSOR_MIB), min(size_mib, TENSOR_MIB) * MIB // 4
    return {f"layer{i}.weight": ShardedTensor.from_rank_offsets(
        f"layer{i}.weight", torch.randn(numel, generator=generator)) for i in range(count)}


def _saver(directory: str, state: dict, checksums: bool):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from upstream.checkpoint_files import checksummed_saves

    os.makedirs(directory, exist_ok=True)

    def save(unused: int) -> None:
        with checksummed_saves() if checksums else contextlib.nullcontext():
            dist_checkpointing.save(state, directory, TorchDistSaveShardedStrategy())

    return save


def _loader(directory: str, state: dict, verify: bool):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    from upstream.checkpoint_files import verify_checkpoint

    def load(unused: int) -> None:
        if verify and not verify_checkpoint(directory):
            raise RuntimeError(f"{directory} has no manifest")
        dist_checkpointing.load(state, directory, TorchDistLoadShardedStrategy())

    return load


def _hash_rows(directory: str, save_s: float | None) -> list[list[str]]:
    data = b"".join(open(os.path.join(directory, name), "rb").read()
                    for name in sorted(os.listdir(directory)) if name.endswith(".distcp"))
    rows = []
    for name, digest in HASHES.items():
        best = min(_timed(lambda: digest(data)) for _ in range(3))
        share = f"{best / save_s * 100:.0f}%" if save_s else "n/a"
        rows.append([name, f"{len(data) / best / 1e9:.2f}", f"{best * 1e3:.1f}", share])
    return rows


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def run(smoke: bool = False) -> Result:
    size = SMOKE_SIZE_MIB if smoke else SIZE_MIB
    warmup, reps = (SMOKE_WARMUP, SMOKE_REPS) if smoke else (WARMUP, REPS)
    root = tempfile.mkdtemp(prefix="bench-checkpoint-")
    plain, hashed = os.path.join(root, "plain"), os.path.join(root, "hashed")
    try:
        with megatron_single_rank():
            state = _state_dict(size)
            times = interleaved({
                "A": _saver(plain, state, checksums=False),
                "B": _saver(hashed, state, checksums=True),
            }, reps=reps, warmup=warmup)
            target = _state_dict(size)  # loaded into: other tensors of the same shapes
            times.update(interleaved({
                "C": _loader(hashed, target, verify=False),
                "D": _loader(hashed, target, verify=True),
            }, reps=reps, warmup=warmup))
            saved_bytes = sum(os.path.getsize(os.path.join(hashed, n))
                              for n in os.listdir(hashed) if n.endswith(".distcp"))
            hash_rows = _hash_rows(hashed, median(times["A"]))
            filesystem = _filesystem_of(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    describe = {"A": "save (Megatron's torch_dist)", "B": "save, hashed as written (CRC-32)",
                "C": "load (Megatron's torch_dist)", "D": "verify the manifest, then load"}
    configs = [Config(k, describe[k], times[k]) for k in "ABCD"]
    ratio = lambda a, b: (f"{median(times[b]) / median(times[a]):.3f}"  # noqa: E731
                          if median(times[a]) and median(times[b]) else "n/a")
    cost = Table(
        "Checksum cost (medians; the ratio is with checksums over without)",
        ["", "without ms", "with ms", "ratio"],
        [["save", *(f"{median(times[k]) * 1e3:.1f}" if median(times[k]) else "failed"
                    for k in "AB"), ratio("A", "B")],
         ["load", *(f"{median(times[k]) * 1e3:.1f}" if median(times[k]) else "failed"
                    for k in "CD"), ratio("C", "D")]],
        right=frozenset({1, 2, 3}))
    hashes = Table(
        f"Hashes over the same {saved_bytes / MIB:.0f} MiB (best of 3, one thread)",
        ["hash", "GB/s", "ms", "vs A's save"], hash_rows, right=frozenset({1, 2, 3}))
    return Result("checkpoint_checksums", configs, [
        f"{size} MiB of FP32 tensors ({max(1, size // TENSOR_MIB)} of "
        f"{min(size, TENSOR_MIB)} MiB), one rank (gloo), Megatron's torch_dist strategy "
        f"with its default single writer thread; the folder is on {filesystem}, and the "
        "files a load reads are in the OS page cache (written just before), so D's extra "
        "read is a memory read: on a cold disk the read, not the hash, is the cost. On "
        "several ranks each verifies its share of the files. "
        f"{warmup} warm-up round, then {reps} interleaved rounds; each save rewrites the "
        "same folder.",
        "CRC-32 is the manifest's hash: it detects accidental damage (every burst of up to "
        "32 bits, other damage but for 1 in 2^32), which is what a checksum manifest is for; "
        "it is not a defence against deliberate tampering, for which BLAKE2b or SHA-256 would "
        "be needed, at the speeds in the hash table.",
    ], tables=[cost, hashes])


def _filesystem_of(path: str) -> str:
    """The mount's file system type (Linux), for the notes."""
    best, kind = "", "an unknown file system"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                _, point, fs = line.split()[:3]
                if path.startswith(point) and len(point) > len(best):
                    best, kind = point, f"{fs} ({point})"
    except OSError:
        pass
    return kind
