"""What a `--load` folder holds, checked at start-up (`integration.checkpoint_folder`, through
`integration.checkpoint_paths.check`, the launch paths' check of the folders), and the
checkpoint tools' verification of the checksum manifest (`ema-export`, `convert
megatron-to-hf`).

The folders Megatron misreads are made by hand (its reading of them is in the module's
docstring); the optimizer cases use one real checkpoint, saved by two short one-rank runs
of the auto-resume pattern (`--load D --save D`, D not there yet): iteration 2 with its
optimizer state, iteration 4 without (`--no-save-optim`).
"""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.training_runs import TINY_GPT, checkpoint_tensors, losses, torchrun

TRACKER = "latest_checkpointed_iteration.txt"


def _check(load, save=None, **flags) -> None:
    from integration.checkpoint_paths import check

    check(argparse.Namespace(load=str(load), save=save and str(save), ckpt_step=None,
                             **flags))


def _refused(load, **flags) -> str:
    from plugins import PluginError

    with pytest.raises(PluginError) as refused:
        _check(load, **flags)
    return str(refused.value)


def _checkpoint(folder: Path, iterations=(2,), tracker: str | None = "2") -> Path:
    """A checkpoint folder's shape as Megatron's torch_dist save leaves it (the files'
    contents are not read by these checks)."""
    for iteration in iterations:
        saved = folder / f"iter_{iteration:07d}"
        saved.mkdir(parents=True)
        (saved / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
        (saved / "__0_0.distcp").write_bytes(b"\0")
    if tracker is not None:
        (folder / TRACKER).write_text(tracker)
    return folder


def test_an_iteration_folder_given_as_load_names_its_parent(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    assert _refused(ckpt / "iter_0000002") == (
        f"--load {ckpt}/iter_0000002 is an iteration folder of {ckpt}, not a checkpoint "
        f"folder: give --load {ckpt} (and --ckpt-step 2 for this iteration)")


def test_a_lost_tracker_file_names_ckpt_step(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt", iterations=(2, 4), tracker=None)
    assert _refused(ckpt) == (
        f"--load {ckpt} has iter_0000002, iter_0000004 but no {TRACKER} (the file naming the "
        "latest checkpoint), so Megatron would train from scratch: give --ckpt-step 4 to load "
        f"the latest, or write 4 into {ckpt / TRACKER}")
    from integration.checkpoint_paths import check

    check(argparse.Namespace(load=str(ckpt), save=None, ckpt_step=4, no_load_optim=True))
    # A first save killed before it finished (no metadata.json, no tracker): auto-resume's
    # restart starts afresh, as Megatron does.
    first = _checkpoint(tmp_path / "first", tracker=None)
    (first / "iter_0000002" / "metadata.json").unlink()
    _check(first, save=first)


@pytest.mark.parametrize("text", ["abc", "-3", ""])
def test_a_tracker_that_is_not_an_iteration_is_refused(tmp_path, text):
    ckpt = _checkpoint(tmp_path / "ckpt", tracker=text)
    assert _refused(ckpt) == (
        f"--load {ckpt}: {ckpt / TRACKER} holds {text!r}, not an iteration number or "
        "'release' (Megatron would stop without training): give --ckpt-step 2 (it has "
        "iter_0000002)")


def test_a_tracker_naming_a_missing_iteration_lists_those_there(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt", tracker="7")
    assert _refused(ckpt) == (f"--load {ckpt}: {TRACKER} names iteration 7, which is not in "
                              f"{ckpt} (it has iter_0000002): give --ckpt-step 2")


def test_an_iteration_without_its_metadata_is_not_a_checkpoint(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt", iterations=(2, 4), tracker="4")
    (ckpt / "iter_0000004" / "metadata.json").unlink()
    assert _refused(ckpt) == (
        f"--load {ckpt}: {ckpt}/iter_0000004 is not a complete checkpoint (no metadata.json, "
        "which a torch_dist save writes last, nor another format's files): give --ckpt-step 2 "
        "to load another iteration (it has iter_0000002)")


def test_a_checkpoint_read_in_another_format_names_ckpt_format(tmp_path):
    dist = _checkpoint(tmp_path / "dist")
    assert _refused(dist, ckpt_format="torch") == (
        f"--load {dist}: {dist}/iter_0000002 is a torch_dist checkpoint and this run reads "
        "--ckpt-format torch: give --ckpt-format torch_dist, or --auto-detect-ckpt-format")
    _check(dist, ckpt_format="torch", auto_detect_ckpt_format=True)
    _check(dist, ckpt_format="torch_dist")
    torch_saved = tmp_path / "torch"
    (torch_saved / "iter_0000002" / "mp_rank_00").mkdir(parents=True)
    (torch_saved / TRACKER).write_text("2")
    assert _refused(torch_saved, ckpt_format="torch_dist", no_load_optim=True) == (
        f"--load {torch_saved}: {torch_saved}/iter_0000002 is a torch checkpoint and this run "
        "reads --ckpt-format torch_dist: give --ckpt-format torch, or "
        "--auto-detect-ckpt-format")
    _check(torch_saved, ckpt_format="torch", no_load_optim=True)


def test_a_load_that_does_not_exist_is_refused_unless_it_is_save(tmp_path):
    missing = tmp_path / "no-such-ckpt"
    assert _refused(missing) == (
        f"--load {missing}: no such folder; give the folder a run saved its checkpoints in "
        "(its --save), or the same folder as --save for a run that starts from scratch and "
        "resumes itself")
    with pytest.raises(Exception, match="no such folder"):
        _check(missing, save=tmp_path / "elsewhere")
    # Megatron's auto-resume: the first run of `--load D --save D`, D not there or empty.
    _check(missing, save=missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    _check(empty, save=empty)
    _check(empty)  # an empty folder: nothing to load, as Megatron reads it
    assert not missing.exists()


def test_convert_names_its_positional_folder_and_the_tracker(tmp_path, capsys):
    """megatron-to-hf has no --ckpt-step: its way out is the tracker file."""
    from integration.hf import cli

    ckpt = _checkpoint(tmp_path / "ckpt", tracker="7")
    for source, said in [
            (ckpt / "iter_0000002", f"{ckpt}/iter_0000002 is an iteration folder of {ckpt}, "
                                    f"not a checkpoint folder: give {ckpt}"),
            (ckpt, f"{ckpt}: {TRACKER} names iteration 7, which is not in {ckpt} (it has "
                   f"iter_0000002): write 2 into {ckpt / TRACKER}")]:
        with pytest.raises(SystemExit) as exited:
            cli.main(["megatron-to-hf", str(source), str(tmp_path / "out")])
        assert exited.value.code == 2
        assert capsys.readouterr().err == f"megaseek: error: {said}\n"


# --- one real checkpoint: the optimizer state it holds, or not ---------------------------------

@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Path:
    """The auto-resume pattern, run twice on one rank: the first run starts from scratch
    (D not there) and saves iteration 2; the second resumes it and saves iteration 4
    without its optimizer state (a new one started at iteration 2)."""
    work = tmp_path_factory.mktemp("resumed")
    pair = ["--load", "ckpt", "--save", "ckpt", "--save-interval", "2",
            "--lr-decay-iters", "8"]  # one schedule for both lengths of run
    first = torchrun(["-m", "integration.pretrain"], TINY_GPT + ["--train-iters", "2", *pair],
                     work, ranks=1)
    assert sorted(losses(first)) == [1, 2]  # from scratch
    second = torchrun(["-m", "integration.pretrain"],
                      TINY_GPT + ["--train-iters", "4", "--no-save-optim", "--no-load-optim",
                                  *pair], work, ranks=1)
    assert sorted(losses(second)) == [3, 4]  # resumed at iteration 2
    return work / "ckpt"


@pytest.mark.slow
def test_the_auto_resume_pattern_starts_from_scratch_then_resumes(resumed):
    """`--load D --save D`, D not there yet: Megatron's documented first run (the fixture
    asserts it trained from iteration 1, then resumed at 2)."""
    from upstream.checkpoint_files import saved_iterations

    assert saved_iterations(str(resumed)) == [2, 4]
    assert (resumed / TRACKER).read_text().strip() == "4"


def _saved_arguments(ckpt: Path, step: int) -> argparse.Namespace:
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    saved = load_common_state_dict(str(ckpt / f"iter_{step:07d}"))["args"]
    return argparse.Namespace(**{**vars(copy.copy(saved)), "load": str(ckpt), "save": None,
                                 "ckpt_step": step})


@pytest.mark.slow
def test_weights_only_checkpoint_names_no_load_optim_and_finetune(resumed):
    from integration.checkpoint_paths import check
    from plugins import PluginError

    args = _saved_arguments(resumed, 4)
    args.no_load_optim = args.no_load_rng = False
    with pytest.raises(PluginError) as refused:
        check(args)
    assert str(refused.value) == (
        f"--load {resumed}: {resumed}/iter_0000004 holds the model's weights only, no "
        "optimizer state (an ema-export output, or saved with --no-save-optim): give "
        "--no-load-optim to train on from its iteration with a new optimizer and "
        "learning-rate schedule, or --finetune to start at iteration 0")
    for way_out in ("no_load_optim", "finetune"):
        check(argparse.Namespace(**{**vars(args), way_out: True}))
    check(_saved_arguments(resumed, 2))  # iteration 2 has its optimizer state: resumes


@pytest.mark.slow
@pytest.mark.parametrize("flag, value, said", [
    ("adam_beta1", 0.5, "--adam-beta1 (checkpoint: 0.9, this run: 0.5)"),
    ("adam_beta2", 0.95, "--adam-beta2 (checkpoint: 0.999, this run: 0.95)"),
    ("adam_eps", 1e-6, "--adam-eps (checkpoint: 1e-08, this run: 1e-06)"),
])
def test_an_optimizer_setting_its_state_restores_is_refused(resumed, flag, value, said):
    """torch's load_state_dict puts the saved betas and eps back into the parameter groups:
    a changed flag would have no effect."""
    from integration.checkpoint_paths import check
    from plugins import PluginError

    args = _saved_arguments(resumed, 2)
    setattr(args, flag, value)
    with pytest.raises(PluginError) as refused:
        check(args)
    assert str(refused.value) == (
        f"--load {resumed}: the checkpoint's optimizer state was saved with other settings, "
        f"which its load restores over this run's flags ({said}): resume with the "
        "checkpoint's values, or give --no-load-optim to start the optimizer state afresh "
        "with this run's")
    args.no_load_optim = True
    check(args)


def test_mtp_layers_left_behind_are_said_once(tmp_path, capsys, monkeypatch):
    """Megatron loads a checkpoint with unexpected keys silently: MTP layers saved and not
    built this run would be dropped without a word."""
    from integration.checkpoint_folder import _say_mtp_left_behind

    monkeypatch.setenv("RANK", "0")
    saved = argparse.Namespace(mtp_num_layers=1)
    _say_mtp_left_behind(argparse.Namespace(mtp_num_layers=1), saved, "ckpt")
    _say_mtp_left_behind(argparse.Namespace(mtp_num_layers=2), saved, "ckpt")
    assert capsys.readouterr().out == ""
    _say_mtp_left_behind(argparse.Namespace(mtp_num_layers=None), saved, "ckpt")
    assert capsys.readouterr().out == (
        " megaseek: warning: --load ckpt holds 1 MTP layer(s) (saved with --mtp-num-layers 1) "
        "and this run has --mtp-num-layers 0: the weights of the MTP layers past 0 are not "
        "loaded, and this run's checkpoints will not have them\n")
    monkeypatch.setenv("RANK", "1")
    _say_mtp_left_behind(argparse.Namespace(mtp_num_layers=None), saved, "ckpt")
    assert capsys.readouterr().out == ""  # said once, by rank 0


@pytest.mark.slow
def test_a_missing_optimizer_key_names_the_precision_flag_and_no_load_optim(resumed):
    """A checkpoint saved in FP32 resumed with --bf16: the optimizer state has no FP32 main
    copy of the weights (optimizer.state.fp32_param.*), and Megatron's load fails on the
    missing key; the refusal names --bf16, not only 'another model configuration'."""
    from upstream.seams.checkpoint_mismatch import _mismatch_message

    args = _saved_arguments(resumed, 2)
    args.bf16 = True
    key = "optimizer.state.fp32_param.decoder.layers.0.mlp.linear_fc1.weight"
    said = _mismatch_message(args, KeyError(f"{key} from model not in state dict"))
    assert said == (
        f"--load {resumed}: the checkpoint has no '{key}', which this run's model needs: it "
        "was saved with another configuration. Flags that differ: --bf16 (checkpoint: "
        "False, this run: True). Load it with the configuration it was saved with, or give "
        "--no-load-optim to start the optimizer state afresh.")


@pytest.mark.slow
def test_a_resume_that_adds_the_distributed_optimizer_is_refused_at_start_up(resumed):
    """Through `megaseek pretrain`: one line, exit 2, before the model is built (Megatron
    fails at load with `ShardedTensor.flattened_range is not supported`)."""
    work = resumed.parent
    with pytest.raises(AssertionError) as failed:
        torchrun(["-m", "integration.pretrain"],
                 TINY_GPT + ["--train-iters", "4", "--load", "ckpt", "--ckpt-step", "2",
                             "--use-distributed-optimizer"], work, ranks=1)
    output = str(failed.value)
    assert "exited 2" in output
    errors = [line for line in output.splitlines() if line.startswith("megaseek: error:")]
    assert errors == [
        "megaseek: error: --load ckpt: the checkpoint's optimizer state was saved without "
        "--use-distributed-optimizer and this run has it: Megatron 0.19.2 loads neither into "
        "the other (nor with --dist-ckpt-optim-fully-reshardable or "
        "--ckpt-fully-parallel-load): resume without --use-distributed-optimizer, or give "
        "--no-load-optim to start the optimizer state afresh"]
    assert "Traceback" not in output and "building GPT model" not in output


@pytest.mark.slow
def test_a_run_that_saves_no_optimizer_or_rng_state_still_loads_them(resumed, tmp_path):
    """--no-save-optim and --no-save-rng are of the run's own saves: resumed with them, a
    run loads the checkpoint's optimizer state (and RNG state) as a plain resume does, and
    takes the same step (Megatron 0.19.2 left them out of what its load reads:
    KeyError 'params', and an exit with status 0 before training;
    `upstream.compat` 'load-reads-state-a-run-does-not-save')."""
    resume = TINY_GPT + ["--train-iters", "3", "--load", str(resumed), "--ckpt-step", "2",
                         "--save-interval", "3",
                         "--override-opt_param-scheduler"]  # this run's shorter schedule
    saved = {}
    for name, flags in (("plain", []), ("lean", ["--no-save-optim", "--no-save-rng"])):
        out = torchrun(["-m", "integration.pretrain"],
                       resume + flags + ["--save", str(tmp_path / name)], tmp_path, ranks=1)
        assert sorted(losses(out)) == [3]
        saved[name] = checkpoint_tensors(tmp_path / name, 3)
    assert not [key for key in saved["lean"] if key.startswith("optimizer.")]
    assert [key for key in saved["plain"] if key.startswith("optimizer.")]
    assert saved["lean"].keys() <= saved["plain"].keys()
    for key, weight in saved["lean"].items():  # the step taken with the loaded Adam state
        assert torch.equal(weight, saved["plain"][key]), key


# --- the tools verify the checksum manifest ------------------------------------------------------

@pytest.mark.slow
def test_the_checkpoint_tools_name_a_damaged_file(resumed, tmp_path, capsys):
    from integration.cli import main

    damaged = tmp_path / "ckpt"
    shutil.copytree(resumed, damaged)
    data = damaged / "iter_0000004" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:1000])  # truncated
    said = (f"megaseek: error: checkpoint {data.parent} is damaged: {data}: 1000 bytes, ")
    for argv, way_out in [
            (["ema-export", "--load", str(damaged), "--save", str(tmp_path / "ema")],
             "Give an earlier checkpoint (--ckpt-step N) or restore the file"),
            (["convert", "megatron-to-hf", str(damaged), str(tmp_path / "hf")],
             "Name an earlier iteration in its latest_checkpointed_iteration.txt or restore "
             "the file")]:
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(said) and err.count("\n") == 1, err
        assert err.endswith(f"(truncated or appended to); the load is refused. {way_out}\n")
    assert not (tmp_path / "ema").exists() and not (tmp_path / "hf").exists()
