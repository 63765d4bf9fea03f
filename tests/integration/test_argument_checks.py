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
import importlib.util
import inspect
import io
import sys

import pytest
import torch

import integration  # noqa: F401  (megatron.training on Python 3.11)
from integration import argument_checks
from plugins import PluginError, default_registry
from tests.helpers.paths import RELEASE_SCRIPT as RELEASE_SCRIPT_PATH
from tests.helpers.training_runs import TINY_GPT, torchrun
from tests.plugins.moe.test_plugin import MOE
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
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # as `megaseek pretrain` sets it
    monkeypatch.setattr(sys, "argv", ["pretrain", *argv])
    return parse_args(extra_args_provider=default_registry().add_arguments)


def megatron_validates(args: argparse.Namespace) -> None:
    """Megatron's `validate_args`, with the CPU fixes a run has (it asks the GPU's
    architecture under tensor parallelism)."""
    from megatron.training.arguments import validate_args

    fixes = cpu.install()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its argument dump
            validate_args(args, {})
    finally:
        if fixes is not None:
            fixes.undo()


def start_up_refusal(argv: list[str], monkeypatch) -> str | None:
    """What megaseek's checks say about `argv`, in the order a run meets them (before
    Megatron's validation: megaseek's, then the plugins' as the run plan is made; after
    it), or None."""
    args = parsed(argv, monkeypatch)
    try:
        argument_checks.before_megatron(args, argv)
        default_registry().plan(args).apply_overrides(args)
        megatron_validates(args)
        argument_checks.after_megatron(args)
    except PluginError as error:
        return str(error)
    return None


def test_a_valid_command_line_passes(monkeypatch):
    assert start_up_refusal(command_line([]), monkeypatch) is None


NULL_TOKENIZER = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "257"]

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
    "rotary-base-0": (["--rotary-base", "0"], (), "--rotary-base 0 must be above 0"),
    "norm-epsilon-negative": (["--norm-epsilon", "-1"], (),
                              "--norm-epsilon -1.0 must be above 0"),
    "norm-epsilon-0": (["--norm-epsilon", "0"], (), "--norm-epsilon 0.0 must be above 0"),
    "seed-negative": (["--seed", "-1"], (), "--seed -1 must be 0 or more"),
    "full-recompute-without-method": (["--recompute-granularity", "full"], (),
                                      "--recompute-granularity full needs --recompute-method"),
    "recompute-method-without-full": (["--recompute-method", "uniform"], (),
                                      "--recompute-method uniform applies to "
                                      "--recompute-granularity full only"),
    # numbers outside their domain: torch fails once the model or the optimizer is built
    "hidden-size-negative": (["--hidden-size", "-128"], (), "--hidden-size -128 must be 1 or "
                                                            "more"),
    "heads-negative": (["--num-attention-heads", "-4"], (),
                       "--num-attention-heads -4 must be 1 or more"),
    "ffn-hidden-size-0": (["--ffn-hidden-size", "0"], (), "--ffn-hidden-size 0 must be 1 or "
                                                          "more"),
    "num-experts-0": (["--num-experts", "0"], (), "--num-experts 0 must be 1 or more"),
    "weight-decay-negative": (["--weight-decay", "-1"], (),
                              "--weight-decay -1.0 must be 0 or more (and finite)"),
    "adam-beta1-above-1": (["--adam-beta1", "1.5"], (), "--adam-beta1 1.5 must be in [0, 1)"),
    "adam-beta2-1": (["--adam-beta2", "1"], (), "--adam-beta2 1.0 must be in [0, 1)"),
    "adam-eps-0": (["--adam-eps", "0"], (), "--adam-eps 0.0 must be above 0 (and finite)"),
    "sgd-momentum-negative": (["--optimizer", "sgd", "--sgd-momentum", "-0.5"], (),
                              "--sgd-momentum -0.5 must be in [0, 1)"),
    "hidden-dropout-above-1": (["--hidden-dropout", "1.5"], (),
                               "--hidden-dropout 1.5 must be in [0, 1]"),
    "attention-dropout-negative": (["--attention-dropout", "-0.1"], (),
                                   "--attention-dropout -0.1 must be in [0, 1]"),
    "init-method-std-negative": (["--init-method-std", "-0.02"], (),
                                 "--init-method-std -0.02 must be 0 or more (and finite)"),
    "eval-iters-negative": (["--eval-iters", "-1"], (), "--eval-iters -1 must be 0 or more"),
    "lr-nan": (["--lr", "nan"], (), "--lr nan must be 0 or more (and finite)"),
    "lr-warmup-init-negative": (["--lr-warmup-iters", "2", "--lr-warmup-init", "-0.1"], (),
                                "--lr-warmup-init -0.1 must be 0 or more (and finite)"),
    "decoupled-lr-negative": (["--decoupled-lr=-1e-3"], (),
                              "--decoupled-lr -0.001 must be 0 or more (and finite)"),
    "lr-warmup-iters-negative": (["--lr-warmup-iters", "-2"], (),
                                 "--lr-warmup-iters -2 must be 0 or more"),
    # fp16's loss scaler asserts these when the optimizer is built, after the model
    "loss-scale-negative": (["--fp16", "--loss-scale", "-1"], (),
                            "--loss-scale -1.0 must be above 0 (and finite)"),
    "loss-scale-0": (["--bf16", "--loss-scale", "0"], (),
                     "--loss-scale 0.0 must be above 0 (and finite)"),
    "initial-loss-scale-0": (["--fp16", "--initial-loss-scale", "0"], (),
                             "--initial-loss-scale 0.0 must be above 0 (and finite)"),
    "min-loss-scale-0": (["--fp16", "--min-loss-scale", "0"], (),
                         "--min-loss-scale 0.0 must be above 0 (and finite)"),
    "min-loss-scale-above-initial": (["--fp16", "--min-loss-scale", "64",
                                      "--initial-loss-scale", "32"], (),
                                     "--min-loss-scale 64.0 is above --initial-loss-scale "
                                     "32.0"),
    "loss-scale-window-0": (["--fp16", "--loss-scale-window", "0"], (),
                            "--loss-scale-window 0.0 must be 1 or more (and finite)"),
    "hysteresis-0": (["--fp16", "--hysteresis", "0"], (), "--hysteresis 0 must be 1 or more"),
    "precision-aware-optimizer-alone": (["--use-precision-aware-optimizer"], (),
                                        "--use-precision-aware-optimizer works with the "
                                        "distributed optimizer only: add "
                                        "--use-distributed-optimizer"),
    # Megatron derives the expert TP size, then its weight shards, from the model's TP size
    "moe-experts-under-tensor-parallelism": ([*MOE, "--tensor-model-parallel-size", "2"], (),
                                             "--plugins moe: experts are not tensor-parallel, "
                                             "and --expert-tensor-parallel-size follows "
                                             "--tensor-model-parallel-size 2 where it is not "
                                             "given: give --expert-tensor-parallel-size 1"),
    # the decoder's layers, as the MoE pattern and the pipeline stages lay them out
    "moe-layer-freq-longer-than-the-model": (["--num-experts", "4", "--moe-layer-freq",
                                              "[0,1,1]"], (),
                                             "--moe-layer-freq has 3 entries for --num-layers 2"),
    "moe-layer-freq-0": (["--num-experts", "4", "--moe-layer-freq", "0"], (),
                         "--moe-layer-freq 0 must be 1 or more"),
    "moe-layer-freq-not-0-or-1": (["--num-experts", "4", "--moe-layer-freq", "[0,2]"], (),
                                  "--moe-layer-freq holds 2: each entry is 0"),
    "first-stage-larger-than-the-model": (["--pipeline-model-parallel-size", "2",
                                           "--decoder-first-pipeline-num-layers", "5"], (),
                                          "--decoder-first-pipeline-num-layers 5: more than "
                                          "--num-layers 2, leaving none for the other 1"),
    "last-stage-takes-every-layer": (["--pipeline-model-parallel-size", "2",
                                      "--decoder-last-pipeline-num-layers", "2"], (),
                                     "--decoder-last-pipeline-num-layers 2: 0 of "
                                     "--num-layers 2 left for the other 1"),
    "first-and-last-short-of-the-model": (["--num-layers", "4", "--pipeline-model-parallel-size",
                                           "2", "--decoder-first-pipeline-num-layers", "1",
                                           "--decoder-last-pipeline-num-layers", "1"], (),
                                          "--decoder-first-pipeline-num-layers 1 and "
                                          "--decoder-last-pipeline-num-layers 1 must add up to "
                                          "--num-layers 4"),
    "embedding-in-the-split-uneven": (["--pipeline-model-parallel-size", "2",
                                       "--account-for-embedding-in-pipeline-split"], (),
                                      "--num-layers 2 + 1 for "
                                      "--account-for-embedding-in-pipeline-split = 3 layers "
                                      "must divide evenly over --pipeline-model-parallel-size 2 "
                                      "stages: change --num-layers, or drop "
                                      "--account-for-embedding-in-pipeline-split"),
    "lr-negative": (["--lr=-1e-3"], (), "--lr -0.001 must be 0 or more (and finite)"),
    # Megatron's words name values the user did not give (eval_global_batch_size, world_size)
    "global-batch-not-a-multiple": (["--global-batch-size", "3", "--micro-batch-size", "2"], (),
                                    "--global-batch-size 3 must be a multiple of "
                                    "--micro-batch-size 2 x the 2 data-parallel replicas (the "
                                    "2 ranks of the run / --tensor-model-parallel-size 1 x "
                                    "--pipeline-model-parallel-size 1 x --context-parallel-size "
                                    "1) = 4"),
    "micro-batch-too-large": (["--micro-batch-size", "4"], (),
                              "--global-batch-size 4 must be a multiple of --micro-batch-size "
                              "4 x the 2 data-parallel replicas"),
    "eval-batch-not-a-multiple": (["--eval-micro-batch-size", "3"], (),
                                  "the evaluation batch, --global-batch-size (as "
                                  "--eval-global-batch-size is not given) 4, must be a multiple "
                                  "of --eval-micro-batch-size 3 x the 2 data-parallel replicas"),
    "pipeline-larger-than-world": (["--pipeline-model-parallel-size", "4"], (),
                                   "--tensor-model-parallel-size 1 x "
                                   "--pipeline-model-parallel-size 4 x --context-parallel-size "
                                   "1 = 4 must divide the 2 ranks of the run"),
    # data: Megatron builds its tokenizer and opens the files only once the model is built
    "data-path-without-tokenizer": (["--data-path", "{file}"], (),
                                    "--data-path needs --tokenizer-type"),
    "data-path-not-a-prefix": (["--data-path", "{file}", *NULL_TOKENIZER], (),
                               "--data-path {file}: no {file}.idx or {file}.bin"),
    "data-path-weighted-pairs": (["--data-path", "0.3", "{prefix}", "0.7", "{file}",
                                  *NULL_TOKENIZER], (),
                                 "--data-path {file}: no {file}.idx or {file}.bin"),
    "data-path-a-folder": (["--data-path", "{folder}", *NULL_TOKENIZER], (),
                           "--data-path {folder}: no {folder}.idx or {folder}.bin"),
    "data-path-idx-a-folder": (["--data-path", "{idx_folder}", *NULL_TOKENIZER], (),
                               "--data-path {idx_folder}: {idx_folder}.idx is a folder, not a "
                               "file"),
    "train-data-path-missing": (["--train-data-path", "{folder}/none", "--valid-data-path",
                                 "{prefix}", "--test-data-path", "{prefix}", *NULL_TOKENIZER],
                                (), "--train-data-path {folder}/none: no {folder}/none.idx or "
                                    "{folder}/none.bin"),
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
    # grouped-query attention: Megatron's attention reshapes by it in the first forward
    "heads-not-divisible-by-query-groups": (["--group-query-attention", "--num-query-groups",
                                             "3"], (), "--num-attention-heads 4 is not "
                                                       "divisible by --num-query-groups 3"),
    "query-groups-not-fitting-tp": (["--num-attention-heads", "6", "--kv-channels", "16",
                                     "--tensor-model-parallel-size", "2",
                                     "--group-query-attention", "--num-query-groups", "3"], (),
                                    "--num-query-groups 3 must be a multiple or a divisor of "
                                    "--tensor-model-parallel-size 2"),
    "query-groups-without-gqa": (["--num-query-groups", "2"], (),
                                 "--num-query-groups 2: read only with "
                                 "--group-query-attention"),
    "query-groups-with-mla": (["--multi-latent-attention", "--num-query-groups", "2"], (),
                              "--num-query-groups 2: --multi-latent-attention has no "
                              "key/value groups"),
    # flags Megatron reads nowhere, or turns off
    "rampup-batch-size": (["--rampup-batch-size", "1", "1", "100"], (),
                          "--rampup-batch-size 1 1 100 is ignored by Megatron 0.19.2"),
    "rampup-batch-size-by-samples": (["--rampup-batch-size", "2", "2", "100",
                                      "--train-samples", "40"], ("--train-iters",),
                                     "--rampup-batch-size 2 2 100 is ignored by Megatron "
                                     "0.19.2"),
    "sequence-parallel-without-tp": (["--sequence-parallel"], (),
                                     "--sequence-parallel splits the sequence over the "
                                     "tensor-parallel ranks and this run has "
                                     "--tensor-model-parallel-size 1"),
    "defer-embedding-wgrad-with-local-modules": (
        ["--defer-embedding-wgrad-compute", "--pipeline-model-parallel-size", "2"], (),
        "--defer-embedding-wgrad-compute needs Transformer Engine's linears"),
    "defer-embedding-wgrad-without-pipeline": (
        ["--defer-embedding-wgrad-compute", "--transformer-impl", "transformer_engine"], (),
        "--defer-embedding-wgrad-compute defers the embedding's gradient past the pipeline's "
        "last backward and needs --pipeline-model-parallel-size 2 or more"),
    "defer-embedding-wgrad-without-fusion": (  # CPU runs: --no-gradient-accumulation-fusion
        ["--defer-embedding-wgrad-compute", "--transformer-impl", "transformer_engine",
         "--pipeline-model-parallel-size", "2"], (),
        "--defer-embedding-wgrad-compute needs gradient accumulation fusion: drop "
        "--no-gradient-accumulation-fusion"),
    "wgrad-deferral-limit-without-deferral": (
        ["--wgrad-deferral-limit", "2"], (),
        "--wgrad-deferral-limit 2 limits what --defer-embedding-wgrad-compute defers"),
    **{f"attention-backend-{backend}-with-local-modules": (
        ["--attention-backend", backend], (),
        f"--attention-backend {backend} chooses Transformer Engine's attention kernel, and "
        "--transformer-impl local builds Megatron's own attention")
       for backend in ("flash", "fused", "unfused")},
    # the WSD schedule: OptimizerParamScheduler asserts it once the model is built
    "wsd-without-decay-iters": (["--lr-decay-style", "WSD"], (),
                                "--lr-decay-style WSD needs --lr-wsd-decay-iters N"),
    "wsd-without-decay-samples": (["--lr-decay-style", "WSD", "--train-samples", "40"],
                                  ("--train-iters",),
                                  "--lr-decay-style WSD needs --lr-wsd-decay-samples N"),
    "wsd-samples-in-an-iteration-run": (["--lr-decay-style", "WSD", "--lr-wsd-decay-samples",
                                         "4"], (), "--lr-wsd-decay-samples is for "
                                                   "--train-samples runs; this one counts "
                                                   "--train-iters: give --lr-wsd-decay-iters"),
    "wsd-decay-longer-than-the-decay": (["--lr-decay-style", "WSD", "--lr-wsd-decay-iters",
                                         "11"], (), "--lr-wsd-decay-iters 11 must be in "
                                                    "[1, 10]"),
    "wsd-decay-0": (["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "0"], (),
                    "--lr-wsd-decay-iters 0 must be in [1, 10]"),
    "wsd-flag-without-wsd": (["--lr-wsd-decay-iters", "5"], (),
                             "--lr-wsd-decay-iters applies to --lr-decay-style WSD only (this "
                             "run: linear)"),
    "wsd-style-without-wsd": (["--lr-decay-style", "cosine", "--lr-wsd-decay-style", "linear"],
                              (), "--lr-wsd-decay-style applies to --lr-decay-style WSD only"),
    # tokenizers: Megatron opens their files (or downloads them) only when it builds them
    "bert-vocab-file-missing": (["--tokenizer-type", "BertWordPieceCase", "--vocab-file",
                                 "{folder}/vocab.txt"], (),
                                "--vocab-file {folder}/vocab.txt: no such file"),
    "sentencepiece-without-model": (["--tokenizer-type", "GPTSentencePieceTokenizer"], (),
                                    "--tokenizer-type GPTSentencePieceTokenizer needs "
                                    "--tokenizer-model"),
    "tiktoken-model-missing": (["--tokenizer-type", "TikTokenizer", "--tokenizer-model",
                                "{folder}/none.json"], (),
                               "--tokenizer-model {folder}/none.json: no such file"),
    "vocab-file-unread": (["--tokenizer-type", "NullTokenizer", "--vocab-size", "257",
                           "--vocab-file", "{file}"], (),
                          "--vocab-file {file}: --tokenizer-type NullTokenizer does not read "
                          "it"),
    "tokenizer-model-unread": (["--tokenizer-type", "BertWordPieceCase", "--vocab-file",
                                "{file}", "--tokenizer-model", "{file}"], (),
                               "--tokenizer-model {file}: --tokenizer-type BertWordPieceCase "
                               "does not read it"),
    "hf-tokenizer-without-model": (["--tokenizer-type", "HuggingFaceTokenizer"], (),
                                   "--tokenizer-type HuggingFaceTokenizer needs "
                                   "--tokenizer-model"),
    "hf-tokenizer-folder-without-tokenizer": (["--tokenizer-type", "HuggingFaceTokenizer",
                                               "--tokenizer-model", "{folder}"], (),
                                              "--tokenizer-model {folder} holds no tokenizer "
                                              "(none of tokenizer.json, tokenizer_config.json"),
    "gpt2-vocab-not-json": (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "{file}",
                             "--merge-file", "{file}"], (),
                            "--vocab-file {file} is not a JSON vocabulary"),
    # data files present but not Megatron's: indexed_dataset.py asserts after the model build
    "data-path-not-megatrons-index": (["--data-path", "{not_megatrons}", *NULL_TOKENIZER], (),
                                      "--data-path {not_megatrons}: {not_megatrons}.idx is not "
                                      "a Megatron index (it does not start with Megatron's "
                                      "MMIDIDX header)"),
    "data-path-weighted-not-megatrons": (["--data-path", "0.5", "{prefix}", "0.5",
                                          "{not_megatrons}", *NULL_TOKENIZER], (),
                                         "--data-path {not_megatrons}: {not_megatrons}.idx is "
                                         "not a Megatron index"),
    "data-path-bin-cut-short": (["--data-path", "{cut}", *NULL_TOKENIZER], (),
                                "--data-path {cut}: {cut}.bin holds 19 bytes and its index "
                                "{cut}.idx points to 20"),
    "hf-tokenizer-local-folder-missing": (["--tokenizer-type", "HuggingFaceTokenizer",
                                           "--tokenizer-model", "{folder}/none"], (),
                                          "--tokenizer-model {folder}/none: no such file"),
}
if importlib.util.find_spec("sentencepiece") is None:
    REFUSED["sentencepiece-not-installed"] = (
        ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", "{file}"], (),
        "--tokenizer-type Llama2Tokenizer needs the Python package sentencepiece, which is "
        "not installed")
if importlib.util.find_spec("emerging_optimizers") is None:
    REFUSED["optimizer-package-not-installed"] = (
        ["--optimizer", "lion"], (), "--optimizer lion needs the Python package "
                                     "emerging-optimizers (0.2 or newer), which is not installed")
REFUSED["async-save-without-its-worker"] = (
    ["--async-save", "--save", "{folder}/ckpt", "--save-interval", "2"], (),
    "--async-save needs --use-persistent-ckpt-worker (without it Megatron saves "
    "synchronously)")
if not torch.cuda.is_available():
    REFUSED["nccl-without-cuda"] = (["--distributed-backend", "nccl"], (),
                                    "--distributed-backend nccl needs CUDA GPUs")
    # The worker dies at start (torch.cuda.set_device) and the first save hangs.
    REFUSED["async-save-without-cuda"] = (
        ["--async-save", "--use-persistent-ckpt-worker", "--save", "{folder}/ckpt",
         "--save-interval", "2"], (),
        "--async-save needs CUDA GPUs")


@pytest.fixture
def paths(tmp_path) -> dict[str, str]:
    """{file}: an empty file; {folder}: a folder; {prefix}: a dataset prefix with its
    PREFIX.idx and PREFIX.bin, as Megatron's builder writes them; {not_megatrons}: a prefix
    whose files are not Megatron's; {cut}: {prefix}'s index with a shorter .bin."""
    (tmp_path / "a-file").write_text("")
    write_dataset(tmp_path / "data", [[1, 2, 3], [4, 5]])
    for ext in (".idx", ".bin"):
        (tmp_path / f"other{ext}").write_text("token ids, one a line\n")
    (tmp_path / "cut.idx").write_bytes((tmp_path / "data.idx").read_bytes())
    (tmp_path / "cut.bin").write_bytes((tmp_path / "data.bin").read_bytes()[:-1])
    (tmp_path / "held.idx").mkdir()
    (tmp_path / "held.bin").write_bytes((tmp_path / "data.bin").read_bytes())
    return {"idx_folder": str(tmp_path / "held"), "file": str(tmp_path / "a-file"), "folder": str(tmp_path),
            "prefix": str(tmp_path / "data"), "not_megatrons": str(tmp_path / "other"),
            "cut": str(tmp_path / "cut")}


def write_dataset(prefix: Path, documents: list[list[int]]) -> None:
    """PREFIX.bin and PREFIX.idx of `documents` (token ids), by Megatron's own builder."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.int32)
    for document in documents:
        builder.add_document(numpy.array(document, dtype=numpy.int32), [len(document)])
    builder.finalize(f"{prefix}.idx")


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_at_start_up_naming_the_flag(case, paths, monkeypatch):
    extra, dropped, said = REFUSED[case]
    got = start_up_refusal(command_line([a.format(**paths) for a in extra], dropped),
                           monkeypatch)
    assert got is not None and got.startswith(said.format(**paths)), got


# Megatron refuses these itself, but by a value the user did not give (tested below).
MEGATRON_BLAMES_ANOTHER = ("mtp-num-layers-negative", "lr-nan", "lr-negative",
                           "global-batch-not-a-multiple", "micro-batch-too-large",
                           "eval-batch-not-a-multiple", "pipeline-larger-than-world",
                           "embedding-in-the-split-uneven")


@pytest.mark.parametrize("case", [c for c in REFUSED if c not in MEGATRON_BLAMES_ANOTHER])
def test_megatron_alone_lets_it_through(case, paths, monkeypatch):
    """Megatron's own validation accepts each input the checks refuse: the failure came
    later (its scheduler, its training loop, its data workers, its process groups, torch's
    modules and optimizers). The `MEGATRON_BLAMES_ANOTHER` inputs Megatron does refuse, but
    by another flag's or a derived value's name."""
    extra, dropped, _ = REFUSED[case]
    megatron_validates(parsed(command_line([a.format(**paths) for a in extra], dropped),
                              monkeypatch))


@pytest.mark.parametrize("extra, blamed", [
    (["--lr", "nan"], "args.min_lr <= args.lr"),
    (["--lr=-1e-3"], "args.min_lr <= args.lr"),
    (["--global-batch-size", "3", "--micro-batch-size", "2"], "eval_global_batch_size (3)"),
    (["--micro-batch-size", "4"], "eval_global_batch_size (4)"),
    (["--eval-micro-batch-size", "3"], "eval_global_batch_size (4)"),
    (["--pipeline-model-parallel-size", "4"], "world size (2)"),
    (["--pipeline-model-parallel-size", "2", "--account-for-embedding-in-pipeline-split"],
     "Number of layers should be divisible by the pipeline-model-parallel size"),
])
def test_megatron_blames_a_value_the_user_did_not_give(extra, blamed, monkeypatch):
    from upstream.argument_words import assert_condition

    args = parsed(command_line(extra), monkeypatch)
    with pytest.raises(AssertionError) as refused:
        megatron_validates(args)
    failed_at = refused.traceback[-1]  # a bare assert says only its condition
    said = str(refused.value) or assert_condition(str(failed_at.path), failed_at.lineno + 1)
    assert blamed in said and extra[0].split("=")[0] not in said


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
    ["--adam-beta1", "0", "--adam-beta2", "0.99", "--weight-decay", "0", "--init-method-std",
     "0"],
    ["--hidden-dropout", "1", "--attention-dropout", "0", "--eval-iters", "0", "--lr", "0",
     "--min-lr", "0"],
    ["--global-batch-size", "6", "--micro-batch-size", "3"],
    ["--data-path", "0.3", "{tmp}/data", "0.7", "{tmp}/data", *NULL_TOKENIZER],
    ["--data-path", "{tmp}/data", "{tmp}/data", *NULL_TOKENIZER],  # prefixes, no weights
    ["--data-path", "s3://bucket/data", *NULL_TOKENIZER],  # left to Megatron
    ["--group-query-attention", "--num-query-groups", "2"],
    ["--group-query-attention", "--num-query-groups", "1", "--tensor-model-parallel-size", "2"],
    ["--sequence-parallel", "--tensor-model-parallel-size", "2"],
    ["--attention-backend", "auto"],
    ["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "10", "--lr-wsd-decay-style", "linear"],
    ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "{tmp}/vocab.json",
     "--merge-file", "{tmp}/data.bin"],  # gpt2 in Hugging Face's cache (below)
    ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
     "deepseek-ai/DeepSeek-V3"],  # a Hub name: fetched when the tokenizer is built
    ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "{tmp}"],
])
def test_the_edges_are_accepted(extra, tmp_path, monkeypatch):
    write_dataset(tmp_path / "data", [[7]])
    (tmp_path / "vocab.json").write_text('{"a": 0}')  # also a tokenizer folder's vocabulary
    hub_cache_holding("gpt2", tmp_path / "hub", monkeypatch)
    argv = command_line([a.format(tmp=tmp_path) for a in extra])
    assert start_up_refusal(argv, monkeypatch) is None
    assert not (tmp_path / "not").exists()  # a folder is checked, not made


def test_every_numeric_domain_is_of_a_flag_megatron_parses_as_a_number():
    """`Domain.problem` compares the parsed value with its bounds: a run and `megaseek
    describe` both parse with Megatron's typed parser (and the plugins' flags), so each
    value is a number (or None: not given)."""
    from integration import describe

    for parser in (megatron_parser(), describe.parser()):
        actions = {action.dest: action for action in parser._actions}
        assert {rule.dest: actions[rule.dest].type for rule in argument_checks.NUMERIC_DOMAINS
                if actions[rule.dest].type not in (int, float)} == {}


def megatron_parser() -> argparse.ArgumentParser:
    from megatron.training.arguments import add_megatron_arguments

    return default_registry().add_arguments(add_megatron_arguments(
        argparse.ArgumentParser(allow_abbrev=False)))


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


def test_the_users_vocab_size_is_kept_with_the_built_in_corpus(tmp_path, monkeypatch):
    """Without --tokenizer-type the built-in corpus brings its tokenizer, not a vocabulary
    in place of the user's; a preset's --vocab-size (the model's) gives way to its 257."""
    from integration import presets, pretrain

    def vocab(argv: list[str]) -> str:
        return presets.options(argv)["--vocab-size"][-1]

    monkeypatch.setenv("MEGASEEK_DATA_CACHE", str(tmp_path))
    assert vocab(pretrain.with_defaults(["--vocab-size", "300"])) == "300"
    with pytest.raises(PluginError, match=r"--vocab-size 100 is smaller than the built-in "
                                          r"corpus's 257 token ids"):
        pretrain.with_defaults(["--vocab-size", "100"])
    user = ["--preset", "deepseek-v3"]
    assert vocab(pretrain.with_defaults(presets.expand(user, announce=False), user)) == "257"
    user = ["--preset", "deepseek-v3", "--vocab-size", "512"]
    assert vocab(pretrain.with_defaults(presets.expand(user, announce=False), user)) == "512"


def test_a_tokenizer_file_is_asked_for_unless_megatron_has_it_cached(tmp_path, monkeypatch):
    """Megatron's BPE and WordPiece tokenizers take a file not given from their download
    cache, and download it (with the wget package) where it is not there."""
    from megatron.core.tokenizers.text.libraries import megatron_hf_tokenizer

    monkeypatch.setattr(megatron_hf_tokenizer, "MEGATRON_CACHE", str(tmp_path))
    hub_cache_holding("gpt2", tmp_path / "hub", monkeypatch)
    argv = command_line(["--tokenizer-type", "GPT2BPETokenizer"])
    assert start_up_refusal(argv, monkeypatch) == (
        "--tokenizer-type GPT2BPETokenizer needs --vocab-file FILE (Megatron would otherwise "
        "download it with the wget package)")
    (tmp_path / "GPT2BPETokenizer_vocab").write_text("{}")
    assert start_up_refusal(argv, monkeypatch).startswith(
        "--tokenizer-type GPT2BPETokenizer needs --merge-file FILE")
    (tmp_path / "GPT2BPETokenizer_merges").write_text("")
    assert start_up_refusal(argv, monkeypatch) is None
    assert start_up_refusal(command_line(["--tokenizer-type", "BertWordPieceCase"]),
                            monkeypatch).startswith(
        "--tokenizer-type BertWordPieceCase needs --vocab-file FILE")


def hub_cache_holding(repo: str | None, cache: Path, monkeypatch) -> None:
    """Hugging Face's cache at `cache` (HF_HUB_CACHE), offline, holding the
    tokenizer_config.json of the Hub repository `repo` (None: nothing), in the cache's
    layout (refs/main names a snapshot)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if repo is not None:
        folder = cache / f"models--{repo}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0" * 40)
        (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
        (folder / "snapshots" / ("0" * 40) / "tokenizer_config.json").write_text("{}")


@pytest.mark.parametrize("kind, files, repo", [
    ("GPT2BPETokenizer", ["--vocab-file", "{vocab}", "--merge-file", "{merges}"], "gpt2"),
    ("BertWordPieceCase", ["--vocab-file", "{merges}"], "bert-large-cased"),
])
def test_a_hub_tokenizer_offline_is_refused_unless_cached(kind, files, repo, tmp_path,
                                                          monkeypatch):
    """Megatron's BPE and WordPiece tokenizers load a Hub tokenizer by name, even with
    local files: offline and not cached, that fails in the tokenizer build, after retries."""
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    argv = command_line(["--tokenizer-type", kind,
                         *[f.format(vocab=tmp_path / "vocab.json",
                                    merges=tmp_path / "merges.txt") for f in files]])
    hub_cache_holding(None, tmp_path / "hub", monkeypatch)
    assert start_up_refusal(argv, monkeypatch) == (
        f"--tokenizer-type {kind} loads Hugging Face's {repo!r} tokenizer from the Hub even "
        "with local files, and HF_HUB_OFFLINE is set (nor is it in Hugging Face's cache): "
        "save a tokenizer to a folder and give --tokenizer-type HuggingFaceTokenizer "
        "--tokenizer-model DIR")
    hub_cache_holding(repo, tmp_path / "hub", monkeypatch)
    assert start_up_refusal(argv, monkeypatch) is None


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
    # a message that names one side of the conflict: both flags said
    (["--train-samples", "100"], "Megatron's argument check failed: --train-iters 10 and "
                                 "--train-samples 100 both given: train by one of them "),
    (["--lr-decay-samples", "100"], "Megatron's argument check failed: --lr-decay-samples 100 "
                                    "with --train-iters 10: training counts iterations, so "
                                    "give --lr-decay-iters instead "),
    # a message that names no flag gets the flags of its condition
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2",
      "--num-layers-per-virtual-pipeline-stage", "3"],
     "Megatron's argument check failed: number of layers per pipeline stage must be "
     "divisible number of layers per virtual pipeline stage (--num-layers-per-virtual-"
     "pipeline-stage 3) "),
    # values the user did not give are said as the flags they derive from
    (["--global-batch-size", "3", "--micro-batch-size", "2"],
     "Megatron's argument check failed: eval_global_batch_size (3) must be divisible by "
     "eval_micro_batch_size (2) * data_parallel_size (2) (--eval-global-batch-size 3 "
     "(--global-batch-size's, where it is not given), --eval-micro-batch-size 2 "
     "(--micro-batch-size's, where it is not given), data-parallel size 2 (the ranks of the "
     "run / --tensor-model-parallel-size x --pipeline-model-parallel-size x "
     "--context-parallel-size)) "),
    (["--pipeline-model-parallel-size", "4"],
     "Megatron's argument check failed: world size (2) is not divisible by total_model_size "
     "(total_model_size=4) (the 2 ranks of the run, in model replicas of "
     "--tensor-model-parallel-size x --pipeline-model-parallel-size x --context-parallel-size "
     "ranks each) "),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2",
      "--account-for-embedding-in-pipeline-split", "--num-layers-per-virtual-pipeline-stage",
      "1"],
     "Megatron's argument check failed: number of layers of the model must be divisible "
     "pipeline model parallel size (--pipeline-model-parallel-size 2, "
     "--account-for-embedding-in-pipeline-split (one more layer))"),
    # MLA has no key/value groups (the mla plugin's attention no more than Megatron's)
    (["--multi-latent-attention", "--group-query-attention"],
     "Megatron's argument check failed: Group query attention is mutually exclusive with "
     "multi latent attention. (--group-query-attention) "),
    # a required flag left out ('hidden_size argument is None')
    (["drop"], "Megatron's argument check failed: give --hidden-size (Megatron requires it)"),
])
def test_megatrons_failed_checks_name_the_flags(extra, said, monkeypatch, patcher):
    from upstream.seams.arguments import checks_before_argument_dump
    from upstream.seams.errors import MegatronRefused

    args = parsed(command_line(extra[1:] if extra[0] == "drop" else extra,
                               ("--hidden-size",) if extra[0] == "drop" else ()), monkeypatch)
    checks_before_argument_dump(lambda args: None).apply(patcher)
    with pytest.raises(MegatronRefused) as refused:
        megatron_validates(args)
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

def test_a_changed_schedule_at_load_names_the_value_and_the_flags(monkeypatch, patcher):
    """Megatron's own scheduler, loading the state of one built for half the iterations."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from upstream.seams.scheduler_mismatch import scheduler_mismatch_named
    from upstream.seams.errors import CheckpointMismatch

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
    scheduler_mismatch_named().apply(patcher)
    with pytest.raises(CheckpointMismatch) as refused:
        scheduler(80).load_state_dict(saved)
    resumed = scheduler(80, override_opt_param_scheduler=True)
    resumed.load_state_dict(saved)  # the flags it names do settle it
    assert resumed.lr_decay_steps == 80
    patcher.undo()
    assert str(refused.value) == (
        "--load ckpt: the checkpoint's learning-rate schedule has decay length 40 samples, "
        "this run 80 samples (from --lr-decay-iters, or --train-iters where --lr-decay-iters "
        "is not given, x --global-batch-size; or --lr-decay-samples): give "
        "--override-opt_param-scheduler to use this run's values, or "
        "--use-checkpoint-opt_param-scheduler to keep the checkpoint's")


# --- end to end: one line, on rank 0, exit status 2 ----------------------------------------

RELEASE_SCRIPT = str(RELEASE_SCRIPT_PATH)
MOCK_DATA = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128"]


@pytest.mark.parametrize("entry, extra, said", [
    (["-m", "integration.pretrain"], ["--seq-length", "abc"],
     "megaseek: error: argument --seq-length: invalid int value: 'abc'"),
    (["-m", "integration.pretrain"], ["--eval-interval", "0"],
     "megaseek: error: --eval-interval 0 must be 1 or more"),
    # an unmodified launch script (Megatron-LM's release pretrain_gpt.py)
    (["-m", "integration.launch", RELEASE_SCRIPT], [*MOCK_DATA, "--log-interval", "0"],
     "megaseek: error: --log-interval 0 must be 1 or more"),
    # Megatron would build the tokenizer after start-up: a wget download, on every rank
    (["-m", "integration.pretrain"], ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
                                      "gpt2-vocab.json", "--merge-file", "gpt2-merges.txt"],
     "megaseek: error: --vocab-file gpt2-vocab.json: no such file (--tokenizer-type "
     "GPT2BPETokenizer reads it)"),
], ids=["argparse", "start-up-check", "launcher-start-up-check", "tokenizer-files"])
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
        "megaseek: error: --load ckpt: the checkpoint's learning-rate schedule has decay "
        "length 24 samples, this run 48 samples (from --lr-decay-iters, or --train-iters where "
        "--lr-decay-iters is not given, x --global-batch-size; or --lr-decay-samples): give "
        "--override-opt_param-scheduler to use this run's values, or "
        "--use-checkpoint-opt_param-scheduler to keep the checkpoint's"]
    assert "rank 0 exited 2" in output and "Traceback" not in output

