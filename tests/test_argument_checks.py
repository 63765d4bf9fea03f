"""megaseek's start-up checks on Megatron's own flags (integration.argument_checks): each
input Megatron 0.19.2 lets through and then fails on late (or with a raw traceback) is
refused at start-up, naming the flag; and Megatron's own validation still lets each one
through (else the check would be dead weight). Megatron's failed checks are said in words
(upstream.argument_words), a resume with another learning-rate schedule names the flags,
and a command line argparse refuses is one line on rank 0 (end to end, on 2 ranks)."""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import io
import sys
from pathlib import Path

import pytest
import torch

import integration  # noqa: F401  (megatron.training on Python 3.11)
from integration import argument_checks
from plugins import PluginError, default_registry
from tests.training_runs import TINY_GPT, torchrun
from upstream import cpu

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "1",
        "--global-batch-size", "4", "--lr", "1e-3", "--min-lr", "1e-4",
        "--train-iters", "10", "--eval-interval", "5", "--eval-iters", "1",
        "--position-embedding-type", "rope"]


def command_line(extra: list[str], dropped: tuple[str, ...] = ()) -> list[str]:
    """BASE less the `dropped` flags (and their values), then `extra`, then the CPU flags
    `megaseek pretrain` adds (gloo, local modules) where the line does not give them."""
    kept, skipping = [], False
    for arg in BASE:
        if arg.startswith("--"):
            skipping = arg in dropped
        if not skipping:
            kept.append(arg)
    return cpu.with_cpu_arguments(kept + extra)


def parsed(argv: list[str], monkeypatch, world_size: int = 2) -> argparse.Namespace:
    from megatron.training.arguments import parse_args

    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setattr(sys, "argv", ["pretrain", *argv])
    return parse_args(extra_args_provider=default_registry().add_arguments)


def megatron_validates(args: argparse.Namespace) -> None:
    from megatron.training.arguments import validate_args

    with contextlib.redirect_stdout(io.StringIO()):  # its argument dump
        validate_args(args, {})


def start_up_refusal(argv: list[str], monkeypatch) -> str | None:
    """What megaseek's checks say about `argv`, in the order a run meets them (before
    Megatron's validation, after it, the plugins'), or None."""
    args = parsed(argv, monkeypatch)
    try:
        argument_checks.before_megatron(args, argv)
        megatron_validates(args)
        argument_checks.after_megatron(args)
        default_registry().enabled(args)
    except PluginError as error:
        return str(error)
    return None


def test_a_valid_command_line_passes(monkeypatch):
    assert start_up_refusal(command_line([]), monkeypatch) is None


# (extra flags, flags dropped from BASE, what the error must say). Each failed after
# start-up before (see integration/argument_checks.py for where).
REFUSED = {
    "ep-larger-than-world": (["--num-experts", "4", "--expert-model-parallel-size", "4"], (),
                             "--expert-model-parallel-size 4 does not fit the 2 ranks"),
    "seq-length-0": (["--seq-length", "0"], (), "--seq-length 0 must be 1 or more"),
    "eval-interval-0": (["--eval-interval", "0"], (), "--eval-interval 0 must be 1 or more"),
    "log-interval-0": (["--log-interval", "0"], (), "--log-interval 0 must be 1 or more"),
    "num-layers-0": (["--num-layers", "0"], (), "--num-layers 0 must be 1 or more"),
    "eval-iters-without-eval-interval": (["--eval-iters", "3"], ("--eval-interval",),
                                         "give --eval-interval N: Megatron evaluates "
                                         "--eval-iters 3 batches every N iterations"),
    "no-lr": ([], ("--lr", "--min-lr"), "give --lr"),
    "warmup-not-below-train-iters": (["--lr-warmup-iters", "10"], (),
                                     "--lr-warmup-iters 10 must be below the decay's 10 "
                                     "(--train-iters, as --lr-decay-iters is not given)"),
    "warmup-not-below-decay-iters": (["--lr-warmup-iters", "6", "--lr-decay-iters", "6"], (),
                                     "--lr-warmup-iters 6 must be below the decay's 6 "
                                     "(--lr-decay-iters)"),
    "train-iters-0": (["--train-iters", "0"], (), "--train-iters 0 must be 1 or more"),
    "mtp-num-layers-negative": (["--mtp-num-layers", "-1"], (),
                                "--mtp-num-layers -1 must be 0 or more"),
    "mtp-loss-scaling-negative": (["--mtp-num-layers", "1", "--mtp-loss-scaling-factor",
                                   "-0.1"], (), "--mtp-loss-scaling-factor -0.1 must be 0 or "
                                                "more (and finite)"),
    "mtp-loss-scaling-nan": (["--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "nan"], (),
                             "--mtp-loss-scaling-factor nan must be 0 or more (and finite)"),
    "mtp-loss-scaling-inf": (["--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "inf"], (),
                             "--mtp-loss-scaling-factor inf must be 0 or more (and finite)"),
    "mtp-loss-scaling-without-mtp": (["--mtp-loss-scaling-factor", "0.3"], (),
                                     "--mtp-loss-scaling-factor 0.3 weighs the MTP loss, and "
                                     "there is none: give --mtp-num-layers N"),
    "clip-grad-negative": (["--clip-grad", "-1"], (), "--clip-grad -1.0 must be 0 or more"),
    "spec-without-that-function": (["--spec", "integration.deepseek_v3", "no_such_spec"], (),
                                   "--spec integration.deepseek_v3 no_such_spec: "
                                   "integration.deepseek_v3 has no 'no_such_spec'"),
    "spec-module-missing": (["--spec", "no_such_module", "decoder_spec"], (),
                            "--spec no_such_module decoder_spec: cannot import no_such_module"),
    "tensorboard-dir-under-a-file": (["--tensorboard-dir", "{file}/tensorboard"], (),
                                     "--tensorboard-dir {file}/tensorboard: {file} is a file, "
                                     "not a folder"),
    "tensorboard-dir-read-only": (["--tensorboard-dir", "/proc/megaseek-tensorboard"], (),
                                  "--tensorboard-dir /proc/megaseek-tensorboard: cannot write "
                                  "in /proc"),
}
if not torch.cuda.is_available():
    REFUSED["nccl-without-cuda"] = (["--distributed-backend", "nccl"], (),
                                    "--distributed-backend nccl needs CUDA GPUs")


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("")
    return str(path)


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_at_start_up_naming_the_flag(case, a_file, monkeypatch):
    extra, dropped, said = REFUSED[case]
    got = start_up_refusal(command_line([a.format(file=a_file) for a in extra], dropped),
                           monkeypatch)
    assert got is not None and got.startswith(said.format(file=a_file)), got


@pytest.mark.parametrize("case", [c for c in REFUSED if c != "mtp-num-layers-negative"])
def test_megatron_alone_lets_it_through(case, a_file, monkeypatch):
    """Megatron's own validation accepts each input the checks refuse: the failure came
    later (its scheduler, its training loop, its data workers, its process groups). A
    negative --mtp-num-layers Megatron does refuse, but by another flag's name (below)."""
    extra, dropped, _ = REFUSED[case]
    megatron_validates(parsed(command_line([a.format(file=a_file) for a in extra], dropped),
                              monkeypatch))


def test_megatron_misreads_a_negative_mtp_depth(monkeypatch):
    args = parsed(command_line(["--mtp-num-layers", "-1", "--position-embedding-type",
                                "learned_absolute"]), monkeypatch)
    with pytest.raises(AssertionError) as refused:
        megatron_validates(args)
    assert "--mtp-num-layers" not in str(refused.value)  # it blames the position embedding


@pytest.mark.parametrize("extra", [
    ["--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "0"],
    ["--clip-grad", "0"],  # Megatron's "no clipping"
    ["--lr-warmup-iters", "9"],
    ["--lr-warmup-fraction", "0.5", "--lr-warmup-iters", "0"],
    ["--tensorboard-dir", "{tmp}/not/yet/made"],
    ["--spec", "integration.deepseek_v3", "decoder_spec"],
    ["--num-experts", "4", "--expert-model-parallel-size", "2"],
])
def test_the_edges_are_accepted(extra, tmp_path, monkeypatch):
    argv = command_line([a.format(tmp=tmp_path) for a in extra])
    assert start_up_refusal(argv, monkeypatch) is None
    assert not (tmp_path / "not").exists()  # a folder is checked, not made


def test_a_run_that_may_not_train_needs_no_training_flags(monkeypatch):
    """A launch script may only build the model: without a training length, the flags
    only training reads are not asked for. `megaseek pretrain` always trains."""
    from integration import pretrain

    argv = command_line([], ("--train-iters", "--lr", "--min-lr", "--eval-interval"))
    assert start_up_refusal(argv, monkeypatch) is None
    with pytest.raises(PluginError, match=r"give --train-iters N \(or --train-samples N\)"):
        pretrain.check_training_length(argv)
    pretrain.check_training_length(argv + ["--train-samples", "100"])


def test_a_presets_mtp_loss_weight_goes_with_its_mtp_layers():
    from integration import presets

    argv = presets.expand(["--preset", "deepseek-v3", "--mtp-num-layers", "0"], announce=False)
    assert "--mtp-loss-scaling-factor" not in argv


def test_the_built_in_corpus_needs_a_vocabulary_that_holds_its_ids(tmp_path, monkeypatch):
    from integration import pretrain

    monkeypatch.setenv("MEGASEEK_DATA_CACHE", str(tmp_path))
    with pytest.raises(PluginError, match=r"--vocab-size 200 is smaller than the built-in "
                                          r"corpus's 257 token ids.*--vocab-size 257 or more"):
        pretrain.with_defaults(["--tokenizer-type", "NullTokenizer", "--vocab-size", "200"])
    assert not list(tmp_path.iterdir())  # refused before the corpus was written
    argv = pretrain.with_defaults(["--tokenizer-type", "NullTokenizer", "--vocab-size", "257"])
    assert "--data-path" in argv


@pytest.mark.slow
def test_a_data_path_with_ids_past_the_vocabulary_fails_at_its_first_batch(tmp_path):
    """Not known at start-up (the largest id of a --data-path is in no index): the first
    micro-batch that holds one names it and --vocab-size, instead of an IndexError in the
    embedding. The built-in corpus's bytes: lower-case letters are ids 97-122."""
    from integration.corpus import build_byte_corpus

    data = build_byte_corpus(tmp_path / "data")
    with pytest.raises(AssertionError) as failed:
        torchrun(["-m", "integration.pretrain"], TINY_GPT + [
            "--train-iters", "3", "--data-path", data, "--split", "90,5,5", "--tokenizer-type",
            "NullTokenizer", "--vocab-size", "96", "--make-vocab-size-divisible-by", "32"],
            tmp_path, ranks=1)
    output = str(failed.value)
    assert "outside the model's vocabulary of 96 (--vocab-size 96, padded to a multiple of " \
           "--make-vocab-size-divisible-by 32 x TP): give a --vocab-size above" in output
    assert "IndexError" not in output and "Traceback" not in output
    assert output.count("megaseek: error: rank 0: the data holds token id") == 1


# --- Megatron's own checks, in words ------------------------------------------------------

def _bare_asserts_of_validate_args() -> list[str]:
    from megatron.training import arguments

    tree = ast.parse(inspect.getsource(arguments.validate_args))
    return [ast.unparse(node.test) for node in ast.walk(tree)
            if isinstance(node, ast.Assert) and node.msg is None]


def test_every_bare_assert_of_validate_args_is_said_in_words():
    """If a Megatron upgrade adds one, it gets the generic wording until it is added."""
    from upstream.argument_words import WORDS

    bare = _bare_asserts_of_validate_args()
    assert len(bare) >= 20 and set(bare) <= set(WORDS)


@pytest.mark.parametrize("extra, said", [
    (["--fp16", "--bf16"], "Megatron's argument check failed: --fp16 and --bf16 both given: "
                           "choose one (megatron/training/arguments.py:"),
    (["--hidden-size", "66"], "Megatron's argument check failed: --hidden-size 66 is not "
                              "divisible by --num-attention-heads 4"),
    (["--min-lr", "1"], "Megatron's argument check failed: --min-lr 1.0 is above --lr 0.001"),
    # a message that names no flag gets the flags of its condition
    (["--train-samples", "100"], "Megatron's argument check failed: expected iteration-based "
                                 "training (--train-samples 100) "),
    # a required flag left out ('hidden_size argument is None')
    (["drop"], "Megatron's argument check failed: give --hidden-size (Megatron requires it)"),
])
def test_megatrons_failed_checks_name_the_flags(extra, said, monkeypatch):
    from upstream import seams
    from upstream.patching import Patcher

    args = parsed(command_line(extra[1:] if extra[0] == "drop" else extra,
                               ("--hidden-size",) if extra[0] == "drop" else ()), monkeypatch)
    patcher = Patcher()
    seams.checks_before_argument_dump(lambda args: None).apply(patcher)
    try:
        with pytest.raises(seams.MegatronRefused) as refused:
            megatron_validates(args)
    finally:
        patcher.undo()
    assert str(refused.value).startswith(said)


def test_a_bare_condition_without_words_names_its_flags():
    from upstream.argument_words import in_words

    args = argparse.Namespace(expert_tensor_parallel_size=2, use_megatron_fsdp=True)
    assert in_words("args.expert_tensor_parallel_size == 1 or not args.use_megatron_fsdp", "",
                    args) == ("`args.expert_tensor_parallel_size == 1 or not "
                              "args.use_megatron_fsdp` does not hold for "
                              "--expert-tensor-parallel-size 2, --use-megatron-fsdp")


# --- a resume with another learning-rate schedule -------------------------------------------

def test_a_changed_schedule_at_load_names_the_value_and_the_flags(monkeypatch):
    """Megatron's own scheduler, loading the state of one built for half the iterations."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from upstream import seams
    from upstream.patching import Patcher

    def scheduler(decay_steps: int, **flags) -> OptimizerParamScheduler:
        """As training.py:1941 builds it, with Megatron's default flags."""
        flags = {"use_checkpoint_opt_param_scheduler": False,
                 "override_opt_param_scheduler": False, **flags}
        weights = torch.nn.Linear(2, 2)
        return OptimizerParamScheduler(
            torch.optim.SGD(weights.parameters(), lr=1e-3), init_lr=0.0, max_lr=1e-3,
            min_lr=1e-4, lr_warmup_steps=2, lr_decay_steps=decay_steps,
            lr_decay_style="cosine", start_wd=0.0, end_wd=0.0, wd_incr_steps=decay_steps,
            wd_incr_style="constant", **flags)

    saved = scheduler(40).state_dict()
    monkeypatch.setattr("megatron.training.get_args", lambda: argparse.Namespace(load="ckpt"))
    patcher = Patcher()
    seams.scheduler_mismatch_named().apply(patcher)
    try:
        with pytest.raises(seams.CheckpointMismatch) as refused:
            scheduler(80).load_state_dict(saved)
        resumed = scheduler(80, override_opt_param_scheduler=True)
        resumed.load_state_dict(saved)  # the flags it names do settle it
        assert resumed.lr_decay_steps == 80
    finally:
        patcher.undo()
    assert str(refused.value) == (
        "--load ckpt: the checkpoint's learning-rate schedule has total number of iterations "
        "40, this run 80 (from --lr-decay-iters, or --train-iters where --lr-decay-iters is not "
        "given (counted in samples: x --global-batch-size)): give --override-opt_param-scheduler "
        "to use this run's values, or --use-checkpoint-opt_param-scheduler to keep the "
        "checkpoint's")


# --- end to end: one line, on rank 0, exit status 2 ----------------------------------------

RELEASE_SCRIPT = str(Path(__file__).parent / "launch_scripts" / "release" / "pretrain_gpt.py")
MOCK_DATA = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128"]


@pytest.mark.parametrize("entry, extra, said", [
    (["-m", "integration.pretrain"], ["--seq-length", "abc"],
     "megaseek: error: argument --seq-length: invalid int value: 'abc'"),
    (["-m", "integration.pretrain"], ["--eval-interval", "0"],
     "megaseek: error: --eval-interval 0 must be 1 or more"),
    # an unmodified launch script (Megatron-LM's release pretrain_gpt.py)
    (["-m", "integration.launch", RELEASE_SCRIPT], [*MOCK_DATA, "--log-interval", "0"],
     "megaseek: error: --log-interval 0 must be 1 or more"),
], ids=["argparse", "start-up-check", "launcher-start-up-check"])
def test_a_refusal_is_one_line_on_rank_0_with_exit_status_2(entry, extra, said, tmp_path):
    with pytest.raises(AssertionError) as failed:
        torchrun(entry, TINY_GPT + ["--train-iters", "3", *extra], tmp_path)
    output = str(failed.value)
    assert "rank 0 exited 2" in output  # rank 1 waits: rank 0 reports first
    assert output.count("megaseek: error:") == 1 and said in output
    assert "usage:" not in output and "Traceback" not in output


@pytest.mark.slow
def test_a_resume_with_another_train_iters_names_the_scheduler_flags(tmp_path):
    saved = torchrun(["-m", "integration.pretrain"],
                     TINY_GPT + ["--train-iters", "3", "--save", "ckpt", "--save-interval", "3"],
                     tmp_path, ranks=1)
    assert "saved checkpoint" in saved
    with pytest.raises(AssertionError) as failed:
        torchrun(["-m", "integration.pretrain"],
                 TINY_GPT + ["--train-iters", "6", "--load", "ckpt"], tmp_path, ranks=1)
    output = str(failed.value)
    errors = [line for line in output.splitlines() if line.startswith("megaseek: error:")]
    assert errors == [
        "megaseek: error: --load ckpt: the checkpoint's learning-rate schedule has total number "
        "of iterations 24, this run 48 (from --lr-decay-iters, or --train-iters where "
        "--lr-decay-iters is not given (counted in samples: x --global-batch-size)): give "
        "--override-opt_param-scheduler to use this run's values, or "
        "--use-checkpoint-opt_param-scheduler to keep the checkpoint's"]
    assert "rank 0 exited 2" in output and "Traceback" not in output

