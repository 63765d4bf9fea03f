"""A checkpoint's files (`upstream.checkpoint_files`, `integration.checkpoint_paths`), through
Megatron's own save and load on 2 gloo ranks: a save that fails on a full disk names the
OS error and the file and leaves the last complete checkpoint to `--load`; a damaged data
file is named and its load refused; a checkpoint without a manifest (plain Megatron's)
loads and says it was not verified. The start-up checks of `--save` and `--load` run
in-process.

The full disk is Linux's /dev/full (every write fails with ENOSPC, as on a full file
system, through the writer's real `write`): the data file rank 0 will write at the
failing save is made a link to it before the run. No root, no mount.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.helpers.training_runs import losses, pretrain

FULL_DISK = Path("/dev/full")


def _corrupt(path: Path, size: int = 4096) -> None:
    """`size` random bytes over the middle of the file, as the issue's fault test did."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - size // 2)
    data[start:start + size] = os.urandom(min(size, len(data) - start))
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.skipif(not FULL_DISK.exists(), reason="needs Linux's /dev/full")
def test_full_disk_damaged_file_and_plain_checkpoint(tmp_path):
    ckpt, plain = tmp_path / "ckpt", tmp_path / "plain"
    run = ["--train-iters", "4", "--save-interval", "2"]
    failing = ckpt / "iter_0000004"
    failing.mkdir(parents=True)
    (failing / "__0_0.distcp").symlink_to(FULL_DISK)

    # 1. The save at iteration 2 completes with its manifest; the one at 4 hits a full disk.
    with pytest.raises(AssertionError) as failed:
        pretrain(run + ["--save", str(ckpt)], tmp_path)
    output = str(failed.value)
    assert "rank 0 exited 1" in output
    assert (f"megaseek: error: --save {ckpt}: saving iteration 4 failed: No space left on "
            f"device [errno 28]: {failing / '__0_0.distcp'}; the partial iter_0000004 was "
            f"removed; --load {ckpt} reads the last complete one, iteration 2") in output
    assert not failing.exists()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert _processes_in(tmp_path) == []  # the ranks' helpers (Megatron's writer queue) ended
    saved = ckpt / "iter_0000002"
    data = sorted(p.name for p in saved.glob("*.distcp"))
    assert data == ["__0_0.distcp", "__1_0.distcp"]
    entries = [json.loads((saved / "megaseek-checksums" / f"{name}.json").read_text())
               for name in data]
    assert [(e["file"], e["bytes"]) for e in entries] == [
        (name, (saved / name).stat().st_size) for name in data]

    # 2. The same checkpoint without its manifest: plain Megatron's. Then 4 KiB of random
    #    bytes in one data file of the original.
    shutil.copytree(ckpt, plain)
    shutil.rmtree(plain / "iter_0000002" / "megaseek-checksums")
    _corrupt(saved / "__1_0.distcp")

    with pytest.raises(AssertionError) as refused:
        pretrain(run + ["--load", str(ckpt)], tmp_path)
    output = str(refused.value)
    assert "rank 0 exited 2" in output
    assert (f"megaseek: error: checkpoint {saved} is damaged: {saved / '__1_0.distcp'}: its "
            "bytes changed since it was saved (CRC-32 ") in output
    assert output.count("megaseek: error:") == 1
    assert not losses(output)  # refused before training

    # 3. The plain checkpoint loads (iteration 2: the last complete one) and trains on,
    #    saying once that it was not verified.
    resumed = pretrain(run + ["--load", str(plain)], tmp_path)
    assert resumed.count(f"{plain / 'iter_0000002'} has no checksum manifest (saved "
                         "without megaseek's checksums): its files are not verified") == 1
    assert sorted(losses(resumed)) == [3, 4]


def _processes_in(folder) -> list[str]:
    """Processes other than this one whose working directory is `folder` (a run's ranks
    and whatever they started), after a moment for exits under way."""
    import psutil

    time.sleep(2)
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.pid != os.getpid() and process.cwd() == str(folder):
                found.append(" ".join(process.info["cmdline"] or [])[:120])
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_check_files_names_each_kind_of_damage(tmp_path):
    """Against the entries the writer makes: a truncated file, changed bytes, a file the
    manifest does not list, a listed file that is gone; an intact file passes."""
    from upstream.checkpoint_files import (check_files, file_crc32, listed_but_missing,
                                           write_entry)

    names = ["__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "__1_1.distcp"]
    for name in names:
        path = tmp_path / name
        path.write_bytes(os.urandom(10_000))
        write_entry(str(path), *file_crc32(str(path)))
    with open(tmp_path / names[1], "r+b") as f:
        f.truncate(9_000)
    _corrupt(tmp_path / names[2], 16)
    (tmp_path / "megaseek-checksums" / f"{names[3]}.json").unlink()
    write_entry(str(tmp_path / "__9_0.distcp"), 1, 0)

    problems = check_files(str(tmp_path), names)
    assert [p.split(":")[0] for p in problems] == [str(tmp_path / n) for n in names[1:]]
    assert "9000 bytes, 10000 when it was saved" in problems[0]
    assert "its bytes changed since it was saved" in problems[1]
    assert "not in the checksum manifest" in problems[2]
    assert listed_but_missing(str(tmp_path)) == [
        f"{tmp_path / '__9_0.distcp'}: missing (the manifest lists it)"]


# --- start-up checks of the folders ---------------------------------------------------------

def _args(**paths) -> argparse.Namespace:
    return argparse.Namespace(load=paths.get("load"), save=paths.get("save"))


def test_save_and_load_must_be_folders_save_writable(tmp_path):
    from integration.checkpoint_paths import check
    from plugins import PluginError

    a_file = tmp_path / "file"
    a_file.write_text("not a checkpoint")
    for flag, hint in (("load", "the --save folder of the run that wrote it"),
                       ("save", "a folder to write the checkpoints in")):
        with pytest.raises(PluginError, match=f"^--{flag} {a_file} is a file, not a "
                                              f"checkpoint folder: give {hint}"):
            check(_args(**{flag: str(a_file)}))
    with pytest.raises(PluginError, match=f"^--save {a_file}/ckpt: {a_file} is a file, not a "
                                          "folder"):
        check(_args(save=str(a_file / "ckpt")))

    new = str(tmp_path / "new" / "ckpt")
    check(_args(save=new, load=new))  # auto-resume's first run: --load D --save D, D not yet
    assert not (tmp_path / "new").exists()  # checked, not made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe is gone


def test_the_launch_path_checks_the_folders_at_start_up(tmp_path, monkeypatch):
    """The check is one of the start-up checks both launch paths run (before Megatron's
    argument dump); today's Megatron warns about `--load FILE` and trains from scratch."""
    from integration import hooks
    from plugins import PluginError
    from tests.helpers.plugin_args import enabled

    a_file = tmp_path / "file"
    a_file.write_text("not a checkpoint")
    args, _ = enabled(["--load", str(a_file), "--transformer-impl", "local",
                       "--distributed-backend", "gloo"], monkeypatch)
    with pytest.raises(PluginError, match=f"^--load {a_file} is a file"):
        hooks._start_up_checks(args)


@pytest.mark.skipif(os.geteuid() == 0 and not Path("/sys").is_dir(),
                    reason="as root, needs a file system root cannot write (/sys)")
def test_an_unwritable_save_folder_is_refused(tmp_path):
    from integration.checkpoint_paths import check
    from plugins import PluginError

    if os.geteuid() == 0:  # permissions do not stop root; sysfs does
        parent = Path("/sys")
    else:
        parent = tmp_path / "read-only"
        parent.mkdir()
        parent.chmod(0o555)
    with pytest.raises(PluginError, match=f"^--save {parent}/ckpt: cannot write in {parent} "
                                          r"\(.+\); give --save a folder this user can write in"):
        check(_args(save=str(parent / "ckpt")))


@pytest.mark.parametrize("flag, saved, run, said", [
    ("num_layers", 4, 3, "--num-layers 4, this run has 3"),
    ("hidden_size", 64, 128, "--hidden-size 64, this run has 128"),
    ("add_position_embedding", True, False,
     "--no-position-embedding (add_position_embedding) True, this run has False"),
])
def test_a_resume_with_another_compared_argument_names_the_flag(flag, saved, run, said,
                                                                 monkeypatch, patcher):
    """Megatron's own check_checkpoint_args (the arguments it compares with the saved ones
    at load) fails naming the flag and both values, not with its AssertionError."""
    from megatron.training import checkpointing

    from upstream.seams.checkpoint_mismatch import checkpoint_mismatch_named
    from upstream.seams.errors import CheckpointMismatch

    sizes = dict(num_layers=4, hidden_size=64, num_attention_heads=4,
                 add_position_embedding=True, vocab_file=None, data_parallel_random_init=False,
                 phase_transition_iterations=None, use_dist_ckpt=True, load="ckpt")
    checkpoint = argparse.Namespace(**sizes)
    this_run = argparse.Namespace(**dict(sizes, **{flag: run}))
    setattr(checkpoint, flag, saved)
    monkeypatch.setattr(checkpointing, "get_args", lambda: this_run)
    monkeypatch.setattr("megatron.training.get_args", lambda: this_run)
    monkeypatch.setattr(checkpointing, "_CHECKPOINT_VERSION", 3.0)
    checkpoint_mismatch_named().apply(patcher)
    checkpointing.check_checkpoint_args(argparse.Namespace(**vars(this_run)))  # passes
    with pytest.raises(CheckpointMismatch) as refused:
        checkpointing.check_checkpoint_args(checkpoint)
    patcher.undo()
    assert str(refused.value) == (f"--load ckpt: the checkpoint was saved with {said}: resume "
                                  "with the value it was saved with")


# --- an async save's manifest (its writes happen in Megatron's worker process) -------------

def test_write_manifest_from_files_writes_the_ranks_missing_entries(tmp_path):
    from upstream.checkpoint_files import (MANIFEST, check_files, write_entry,
                                           write_manifest_from_files)

    for name in ("__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "g__0_2.distcp"):
        (tmp_path / name).write_bytes(name.encode() * 100)
    write_entry(str(tmp_path / "__0_1.distcp"), 7, 0)  # hashed as written: kept as it is
    assert write_manifest_from_files(str(tmp_path), 0) == ["__0_0.distcp", "g__0_2.distcp"]
    assert not (tmp_path / MANIFEST / "__1_0.distcp.json").exists()  # rank 1 writes its own
    assert check_files(str(tmp_path), ["__0_0.distcp", "g__0_2.distcp"]) == []
    assert write_manifest_from_files(str(tmp_path), 1) == ["__1_0.distcp"]
    assert check_files(str(tmp_path), ["__1_0.distcp"]) == []


def test_an_async_save_is_finalized_with_a_manifest_that_verifies(tmp_path, patcher):
    """Megatron's async torch_dist save (its request run here synchronously: its worker
    needs CUDA) gets the manifest when it is finalized, from the files on disk; the
    checkpoint verifies, and a corrupted file is named and refused."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from bench.single_rank import megatron_single_rank
    from upstream.checkpoint_files import (MANIFEST, CheckpointCorrupt,
                                           manifest_after_async_save, verify_checkpoint)

    state = {f"w{i}": ShardedTensor.from_rank_offsets(f"w{i}", torch.randn(4096))
             for i in range(3)}
    with megatron_single_rank():
        manifest_after_async_save().apply(patcher)
        request = dist_checkpointing.save(state, str(tmp_path), TorchDistSaveShardedStrategy(),
                                          async_sharded_save=True, async_strategy="mcore")
        assert not (tmp_path / MANIFEST).exists()  # nothing written before finalization
        request.execute_sync()
        patcher.undo()
        data = sorted(tmp_path.glob("*.distcp"))
        assert data and sorted(p.name[:-len(".json")] for p in (tmp_path / MANIFEST).iterdir()) \
            == [p.name for p in data]
        assert verify_checkpoint(str(tmp_path)) is True
        _corrupt(data[0], 64)
        with pytest.raises(CheckpointCorrupt, match=rf"{data[0]}: its bytes changed since it "
                                                    r"was saved"):
            verify_checkpoint(str(tmp_path))
