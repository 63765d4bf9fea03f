"""Configurations DualPipe cannot run fail at start-up, naming the flag to change."""

from __future__ import annotations

import pytest

from plugins import PluginError
from tests.helpers.plugin_args import enabled, validated

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "1",
        "--global-batch-size", "8", "--untie-embeddings-and-output-weights",
        "--pipeline-model-parallel-size", "2"]
V = ["--plugins", "dualpipe", "--pipeline-schedule", "dualpipev"]


@pytest.fixture(autouse=True)
def two_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")


def test_a_valid_configuration_asks_megatron_for_two_chunks(monkeypatch):
    args, plugins = enabled(BASE + V, monkeypatch)
    assert [p.name for p in plugins] == ["dualpipe"]
    assert args.num_virtual_stages_per_pipeline_rank == 2  # before Megatron validates
    args, _ = validated(BASE + V + ["--transformer-impl", "local"])
    assert args.virtual_pipeline_model_parallel_size == 2  # as Megatron validated it


@pytest.mark.parametrize("extra, named", [
    (["--plugins", "dualpipe"], r"needs --pipeline-schedule dualpipev"),
    (["--pipeline-schedule", "dualpipev"], r"--pipeline-schedule needs '--plugins dualpipe'"),
    (V + ["--pipeline-model-parallel-size", "1"], r"--pipeline-model-parallel-size 2 or more \(got 1\)"),
    (V + ["--global-batch-size", "3"], r"gives 3 micro-batches.*at least 4.*--global-batch-size 4 or more"),
    (V + ["--num-virtual-stages-per-pipeline-rank", "2"], r"drop --num-virtual-stages-per-pipeline-rank"),
    (V + ["--pipeline-model-parallel-layout", "Et|tL"], r"drop --pipeline-model-parallel-layout"),
    (V + ["--decoder-first-pipeline-num-layers", "1"], r"drop --decoder-first-pipeline-num-layers"),
    (V + ["--num-layers", "6"], r"--num-layers 6 cannot be cut into the 4 equal stages.*--num-layers 8"),
    (V + ["--account-for-embedding-in-pipeline-split"],
     r"cannot be cut into the 4 equal stages.*--num-layers 7\); "
     r"--account-for-embedding-in-pipeline-split counts one more layer"),
    (V + ["--rampup-batch-size", "4", "4", "100"], r"--rampup-batch-size"),
    # Megatron refused it without virtual stages; with the two the plugin asks for, it
    # would let it through to a schedule that never starts the gathers.
    (V + ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
          "--overlap-param-gather-with-optimizer-step"],
     r"--overlap-param-gather-with-optimizer-step cannot be combined with --pipeline-schedule"),
    (V + ["--position-embedding-type", "rope", "--mtp-num-layers", "1",
          "--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable"],
     r"--dist-ckpt-optim-fully-reshardable cannot be combined with --mtp-num-layers"),
    (["--delay-wgrad-compute", "--transformer-impl", "local"],
     r"--delay-wgrad-compute without Transformer Engine needs --plugins dualpipe"),
    (V + ["--delay-wgrad-compute", "--transformer-impl", "local", "--overlap-grad-reduce"],
     r"--overlap-grad-reduce is not supported"),
    (V + ["--overlap-moe-expert-parallel-comm"],
     r"--overlap-moe-expert-parallel-comm needs --expert-model-parallel-size 2 or more"),
], ids=["no-schedule", "schedule-without-plugin", "pp1", "too-few-microbatches", "vp-flag",
        "layout", "uneven", "layers", "embedding-in-the-split", "rampup",
        "param-gather-with-step",
        "mtp-fully-reshardable", "wgrad-without-dualpipe", "wgrad-overlap-grad-reduce",
        "a2a-overlap"])
def test_refused_at_start_up_naming_the_flag(extra, named, monkeypatch):
    with pytest.raises(PluginError, match=named):
        enabled(BASE + extra, monkeypatch)


def test_tied_embeddings_are_refused(monkeypatch):
    argv = [a for a in BASE if a != "--untie-embeddings-and-output-weights"] + V
    with pytest.raises(PluginError, match=r"needs --untie-embeddings-and-output-weights"):
        enabled(argv, monkeypatch)


def test_an_unwritable_pipeline_timeline_is_refused_at_start_up(tmp_path, monkeypatch):
    # Each rank writes its timeline after the first step; a path it cannot write in failed
    # there, after the model was built. (A file where a folder is asked for: root, which
    # runs CI here, may write anywhere else.)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PluginError, match=rf"--pipeline-timeline {blocker}/timeline: "
                                          rf"{blocker} is a file, not a folder"):
        enabled(BASE + V + ["--pipeline-timeline", str(blocker / "timeline")], monkeypatch)
    args, _ = enabled(BASE + V + ["--pipeline-timeline", str(tmp_path / "new" / "dir")],
                      monkeypatch)
    assert not (tmp_path / "new").exists()  # checked, not created

