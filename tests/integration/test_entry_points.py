"""How `megaseek` starts and refuses: configuration errors read like a command-line tool's
(one line, once, exit status 2, before Megatron's argument dump), an unknown command says
so, and `megaseek pretrain` without torchrun runs one rank instead of failing."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers.training_runs import TINY_GPT, losses, torchrun

ENV = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300)


def one_rank(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in ENV.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "integration.pretrain", *TINY_GPT, *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=dict(env, MEGASEEK_DATA_CACHE=str(tmp_path / "data")))


def test_unknown_command_is_named(tmp_path):
    done = run(["-m", "integration.cli", "frobnicate"], tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("megaseek: error: unknown command 'frobnicate'")


@pytest.mark.slow
def test_configuration_error_is_one_line_once_before_the_argument_dump(tmp_path):
    with pytest.raises(AssertionError) as failed:
        torchrun(["-m", "integration.pretrain"], TINY_GPT + ["--train-iters", "3",
                                                             "--plugins", "nosuch"], tmp_path,
                 launcher="torchrun")  # what a user sees: every rank's exit, torchrun's report
    output = str(failed.value)
    assert output.count("megaseek: error: --plugins: unknown plugin(s) nosuch") == 1
    assert "exitcode  : 2" in output  # every rank exits as argparse does
    assert "------------------------ arguments" not in output
    assert "Traceback" not in output.split("megaseek: error")[0]


@pytest.mark.slow
def test_pretrain_without_torchrun_runs_one_rank(tmp_path):
    done = one_rank(["--train-iters", "3"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "running one rank" in done.stderr
    assert sorted(losses(done.stdout + done.stderr)) == [1, 2, 3]


def test_one_rank_lets_its_store_bind_a_free_port(monkeypatch):
    """Without torchrun the only rank hosts the rendezvous store on a port it binds itself
    (MASTER_PORT 0): no port is picked, released and then bound, which another process
    could take in between (EADDRINUSE, seen once in a fresh try)."""
    import torch.distributed as dist

    from integration import pretrain

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in (
        "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")})
    pretrain.one_rank_without_torchrun()
    assert os.environ["MASTER_PORT"] == "0" and os.environ["WORLD_SIZE"] == "1"
    # torch's env:// rendezvous, as the default process group's start-up makes it: two at
    # once, each on a port of its own (no rank is started)
    first, rank, world_size = next(dist.rendezvous("env://"))
    second, _, _ = next(dist.rendezvous("env://"))
    assert (rank, world_size) == (0, 1)
    assert first.port > 0 and second.port > 0 and first.port != second.port
    first.set("key", "value")
    assert first.get("key") == b"value"


@pytest.mark.slow
def test_checkpoint_of_another_model_names_the_key_and_the_flags(tmp_path):
    saved = one_rank(["--train-iters", "3", "--save", "ckpt", "--save-interval", "3"], tmp_path)
    assert saved.returncode == 0, saved.stderr[-3000:]
    loaded = one_rank(["--train-iters", "4", "--load", "ckpt", "--plugins", "mla",
                       "--multi-latent-attention", "--kv-lora-rank", "16", "--qk-head-dim", "16",
                       "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16", "--rope-type", "rope"],
                      tmp_path)
    assert loaded.returncode == 2
    error = [line for line in loaded.stderr.splitlines() if line.startswith("megaseek: error")]
    assert len(error) == 1
    assert "the checkpoint has no 'decoder.layers." in error[0]
    assert "--plugins (checkpoint: (none), this run: mla)" in error[0]
    assert "--multi-latent-attention (checkpoint: False, this run: True)" in error[0]


# --- a resume that does not fit: one checkpoint (iterations 2 and 4, with the EMA) --------

EMA = ["--plugins", "ema", "--ema-decay", "0.9"]


@pytest.fixture(scope="module")
def ema_checkpoint(tmp_path_factory):
    """A folder whose 'ckpt' holds iterations 2 and 4 of a run with the EMA plugin."""
    folder = tmp_path_factory.mktemp("resume")
    saved = one_rank(["--train-iters", "4", "--save", "ckpt", "--save-interval", "2", *EMA],
                     folder)
    assert saved.returncode == 0, saved.stderr[-3000:]
    return folder


def refused(args: list[str], folder) -> str:
    """The one error line of a run that is refused (exit 2, no traceback)."""
    done = one_rank(args, folder)
    errors = [line for line in done.stderr.splitlines() if line.startswith("megaseek: error")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return errors[0]


@pytest.mark.slow
def test_a_resume_with_another_shape_names_the_key_and_the_flags(ema_checkpoint):
    error = refused(["--train-iters", "4", "--load", "ckpt", *EMA, "--hidden-size", "128"],
                    ema_checkpoint)
    assert re.search(r"--load ckpt: the checkpoint's '[\w.]+' has shape \((\d+, )?64\), this "
                     r"run's model needs \((\d+, )?128\)", error), error
    assert "--hidden-size (checkpoint: 64, this run: 128)" in error
    assert "--num-query-groups" not in error  # not given: Megatron fills it in as it trains


@pytest.mark.slow
def test_a_resume_with_another_lr_names_the_flag_and_the_way_out(ema_checkpoint):
    error = refused(["--train-iters", "4", "--load", "ckpt", *EMA, "--lr", "2e-3"],
                    ema_checkpoint)
    assert error == (
        "megaseek: error: --load ckpt: the checkpoint's optimizer state was saved with other "
        "learning-rate or weight-decay settings, which name its parameter groups (flags that "
        "differ: --lr (checkpoint: 0.001, this run: 0.002)): resume with the checkpoint's "
        "values, or give --no-load-optim to start the optimizer state and the learning-rate "
        "schedule afresh")


@pytest.mark.slow
def test_a_ckpt_step_not_saved_names_the_steps_saved(ema_checkpoint):
    error = refused(["--train-iters", "4", "--load", "ckpt", "--ckpt-step", "3", *EMA],
                    ema_checkpoint)
    assert error == "megaseek: error: --ckpt-step 3: no checkpoint of iteration 3 in ckpt " \
                    "(it has 2, 4)"


@pytest.mark.slow
def test_a_resume_without_the_ema_plugin_says_its_state_is_left(ema_checkpoint):
    done = one_rank(["--train-iters", "4", "--load", "ckpt", "--ckpt-step", "2"],
                    ema_checkpoint)
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout + done.stderr
    assert said.count("megaseek: warning: --load ckpt holds the state of --plugins ema, which "
                      "this run does not enable") == 1
    assert sorted(losses(said)) == [3, 4]


def test_megatron_argument_assertion_is_quoted_as_one_line(tmp_path):
    done = one_rank(["--train-iters", "3", "--num-layers-per-virtual-pipeline-stage", "1"],
                    tmp_path)
    assert done.returncode == 2
    error = [line for line in done.stderr.splitlines() if line.startswith("megaseek: error")]
    assert error == ["megaseek: error: Megatron's argument check failed: When interleaved "
                     "schedule is used, pipeline-model-parallel size should be greater than 1 "
                     "(--pipeline-model-parallel-size 1) (megatron/training/arguments.py:968)"]
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_fp16_trains_on_cpu(tmp_path):
    # --fp16 is honoured on a CUDA-less machine (Megatron's loss scaler allocates on
    # 'cuda': upstream.cpu gives its module the CPU as device), not refused or dropped.
    done = one_rank(["--train-iters", "6", "--fp16", "--initial-loss-scale", "256"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = losses(done.stdout + done.stderr)
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert logged[6] < logged[1]
    assert "loss scale: 256.0" in done.stdout + done.stderr


@pytest.mark.parametrize("rank", ["0", "1"])
def test_rank_0_reports_a_refusal_before_the_others_exit(rank, monkeypatch, capsys):
    """torchrun ends the job at the first rank's exit: the other ranks wait before they
    exit, so that the one error line, rank 0's, is printed (a rank 1 that exited first took
    it with it, under load in CI)."""
    from integration import hooks
    from plugins import PluginError

    slept = []
    monkeypatch.setattr(hooks.time, "sleep", slept.append)
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as exited:
        hooks.exit_refused(PluginError("--plugins: unknown plugin(s) nosuch"))
    assert exited.value.code == 2
    said = capsys.readouterr().err
    if rank == "0":
        assert said == "megaseek: error: --plugins: unknown plugin(s) nosuch\n" and not slept
    else:
        assert said == "" and slept == [hooks.RANK0_FIRST_S] and hooks.RANK0_FIRST_S >= 5


@pytest.mark.parametrize("argv, said", [
    ([], "usage: megaseek launch SCRIPT [MEGATRON AND PLUGIN ARGUMENTS]\n"
         "megaseek: error: launch: give the SCRIPT to run\n"),
    (["/nonexistent.py"], "megaseek: error: launch: no such script: /nonexistent.py\n"),
], ids=["no-script", "no-such-script"])
def test_launch_refuses_as_argparse_does(argv, said, capsys):
    from integration import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(["launch", *argv])
    assert exited.value.code == 2
    assert capsys.readouterr().err == said


@pytest.mark.parametrize("argv, said", [
    (["describe", "--num-layers", "x"], "argument --num-layers: invalid int value: 'x'"),
    (["convert", "megatron-to-hf", "CKPT"], "the following arguments are required: out"),
    (["ema-export", "--load", "CKPT"], "the following arguments are required: --save"),
    (["schedule", "--schedule", "gpipe"],  # Megatron's name is its alias
     "argument --schedule/--pipeline-schedule: invalid choice: 'gpipe'"),
    (["convert", "megatron-to-hf", "CKPT", "OUT", "--max-shard-size", "0"],
     "argument --max-shard-size: 0 must be 1KB or more"),
    (["convert", "megatron-to-hf", "CKPT", "OUT", "--max-shard-size", "12XB"],
     "argument --max-shard-size: '12XB' is not a size"),
], ids=["describe", "convert", "ema-export", "schedule", "shard-size-0", "shard-size-unit"])
def test_every_command_refuses_a_command_line_in_one_line(argv, said, capsys):
    """argparse's own refusals read as every other megaseek refusal: one line, exit 2."""
    from integration import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megaseek: error: {said}") and err.count("\n") == 1


def test_pretrain_help_lists_megatrons_and_the_plugins_flags(capsys):
    """`megaseek pretrain --help` prints the flags a run parses (Megatron's, whose own
    --help fails on a '%' in one text, and the plugins'), and succeeds."""
    from integration import cli

    cli.main(["pretrain", "--preset", "tiny", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: megaseek pretrain [--preset NAME]")
    for flag in ("--num-layers", "--moe-paged-stash-buffer-size-factor-cuda", "--plugins",
                 "--ema-decay", "--fp8-exclude-modules", "--pipeline-schedule"):
        assert f"\n  {flag}" in out, flag


def test_launch_help_prints_the_usage(capsys):
    from integration import cli

    cli.main(["launch", "--help"])
    assert capsys.readouterr().out.startswith(
        "usage: megaseek launch SCRIPT [MEGATRON AND PLUGIN ARGUMENTS]")


@pytest.mark.parametrize("content, said", [
    ('{"not": "python",\n', "is not a Python script (SyntaxError at line 1: "),
    ("\0\1binary", "is not a Python script (source code string cannot contain null bytes)"),
    (None, "is a folder: give the Python script to run"),
], ids=["json", "binary", "folder"])
def test_launch_refuses_a_script_that_is_not_python(content, said, tmp_path, capsys):
    from integration import cli

    script = tmp_path / "script"
    if content is None:
        script.mkdir()
    else:
        script.write_text(content)
    with pytest.raises(SystemExit) as exited:
        cli.main(["launch", str(script), "--preset", "tiny"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith(f"megaseek: error: launch: {script} {said}")
