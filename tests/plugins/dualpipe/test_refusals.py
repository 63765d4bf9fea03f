"""Configurations DualPipe cannot run fail at start-up, naming the flag to change."""

from __future__ import annotations

import pytest
import torch

from plugins import PluginError, default_registry
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
    (V + ["--pipeline-model-parallel-layout", "Et|tt|tL"],
     r"--pipeline-model-parallel-layout Et\|tt\|tL has 3 stages; --pipeline-schedule dualpipev "
     r"on --pipeline-model-parallel-size 2 runs 4 .*give 4 stages"),
    (["--plugins", "dualpipe", "--pipeline-schedule", "dualpipe",
      "--pipeline-model-parallel-layout", "Et|t|t|tL"],
     r"has 4 stages; --pipeline-schedule dualpipe on --pipeline-model-parallel-size 2 runs 2 "),
    (V + ["--pipeline-model-parallel-layout", "tE|t|t|tL"], r"the embedding \(E\) must open the first stage"),
    (V + ["--pipeline-model-parallel-layout", "Et|t|tL|t"], r"the loss \(L\) must end the last stage"),
    (V + ["--pipeline-model-parallel-layout", "Et|t|t|ttL"], r"holds 5 transformer layers \(t\); --num-layers is 4"),
    (V + ["--pipeline-model-parallel-layout", "Et|tm|t|tL", "--position-embedding-type", "rope",
          "--mtp-num-layers", "1"], r"the MTP layers \(m\) must sit together just before the loss"),
    (V + ["--pipeline-model-parallel-layout", "Et|t|t|tL", "--position-embedding-type", "rope",
          "--mtp-num-layers", "1"], r"holds 0 MTP layers \(m\); --mtp-num-layers is 1"),
    (V + ["--pipeline-model-parallel-layout", "Et|x|t|tL"], r"Invalid layer character: x"),
    (V + ["--pipeline-model-parallel-layout", "Ett||t|tL"],
     r"--pipeline-model-parallel-layout Ett\|\|t\|tL: stage 1 holds nothing; every stage needs "
     r"at least one of E, t, m, L"),
    (V + ["--pipeline-model-parallel-layout", "Et|t|t|tL", "--decoder-first-pipeline-num-layers", "1"],
     r"--pipeline-model-parallel-layout cannot be combined with --decoder-first"),
    (V + ["--pipeline-model-parallel-layout", "Et|t|t|tL", "--account-for-loss-in-pipeline-split"],
     r"drop --account-for-loss-in-pipeline-split"),
    (V + ["--decoder-first-pipeline-num-layers", "2"],
     r"--decoder-first-pipeline-num-layers 2 leave 2 of --num-layers 4 layers to the 3 stages"),
    (V + ["--decoder-last-pipeline-num-layers", "5"], r"5 layers, more than --num-layers 4"),
    (V + ["--decoder-first-pipeline-num-layers", "4"],
     r"leave 0 of --num-layers 4 layers to the 3 stages between, which need one each"),
    (V + ["--num-layers", "6", "--decoder-first-pipeline-num-layers", "1"],
     r"leave 5 of --num-layers 6 layers to the 3 stages between, which they do not share "
     r"equally"),
    (V + ["--pipeline-model-parallel-layout", "Et|t|t| tL"], r"'Et\|t\|t\| tL' holds spaces"),
    (V + ["--decoder-first-pipeline-num-layers", "0"], r"--decoder-first-pipeline-num-layers 0 must be 1 or more"),
    (V + ["--num-layers", "6"], r"--num-layers 6 cannot be cut into the 4 equal stages.*--num-layers 8\); "
                                r"or cut 4 uneven stages with --pipeline-model-parallel-layout \(or "
                                r"--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers\)$"),
    (V + ["--account-for-embedding-in-pipeline-split"],
     r"cannot be cut into the 4 equal stages.*--num-layers 7\); "
     r"--account-for-embedding-in-pipeline-split counts one more layer"),
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
        "layout-stages", "layout-stages-dualpipe", "layout-embedding",
        "layout-loss", "layout-layers", "layout-mtp-place", "layout-mtp-count", "layout-letter",
        "layout-empty-stage",
        "layout-and-uneven", "layout-and-accounting", "uneven-rest", "uneven-too-many",
        "uneven-none-left", "uneven-not-shared", "layout-spaces", "uneven-zero", "layers", "embedding-in-the-split",
        "param-gather-with-step",
        "mtp-fully-reshardable", "wgrad-without-dualpipe", "wgrad-overlap-grad-reduce",
        "a2a-overlap"])
def test_refused_at_start_up_naming_the_flag(extra, named, monkeypatch):
    with pytest.raises(PluginError, match=named):
        enabled(BASE + extra, monkeypatch)


def test_a_batch_ramp_up_is_refused_before_the_plugins_are_asked(monkeypatch):
    """DualPipe needs a fixed number of micro-batches; Megatron 0.19.2 reads
    --rampup-batch-size nowhere, and megaseek's check of Megatron's flags, which a run
    meets before the plugins' checks, refuses it whatever the plugins."""
    from tests.integration.test_argument_checks import start_up_refusal

    assert start_up_refusal(BASE + V + ["--rampup-batch-size", "4", "4", "100"],
                            monkeypatch).startswith(
        "--rampup-batch-size 4 4 100 is ignored by Megatron 0.19.2")


@pytest.mark.parametrize("extra, stages", [
    (V + ["--pipeline-model-parallel-layout", "Et|t|tt|L"], ("Et", "t", "tt", "L")),
    (V + ["--num-layers", "5", "--decoder-last-pipeline-num-layers", "2"],
     ("Et", "t", "t", "ttL")),
    (["--plugins", "dualpipe", "--pipeline-schedule", "dualpipe",
      "--pipeline-model-parallel-layout", "Et|tttL"], ("Et", "tttL")),
], ids=["dualpipev-layout", "dualpipev-first-last", "dualpipe-layout"])
def test_a_layout_is_the_placements_and_megatron_gets_none(extra, stages, monkeypatch):
    from plugins.dualpipe.plugin import stage_layout

    args, plugins = enabled(BASE + extra, monkeypatch)
    assert args.pipeline_model_parallel_layout is None  # Megatron would read it interleaved
    assert args.decoder_first_pipeline_num_layers is None
    assert args.num_virtual_stages_per_pipeline_rank == 2
    assert stage_layout(plugins[0].config).stages == stages
    placement = plugins[0].placement()
    before = [sum(stage.count("t") for stage in stages[:s]) for s in range(len(stages) + 1)]
    assert [placement.layers(s) for s in range(placement.stages)] == [
        range(before[s], before[s + 1]) for s in range(len(stages))]
    # Megatron saves these arguments with each checkpoint; a tool that rebuilds the
    # checkpoint's model plans from them (integration/checkpoint_tool.py): the same cut.
    saved = default_registry().plan(args, checked=False)
    assert stage_layout(saved.plugins[0].config).stages == stages


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



@pytest.mark.parametrize("extra, said", [
    (V + ["--pipeline-model-parallel-layout", "E|ttt|t|mL", "--position-embedding-type",
          "rope", "--mtp-num-layers", "1"],
     ["megaseek: --pipeline-schedule dualpipev places its stages "
      "(--pipeline-model-parallel-layout E|ttt|t|mL):",
      "megaseek:   rank 0 holds stage 0 (E) and stage 3 (m L)",
      "megaseek:   rank 1 holds stage 1 (t0-t2) and stage 2 (t3)"]),
    (V + ["--num-layers", "8"],
     ["megaseek: --pipeline-schedule dualpipev places its stages:",
      "megaseek:   rank 0 holds stage 0 (E t0 t1) and stage 3 (t6 t7 L)",
      "megaseek:   rank 1 holds stage 1 (t2 t3) and stage 2 (t4 t5)"]),
    (V + ["--num-layers", "7", "--account-for-embedding-in-pipeline-split"],
     ["megaseek: --pipeline-schedule dualpipev places its stages:",
      "megaseek:   rank 0 holds stage 0 (E t0) and stage 3 (t5 t6 L)",
      "megaseek:   rank 1 holds stage 1 (t1 t2) and stage 2 (t3 t4)"]),
    (["--plugins", "dualpipe", "--pipeline-schedule", "dualpipe"],
     ["megaseek: --pipeline-schedule dualpipe places its stages:",
      "megaseek:   rank 0 holds stage 0 (E t0 t1) of the micro-batches from rank 0 and "
      "stage 1 (t2 t3 L) of those from rank 1",
      "megaseek:   rank 1 holds stage 1 (t2 t3 L) of the micro-batches from rank 0 and "
      "stage 0 (E t0 t1) of those from rank 1"]),
], ids=["layout", "even", "even-embedding-counted", "dualpipe-even"])
def test_rank_0_says_which_stages_each_rank_holds(extra, said, monkeypatch, capsys):
    """Once, on rank 0, when the placement seam attaches the placement to the run (the
    plugin's hook itself prints nothing: `megaseek describe` asks it too); with the even
    split, the layers are those Megatron's split gives each stage (its functions asked at
    the stage's coordinates, as the seam asks them)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from tests.helpers.patching import patching
    from upstream.seams.placement import pipeline_placement

    args, plugins = enabled(BASE + extra, monkeypatch)
    placement = plugins[0].placement()
    capsys.readouterr()
    for rank, printed in (("1", []), ("0", said)):
        monkeypatch.setenv("RANK", rank)
        with patching() as patcher:
            pipeline_placement(placement).apply(patcher)
        assert capsys.readouterr().out.splitlines() == printed, rank
    if placement.layers is not None:
        return
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=64, num_attention_heads=4,
        pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
        account_for_embedding_in_pipeline_split=args.account_for_embedding_in_pipeline_split,
        pipeline_dtype=torch.float32)
    for stage in range(placement.stages):
        rank, chunk = placement.holders(stage)[0]
        pp, vp = placement.megatron_coordinates(rank, chunk)
        config.virtual_pipeline_model_parallel_size = None if vp is None else 2
        start = get_transformer_layer_offset(config, vp_stage=vp, pp_rank=pp)
        count = get_num_layers_to_build(config, vp_stage=vp, pp_rank=pp)
        held = f"t{start}-t{start + count - 1}" if count >= 3 else " ".join(
            f"t{n}" for n in range(start, start + count))
        assert any(f"stage {stage} ({'E ' if stage == 0 else ''}{held}" in line
                   for line in said), (stage, held)
