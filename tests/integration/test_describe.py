"""`megaseek describe` and the cost models it composes (integration.cost, plugins/*/cost.py):
each figure against a count made another way.

- parameters: DeepSeek-V3's published 671B total / 37B activated (main model) and the MTP
  module's 11.5B transformer layer; the `numel` of the `tiny` preset's model built on CPU
  (main model, MTP module and each layer kind), and each TP/EP rank's share of it built
  at TP=2, EP=2;
- activation bytes: a census of the storages autograd keeps for backward (unique, not
  parameters) in a real forward of the built tiny model, layer by layer, for each
  recomputation choice and with FP8;
- FLOPs: torch's FlopCounterMode over a forward and backward of the built model (its
  matmuls), plus the attention's q.k and p.v counted from the shapes;
- each plugin's cost model (MLA, MoE, FP8's way of keeping activations) and the dense
  MLP's against its own module in the built model, from the config it was built with:
  numel, the census of what that module keeps, FlopCounterMode's count for it.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest

from integration import cost
from integration import describe as d
from integration import deepseek_v3, presets
from plugins.common.cost import Activations, mlp_parameters
from plugins.dualpipe.layout import LAYER, LayoutError, StageLayout
from plugins.fp8.cost import FP8Activations
from plugins.mla import cost as mla_cost
from plugins.moe import cost as moe_cost
from tests.helpers.multirank import run_ranks

LAYOUT = ["--pipeline-model-parallel-size", "16", "--expert-model-parallel-size", "64",
          "--data-parallel-size", "128", "--decoder-first-pipeline-num-layers", "1", "--bf16",
          "--use-distributed-optimizer", "--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype", "bf16"]
LAYOUT_1F1B = ["--preset", "deepseek-v3", *LAYOUT[:6], *LAYOUT[8:]]  # no first/last
SEQ, BATCH, VOCAB = 64, 2, 256


def report(argv):
    return d.describe(d.parse(argv))


def test_deepseek_v3_is_671b_with_37b_activated_and_mtp_apart(capsys):
    got = report(["--preset", "deepseek-v3", *LAYOUT])
    main, mtp = got["model"]["main"], got["model"]["mtp"]
    assert round(main["total"] / 1e9) == 671 and round(main["activated"] / 1e9) == 37
    # README_WEIGHTS: 11.5B MTP parameters besides the shared embedding and head: the
    # transformer layer; the norms and the 2h x h projection add 0.1B.
    m = d.shape(d.parse(["--preset", "deepseek-v3"]))
    assert f"{cost.layer_parameters(m, 61).total / 1e9:.1f}" == "11.5"
    assert f"{mtp['total'] / 1e9:.1f}" == "11.6"
    # DeepSeek's 685B checkpoint: main model, MTP module, and the MTP's copies of the
    # embedding and head (0.9B each), less the 0.1% of FP8 scales it also counts.
    assert round((main["total"] + mtp["total"] + 2 * 129280 * 7168) / 1e9) == 684
    d.main(["--preset", "deepseek-v3", *LAYOUT])
    out = capsys.readouterr().out
    assert "main model 671.0B total, 36.6B activated" in out and "MTP modules 11.6B" in out


def test_smaller_presets_match_their_published_sizes():
    """DeepSeek-V2-Lite: 15.7B total, 2.4B activated (the paper; 2.45B here, with the
    0.2B output head); Moonlight-16B-A3B: 16B, 3B."""
    lite = report(["--preset", "deepseek-v2-lite"])["model"]["main"]
    assert f"{lite['total'] / 1e9:.1f}" == "15.7" and 2.4e9 <= lite["activated"] < 2.5e9
    moon = report(["--preset", "moonlight-16b-a3b"])["model"]["main"]
    assert round(moon["total"] / 1e9) == 16 and round(moon["activated"] / 1e9) == 3


def test_megaseek_describe_command(capsys):
    from integration import cli

    cli.main(["describe", "--preset", "moonlight-16b-a3b"])
    out = capsys.readouterr().out
    assert "main model 16.0B total" in out and "no MTP modules" in out


def test_json_has_exact_integers(capsys):
    d.main(["--preset", "deepseek-v3", *LAYOUT, "--json"])
    got = json.loads(capsys.readouterr().out)
    # (the 58 x 256 expert-bias numbers, a buffer, would make it 671,026,419,200)
    assert got["model"]["main"]["total"] == 671_026_404_352
    assert all(isinstance(r["total_bytes"], int) for r in got["per_rank"])


@pytest.mark.parametrize("argv, message", [
    (["--preset", "foo"], "--preset foo: unknown; the presets are"),
    (["--preset", "tiny", "--no-such-flag", "3"], "--no-such-flag is not a flag describe"),
    (["--preset", "tiny", "--context-parallel-size", "2"], "--context-parallel-size is not a"),
    (["--preset", "tiny", "--hidden-dropout", "0.1"],
     "give --attention-dropout 0 --hidden-dropout 0"),
    (["--preset", "tiny", "--seq-length", "0"], "--seq-length 0 must be 1 or more"),
    (["--preset", "tiny", "--num-layers", "0", "--moe-layer-freq", "1"],
     "--num-layers 0 must be 1 or more"),
    (["--preset", "tiny", "--mtp-loss-scaling-factor", "nan"],
     "--mtp-loss-scaling-factor nan must be 0 or more (and finite)"),
    (["--preset", "deepseek-v3", "--mtp-num-layers", "-1"], "--mtp-num-layers -1 must be 0"),
    # the DualPipe schedules cut equal stages: no hint to the uneven-stage flags they refuse
    (["--preset", "deepseek-v3", "--pipeline-model-parallel-size", "16",
      "--pipeline-schedule", "dualpipev", "--plugins", "mla", "moe", "fp8", "dualpipe"],
     "--num-layers 61 cannot be cut into the 32 equal stages of --pipeline-schedule dualpipev"),
    # as a run refuses them: the schedule without its plugin, megaseek's checks of
    # Megatron's flags, the plugins' checks (issue 23 e09, e11)
    (["--preset", "tiny", "--pipeline-schedule", "dualpipev", "--pipeline-model-parallel-size",
      "2"], "--pipeline-schedule needs '--plugins dualpipe'"),
    (["--preset", "tiny", "--recompute-granularity", "full"],
     "--recompute-granularity full needs --recompute-method uniform or block"),
    (["--preset", "tiny", "--tensor-model-parallel-size", "2"],
     "--plugins moe: experts are not tensor-parallel, and --expert-tensor-parallel-size "
     "follows --tensor-model-parallel-size 2 where it is not given"),
    (["--preset", "tiny", "--tensor-model-parallel-size", "2", "--expert-tensor-parallel-size",
      "1"], "--plugins fp8: --num-attention-heads 4 x --v-head-dim 32 / "
            "--tensor-model-parallel-size 2 gives 64 per rank"),
    (["--preset", "tiny", "--pipeline-model-parallel-size", "2",
      "--decoder-first-pipeline-num-layers", "5"],
     "--decoder-first-pipeline-num-layers 5: more than --num-layers 4"),
    (["--preset", "deepseek-v3", "--pipeline-model-parallel-size", "16"],
     "--num-layers 61 = 61 layers must divide evenly over --pipeline-model-parallel-size 16 "
     "stages"),  # as a run refuses it (integration.layer_layout)
    (["--preset", "deepseek-v3", "--recompute-granularity", "selective",
      "--recompute-modules", "core_attn"], "--recompute-modules core_attn"),
    # Megatron's parser takes more values than describe counts: refused by name
    (["--preset", "tiny", "--recompute-granularity", "full", "--recompute-method", "block"],
     "--recompute-method block: describe counts uniform"),
    (["--preset", "tiny", "--exp-avg-dtype", "fp16"], "--exp-avg-dtype fp16: describe counts"),
    # ... and refuses as a run does (Megatron's own --moe-layer-freq parser)
    (["--preset", "tiny", "--moe-layer-freq", "[1]*x"],
     "argument --moe-layer-freq: invalid moe_freq_type value"),
    (["--preset", "tiny", "--moe-layer-freq", "[1,0]", "--num-layers", "3"],
     "--moe-layer-freq has 2 entries for --num-layers 3"),
])
def test_bad_input_is_refused_by_name(argv, message, capsys):
    """One line, as every megaseek refusal, exit status 2."""
    with pytest.raises(SystemExit) as exited:
        d.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("megaseek: error: ")


def test_the_ema_in_host_memory_adds_no_gpu_byte():
    base = ["--preset", "tiny", "--bf16"]
    with_ema = report([*base, "--plugins", "mla", "moe", "fp8", "ema", "--ema-decay", "0.999"])
    assert with_ema["per_rank"] == report(base)["per_rank"]


def test_megatron_schedule_may_be_named():
    """`--pipeline-schedule 1f1b` names Megatron's schedule, the one a run gets without the
    flag (the dualpipe plugin's flag takes only its own)."""
    assert report(["--preset", "tiny", "--pipeline-schedule", "1f1b"]) == report(
        ["--preset", "tiny"])


def test_flops_are_printed_in_a_unit_that_fits(capsys):
    """tiny's 25 MFLOP per token is not 0.0 GFLOP; DeepSeek-V3's are GFLOP."""
    tiny = report(["--preset", "tiny"])["flops_per_token"]
    d.main(["--preset", "tiny"])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("FLOPs/token"))
    assert 1e6 <= tiny["total"] < 1e9
    assert line.startswith(f"FLOPs/token   {tiny['total'] / 1e6:.1f} MFLOP training")
    assert f"main {tiny['main'] / 1e6:.1f} MFLOP" in line
    assert d._flop(260.7e9) == "260.7 GFLOP" and d._flop(3.2e12) == "3.2 TFLOP"


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_every_preset_describes_as_it_trains(name, capsys):
    """No flag to add: a preset's own flags are what describe counts (`tiny` included,
    which trains without dropout as DeepSeek-V3 does)."""
    d.main(["--preset", name])
    assert "parameters    main model" in capsys.readouterr().out


def test_pipeline_layouts_place_embedding_head_and_in_flight_microbatches():
    base = ["--preset", "deepseek-v3", "--num-layers", "64", "--moe-layer-freq",
            "([0]*3+[1]*61)", "--mtp-num-layers", "0"]
    one = report([*base, "--pipeline-model-parallel-size", "8"])["per_rank"]
    assert [r["microbatches_in_flight"] for r in one] == list(range(8, 0, -1))  # 1F1B: P - r
    assert one[0]["embedding"] and not one[0]["head"] and one[-1]["head"]
    assert [len(r["layers"][0]) for r in one] == [8] * 8
    # as a run asks: the plugin, and the micro-batches its schedules need (16 on 8 ranks)
    dualpipe = ["--plugins", "mla", "moe", "fp8", "dualpipe", "--global-batch-size", "16"]
    v = report([*base, *dualpipe, "--pipeline-model-parallel-size", "8", "--pipeline-schedule",
                "dualpipev"])["per_rank"]
    assert v[0]["embedding"] and v[0]["head"]  # DualPipeV: both ends on rank 0
    assert not any(r["embedding"] or r["head"] for r in v[1:])
    # DeepSeek's table: PP + 1 micro-batches of a stage in flight, PP the stages: DualPipeV
    # cuts 2P (2P + 1 held), DualPipe P (P + 1 held); at the peak rank r holds 2P - r
    # (DualPipe: P - r, r < P/2) of its first chunk and r + 1 of its second.
    assert [r["microbatches_in_flight"] for r in v] == [17] * 8
    assert [[s["microbatches_held"] for s in r["stages"]] for r in v] == [
        [16 - r, r + 1] for r in range(8)]
    assert v[3]["layers"] == [list(range(12, 16)), list(range(48, 52))]
    first, last = v[0]["activation_bytes_per_microbatch"]
    assert v[0]["activation_bytes"] == 16 * first + last
    two = report([*base, *dualpipe, "--pipeline-model-parallel-size", "8",
                  "--pipeline-schedule", "dualpipe"])["per_rank"]
    assert [r["microbatches_in_flight"] for r in two] == [9] * 8
    # DualPipe: every stage on two ranks (both directions): twice the parameters.
    assert sum(r["parameters"] for r in two) == 2 * sum(r["parameters"] for r in one)


DSV3_RUN = ["--preset", "deepseek-v3", *deepseek_v3.RECIPE]


def _dsv3(schedule, *extra):
    return d.parse([*DSV3_RUN, "--pipeline-schedule", schedule, *extra])


@pytest.mark.parametrize("schedule", ["dualpipe", "dualpipev"])
def test_deepseek_v3_layouts_are_described_per_rank(schedule, capsys):
    """The preset's documented layouts: each rank's stages as the placement gives them,
    the embedding and the head with MTP where the layout puts them, every layer once a
    direction, every rank's figures."""
    layout = deepseek_v3.PIPELINE_LAYOUTS[schedule]
    got = d.describe(_dsv3(schedule, "--pipeline-model-parallel-layout", layout))
    ranks = got["per_rank"]
    assert len(ranks) == 16 and got["layout"]["stages"].startswith("Et")
    contents = {s["stage"]: s["contents"] for r in ranks for s in r["stages"]}
    last = max(contents)
    assert contents[0].startswith("E") and contents[last].endswith("mL")
    held = sorted(layer for r in ranks for s in r["stages"] for layer in s["layers"])
    directions = 2 if schedule == "dualpipe" else 1
    assert held == sorted(list(range(61)) * directions)
    assert ranks[0]["stages"][0]["contents"] == ("E0-3" if schedule == "dualpipe" else "E0")
    d.main([*DSV3_RUN, "--pipeline-schedule", schedule, "--pipeline-model-parallel-layout",
            layout])
    out = capsys.readouterr().out
    # rank 15 holds stage 15 (DualPipeV), or stage 0 of DualPipe's second direction first
    assert ("  15    15 29-30" if schedule == "dualpipev" else "  15    0' E0-3") in out
    assert "not built     DeepSeek's memory savings" in out


def _one_layer_moved(layout: StageLayout):
    """Every layout that moves one transformer layer from a stage to another (the layers
    stay in order: the stages between shift by one)."""
    parts = []  # (what precedes the stage's layers, their number, what follows them)
    for stage in layout.stages:
        before = stage[:len(stage) - len(stage.lstrip("E"))]
        layers = stage.count(LAYER)
        parts.append((before, layers, stage[len(before) + layers:]))
    for source, target in itertools.permutations(range(len(parts)), 2):
        if parts[source][1]:
            counts = [n for _, n, _ in parts]
            counts[source] -= 1
            counts[target] += 1
            yield StageLayout(tuple(before + LAYER * n + after
                                    for (before, _, after), n in zip(parts, counts)))


@pytest.mark.parametrize("schedule", ["dualpipe", "dualpipev"])
def test_deepseek_v3_layouts_are_balanced_by_stage_flops(schedule):
    """No move of one layer lowers the FLOPs of the most loaded stage or of the most loaded
    rank (its stages together) of the documented layouts; the output head and MTP make
    the last stage weigh 3.9 layers besides its own."""
    layout = StageLayout.parse(deepseek_v3.PIPELINE_LAYOUTS[schedule])
    args = _dsv3(schedule, "--pipeline-model-parallel-layout", str(layout))
    chosen = d.balance(args, layout)
    expected = {"dualpipe": (1.21, 1.10), "dualpipev": (1.93, 1.21)}[schedule]
    assert (round(chosen["stage_max_over_mean"], 2),
            round(chosen["rank_max_over_mean"], 2)) == expected
    moved = list(_one_layer_moved(layout))
    assert len(moved) > len(layout.stages) and all(m.count(LAYER) == 61 for m in moved)
    for other in moved:
        cost_ = d.balance(args, other)
        assert max(cost_["stage_flops"]) >= max(chosen["stage_flops"]), other
        assert max(cost_["rank_flops"]) >= max(chosen["rank_flops"]), other


def test_savings_not_built_are_what_megaseek_keeps_and_deepseek_does_not():
    """The MTP stage's embedding copy (weights, gradients, optimizer share) on the rank
    that also holds stage 0, and each saving's activation terms in every micro-batch the
    rank holds; every rank's total with all of them."""
    args = _dsv3("dualpipev", "--pipeline-model-parallel-layout",
                 deepseek_v3.PIPELINE_LAYOUTS["dualpipev"])
    got = d.describe(args)
    saving = {s.short: s for s in d.savings_not_built(args)}
    assert list(saving) == ["MTP sharing the embedding", "RMSNorm outputs not kept",
                            "the SwiGLU output recomputed",
                            "no fp32 copies in the MoE layer", "the experts' outputs not kept"]
    first, middle = got["per_rank"][0], got["per_rank"][5]
    embedding = 129280 * 7168  # a multiple of 128 rows: no padding
    name = saving["MTP sharing the embedding"].name
    # BF16 weight, fp32 gradient, fp32 master and two BF16 moments over 128 DP ranks
    assert first["not_built_bytes"][name] == embedding * (2 + 4) + embedding * 8 // 128
    assert middle["not_built_bytes"][name] == 0
    # rank 5: stages 5 and 26 of two MoE layers each, 33 micro-batches in flight
    assert [s["layers"] for s in middle["stages"]] == [[9, 10], [51, 52]]
    assert middle["microbatches_in_flight"] == 33
    m, kept = d.shape(args), d.kept_activations(args)
    terms = cost.layer_saved_terms(m, 20, 4096, 4096, frozenset({"layernorm", "mla_up_proj"}),
                                   1, kept)
    for short in list(saving)[1:]:
        spared = saving[short].spared
        per_layer = math.ceil(sum(terms.values())) - math.ceil(
            sum(v * (1 - spared.get(term, 0)) for term, v in terms.items()))
        assert per_layer > 0 and middle["not_built_bytes"][saving[short].name] == 66 * per_layer
    # Every chunk alike: the savings add up, but for the experts' outputs, whose fp32 half
    # both the last two spare.
    output = terms["experts' output, gates (fp32)"]
    assert saving["no fp32 copies in the MoE layer"].spared["experts' output, gates (fp32)"] \
        == 0.5 and output % 2 == 0
    for r in got["per_rank"][2:]:
        assert r["total_bytes_with_all_built"] == r["total_bytes"] - sum(
            r["not_built_bytes"].values()) + 66 * output // 2


def test_a_layout_the_schedule_cannot_place_is_refused_as_a_run_refuses_it():
    """One source of truth: the dualpipe plugin's `stage_layout`, which a run calls."""
    from plugins.config import read
    from plugins.dualpipe.plugin import DUALPIPE
    from plugins.dualpipe.plugin import stage_layout as placed

    argv = [*DSV3_RUN, "--pipeline-schedule", "dualpipe", "--pipeline-model-parallel-layout",
            "Et|(tt|)*30mL"]
    with pytest.raises(d.DescribeError) as refused:
        d.parse(argv)
    assert "has 32 stages; --pipeline-schedule dualpipe on --pipeline-model-parallel-size " \
           "16 runs 16" in refused.value.message
    args = d.parser().parse_args(presets.expand(argv, announce=False))
    with pytest.raises(LayoutError) as run:
        placed(read(DUALPIPE.config, args))
    assert refused.value.message == str(run.value)


def test_decoder_first_and_last_cut_the_dualpipe_stages():
    base = ["--preset", "deepseek-v3", "--num-layers", "64", "--moe-layer-freq",
            "([0]*3+[1]*61)", "--mtp-num-layers", "0", "--plugins", "mla", "moe", "fp8",
            "dualpipe", "--global-batch-size", "16", "--pipeline-model-parallel-size", "8",
            "--pipeline-schedule", "dualpipev"]
    v = report([*base, "--decoder-first-pipeline-num-layers", "2",
                "--decoder-last-pipeline-num-layers", "6"])["per_rank"]
    assert v[0]["layers"] == [[0, 1], list(range(58, 64))]
    assert v[1]["layers"] == [list(range(2, 6)), list(range(54, 58))]


def test_megatron_layout_under_1f1b():
    """Megatron's own schedule takes --pipeline-model-parallel-layout as Megatron checks
    it; one stage a rank is the uneven split it also gets from the first/last flags;
    virtual stages (Megatron's interleaved schedule) and a standalone MTP stage are
    refused, not ignored."""
    layout = report([*LAYOUT_1F1B, "--pipeline-model-parallel-layout", "Et|(tttt|)*14ttttmL"])
    split = report([*LAYOUT_1F1B, "--decoder-first-pipeline-num-layers", "1"])
    assert layout["per_rank"] == split["per_rank"]
    for given, message in (
            ("Et|(tt|)*30mL", "has 32 stages on --pipeline-model-parallel-size 16: "
                              "Megatron's interleaved schedule (2 virtual stages a rank)"),
            ("Et|(tttt|)*14tttt|mL", "--pipeline-model-parallel-layout"),
            ("Et|(tttt|)*14tttmL", "Number of decoder layers 60must match num_layers 61"),
            ("Et|(tttt|)*13ttttttttm|L", "Megatron's standalone MTP stage is not modelled")):
        with pytest.raises(d.DescribeError) as refused:
            d.parse([*LAYOUT_1F1B, "--pipeline-model-parallel-layout", given])
        assert message in refused.value.message, refused.value.message
    with pytest.raises(d.DescribeError) as refused:
        d.parse([*LAYOUT_1F1B, "--pipeline-model-parallel-layout", "Et|(tttt|)*14ttttmL",
                 "--decoder-first-pipeline-num-layers", "1"])
    assert "cannot be combined with" in refused.value.message, refused.value.message


def test_distributed_optimizer_and_bf16_moments_shrink_the_optimizer_state():
    base = ["--preset", "tiny", "--bf16", "--data-parallel-size", "4"]
    plain = report(base)["per_rank"][0]
    n = plain["parameters"]
    assert plain["parameter_bytes"] == 2 * n and plain["gradient_bytes"] == 4 * n
    assert plain["optimizer_bytes"] == 12 * n  # fp32 master, two fp32 moments
    bf16 = report([*base, "--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype", "bf16"])["per_rank"][0]
    assert bf16["optimizer_bytes"] == 8 * n
    dist = report([*base, "--use-distributed-optimizer"])["per_rank"][0]
    assert dist["optimizer_bytes"] == 12 * n // 4


# --- against the built model ------------------------------------------------------------------

TINY = ["--preset", "tiny", "--micro-batch-size", str(BATCH),
        "--seq-length", str(SEQ)]
WIDE = ["--moe-ffn-hidden-size", "256", "--moe-shared-expert-intermediate-size", "384"]
VARIANTS = {  # name: extra flags
    "none": [],
    "layernorm": ["--recompute-granularity", "selective", "--recompute-modules", "layernorm"],
    "mla_up_proj": ["--recompute-granularity", "selective", "--recompute-modules", "mla_up_proj"],
    "layernorm+mla_up_proj": ["--recompute-granularity", "selective", "--recompute-modules",
                              "layernorm", "mla_up_proj"],
    "moe_act": ["--recompute-granularity", "selective", "--recompute-modules", "moe_act"],
    "shared_experts": ["--recompute-granularity", "selective", "--recompute-modules",
                       "shared_experts"],
    "fp8": ["--plugins", "mla", "moe", "fp8", "--fp8-backend", "emulated"],
    # 2 x 40 tokens: FP8 linears keep x^T with the token count padded to a whole tile (128)
    "fp8 ragged tokens": ["--plugins", "mla", "moe", "fp8", "--fp8-backend", "emulated",
                          "--seq-length", "40"],
    "fp8+layernorm+mla_up_proj": ["--plugins", "mla", "moe", "fp8", "--fp8-backend", "emulated",
                                  "--recompute-granularity", "selective", "--recompute-modules",
                                  "layernorm", "mla_up_proj"],
    # BF16, with expert and shared-expert widths unlike the hidden size (no term can pass
    # for another)
    "bf16": ["--bf16", *WIDE],
    "bf16+layernorm": ["--bf16", *WIDE, "--recompute-granularity", "selective",
                       "--recompute-modules", "layernorm"],
    "bf16+fp8+layernorm+mla_up_proj": ["--bf16", *WIDE, "--plugins", "mla", "moe", "fp8",
                                       "--fp8-backend", "emulated", "--recompute-granularity",
                                       "selective", "--recompute-modules", "layernorm",
                                       "mla_up_proj"],
}


def _last(argv, flag: str) -> int:
    """The value argv gives `flag` (its last, as argparse reads it)."""
    return int(argv[len(argv) - 1 - argv[::-1].index(flag) + 1])


def _seq(argv) -> int:
    return _last(argv, "--seq-length")


def _argv(variant: str) -> list[str]:
    extra = VARIANTS[variant]
    plugins = [] if "--plugins" in extra else ["--plugins", "mla", "moe"]
    return [*TINY, *plugins, *extra]


def _built(argv, census: bool, flops: bool):
    """Builds the tiny model as the launch path specs it (one rank), runs one forward
    (census of what autograd keeps, per top module) and backward (FLOPs)."""
    import torch
    import torch._C._autograd as autograd_c
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_mtp_block_spec,
    )
    from megatron.training.argument_utils import core_transformer_config_from_args
    from torch.utils.flop_counter import FlopCounterMode

    from integration import presets
    from plugins import transform_spec
    from plugins.mla.cost import MLAShape
    from plugins.moe.cost import MoEShape
    from tests.helpers.patching import patching, plugin_fixes
    from tests.helpers.plugin_args import validated
    from upstream import cpu

    argv = [a for a in presets.expand(argv, announce=False)
            if a not in ("--fp8-cache-weights",)]
    args, plugins = validated(cpu.with_cpu_arguments(argv))
    with patching(plugin_fixes(plugins)):
        config = core_transformer_config_from_args(args)
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                          normalization=args.normalization)
        mtp = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False)
        torch.manual_seed(0)
        model = GPTModel(config=config, transformer_layer_spec=transform_spec(plugins, spec),
                         mtp_block_spec=transform_spec(plugins, mtp), vocab_size=VOCAB,
                         max_sequence_length=args.max_position_embeddings,
                         position_embedding_type="rope",
                         share_embeddings_and_output_weights=False)
        numel, part_numel = {}, {}
        for name, p in model.named_parameters():
            key = ".".join(name.split(".")[:3]) if name.startswith(("decoder.layers", "mtp.")) \
                else name.split(".")[0]
            numel[key] = numel.get(key, 0) + p.numel()
            if name.startswith("decoder.layers"):
                part = ".".join(name.split(".")[:4])
                part_numel[part] = part_numel.get(part, 0) + p.numel()
        # The plugins' modules' shapes, as their own config gives them.
        shapes = dict(mla=MLAShape.from_config(model.config),
                      moe=MoEShape.from_config(model.config),
                      mlp=(model.config.hidden_size, model.config.ffn_hidden_size,
                           model.config.gated_linear_unit))
        seq, batch = _seq(argv), _last(argv, "--micro-batch-size")
        tokens = torch.randint(VOCAB, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
        positions = torch.arange(seq).expand(batch, -1)
        # Token ids, labels and the fp32 loss mask as Megatron's get_batch gives them.
        ids, labels = tokens[:, :-1].clone(), tokens[:, 1:].clone()  # storages of their own
        mask = torch.ones(batch, seq)
        saved = _census(model, lambda: model(ids, positions, None, labels=labels,
                                             loss_mask=mask),
                        autograd_c) if census else None
        counted = part_flops = None
        if flops:
            with FlopCounterMode(display=False, custom_mapping={
                    torch.ops.aten._grouped_mm: _grouped_mm_flops}) as counter:
                model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).sum().backward()
            counted = counter.get_total_flops()
            part_flops = {name.removeprefix("GPTModel."): sum(ops.values())
                          for name, ops in counter.get_flop_counts().items()}
        return dict(numel=numel, part_numel=part_numel, shapes=shapes, saved=saved,
                    flops=counted, part_flops=part_flops)


def _grouped_mm_flops(a, b, *args, out_shape=None, **kwargs) -> int:
    """torch._grouped_mm (the experts' GEMMs), which FlopCounterMode does not count by
    itself: 2 FLOPs per multiply-add, each row of `a` meeting its own group's matrix."""
    if len(a) == 2 and len(b) == 3:  # rows [M, K] x groups [G, K, N]
        return 2 * a[0] * a[1] * b[2]
    if len(a) == 2 and len(b) == 2:  # weight gradient: [K, M] x [M, N], M cut in groups
        return 2 * a[0] * a[1] * b[1]
    return 2 * a[0] * a[1] * a[2] * b[-1]  # batched [G, M, K] x [G, K, N]


def _census(model, forward, autograd_c) -> dict[str, int]:
    """{module: bytes of the unique storages autograd keeps for backward while it runs}
    (parameters excluded), counted once the forward is done, for each layer's submodules
    (`decoder.layers.1.mlp`) and what the layer keeps outside them (`decoder.layers.1`).
    Every saved-tensor hook in force (the recomputation's own included) is wrapped: what
    its pack keeps as a tensor is counted, a recipe is not; a tensor whose graph was
    dropped during the forward (no longer alive at its end) is not counted either."""
    import weakref

    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    owner, seen = ["model"], {}

    def record(packed):
        if isinstance(packed, torch.Tensor):
            ptr = packed.untyped_storage().data_ptr()
            if ptr not in params and (ptr not in seen or seen[ptr][2]() is None):
                seen[ptr] = (owner[-1], packed.untyped_storage().nbytes(), weakref.ref(packed))
        return packed

    hooks = []
    tops = {n: m for n, m in model.named_modules()
            if n.count(".") in (2, 3) and n.startswith(("decoder.layers.", "mtp.layers."))}
    for name, module in tops.items():
        hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: owner.append(n)))
        hooks.append(module.register_forward_hook(lambda m, a, o: (owner.pop(), None)[1]))
    push = autograd_c._push_saved_tensors_default_hooks
    autograd_c._push_saved_tensors_default_hooks = lambda pack, unpack: push(
        lambda t: record(pack(t)), unpack)
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            loss = forward()
    finally:
        autograd_c._push_saved_tensors_default_hooks = push
        for hook in hooks:
            hook.remove()
    totals: dict[str, int] = {}
    for name, nbytes, alive in seen.values():
        if alive() is not None:
            totals[name] = totals.get(name, 0) + nbytes
    loss.sum().backward()  # the recipes run (and must work)
    return totals


def _kept_by(saved: dict[str, int], module: str) -> int:
    """What a module and its submodules keep, from the census."""
    return sum(n for name, n in saved.items() if name == module or name.startswith(module + "."))


def _measure(rank, world_size, variants):
    from tests.helpers.mla_build import megatron_ranks

    with megatron_ranks():
        return {v: _built(_argv(v), census=True, flops=v == "none") for v in variants}


@pytest.fixture(scope="module")
def measured():
    (results,) = run_ranks(_measure, 1, list(VARIANTS), timeout=600)
    return results


# DeepSeek-V3 scaled down: the preset's structure (a dense first layer, then MoE layers of
# 8 routed experts a token from 4 of 8 groups and a shared expert, one MTP layer, an untied
# head, the router in fp32 with its sequence-wise balance loss) at toy widths, under
# DeepSeek's recipe as describe counts it at full size (deepseek_v3.RECIPE: BF16, FP8
# linears, RMSNorm and MLA up-projections recomputed).
DSV3_SCALED = ["--preset", "deepseek-v3", "--num-layers", "3", "--moe-layer-freq",
               "([0]*1+[1]*2)", "--hidden-size", "256", "--ffn-hidden-size", "640",
               "--num-attention-heads", "4", "--q-lora-rank", "128", "--kv-lora-rank", "128",
               "--qk-head-dim", "32", "--qk-pos-emb-head-dim", "16", "--v-head-dim", "32",
               "--num-experts", "32", "--moe-ffn-hidden-size", "128",
               "--moe-shared-expert-intermediate-size", "128", "--seq-length", str(SEQ),
               "--max-position-embeddings", str(SEQ), "--vocab-size", str(VOCAB), "--bf16", "--fp8-backend", "emulated",
               "--recompute-granularity", "selective", "--recompute-modules", "layernorm",
               "mla_up_proj"]


def _measure_argv(rank, world_size, argv):
    from tests.helpers.mla_build import megatron_ranks

    with megatron_ranks():
        return _built(argv, census=True, flops=False)


@pytest.mark.parametrize("micro_batch", [1, BATCH])
def test_whole_model_activation_equals_the_census_at_a_scaled_down_deepseek_v3(micro_batch):
    """describe's activation figure for a stage, here the one stage holding the whole
    model at PP=1 (embedding, dense and MoE layers, final norm, head and loss, the MTP
    module), against the census of everything a real forward keeps for backward; one
    sequence a micro-batch (DeepSeek's) and several (the balance loss copies the scores
    to order them by sequence)."""
    argv = [*DSV3_SCALED, "--micro-batch-size", str(micro_batch)]
    (measured_,) = run_ranks(_measure_argv, 1, argv, timeout=600)
    args = d.parse(argv)
    m = d.shape(args)
    ((stage,),) = d.stages(args)
    assert stage.embedding and stage.head and stage.mtp == 1 and stage.layers == [0, 1, 2]
    formula = d.chunk_activation(m, args, stage, d.kept_activations(args, cpu_attention=True))
    assert formula == sum(measured_["saved"].values()), measured_["saved"]


def _model(variant="none"):
    return d.shape(d.parse(_argv(variant)))


def test_parameters_equal_the_built_models_numel(measured):
    numel, m = measured["none"]["numel"], _model()
    assert numel["decoder.layers.0"] == cost.layer_parameters(m, 0).total  # dense
    assert numel["decoder.layers.1"] == cost.layer_parameters(m, 1).total  # MoE
    assert numel["mtp.layers.0"] == cost.mtp_layer_parameters(m).total
    params = cost.model_parameters(d.shape(d.parse([*_argv("none"), "--vocab-size",
                                                    str(VOCAB)])))
    assert params["mtp"].total == numel["mtp.layers.0"]
    assert params["main"].total == sum(v for k, v in numel.items() if not k.startswith("mtp."))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_activation_bytes_equal_a_census_of_saved_tensors(measured, variant):
    """Per layer, in fp32 or BF16 on the CPU (the CPU's flash kernel pads v to the q/k
    width)."""
    saved = measured[variant]["saved"]
    args = d.parse(_argv(variant))
    m = d.shape(args)
    modules, _ = d.recompute_set(args)
    kept = d.kept_activations(args, cpu_attention=True)
    for name, layer in (("decoder.layers.0", 0), ("decoder.layers.1", 1)):
        seq = _seq(_argv(variant))
        formula = cost.layer_saved_bytes(m, layer, seq * BATCH, seq, modules, 1, kept)
        assert formula == _kept_by(saved, name), (name, formula, saved, cost.layer_saved_terms(
            m, layer, seq * BATCH, seq, modules, 1, kept))


@pytest.mark.parametrize("variant", ["none", "layernorm+mla_up_proj", "fp8",
                                     "fp8+layernorm+mla_up_proj", "bf16",
                                     "bf16+fp8+layernorm+mla_up_proj"])
def test_mtp_module_activation_bytes_equal_the_census(measured, variant):
    saved = measured[variant]["saved"]
    args = d.parse(_argv(variant))
    m = d.shape(args)
    modules, _ = d.recompute_set(args)
    kept = d.kept_activations(args, cpu_attention=True)
    tokens = SEQ * BATCH
    formula = (cost.layer_saved_bytes(m, m.num_layers, tokens, SEQ, modules, 1, kept)
               + cost.mtp_extra_saved_bytes(m, tokens, kept.element))
    assert formula == _kept_by(saved, "mtp.layers.0")


# --- each cost model against the module it describes, built from the same config ------------

TOKENS = SEQ * BATCH


def _kept(variant):
    """The activations as the variant's layers keep them on the CPU (plain or FP8)."""
    args = d.parse(_argv(variant))
    kind = FP8Activations if "fp8" in args.plugins else Activations
    return kind(element=2 if args.bf16 else 4, cpu_attention=True), d.recompute_set(args)[0]


def test_mla_cost_model_matches_the_built_attention(measured):
    """Parameters == numel; FLOPs == FlopCounterMode's count of the attention's matmuls
    (forward and backward; its core is the CPU flash kernel, which it does not count)."""
    built = measured["none"]
    s = built["shapes"]["mla"]
    assert mla_cost.parameters(s).total == built["part_numel"]["decoder.layers.0.self_attention"]
    matmul_weights = mla_cost.parameters(s).activated - mla_cost.latent_norm_channels(s)
    assert 6 * matmul_weights * TOKENS == built["part_flops"]["decoder.layers.0.self_attention"]


def test_moe_cost_model_matches_the_built_moe_layer(measured):
    """Parameters == numel (router, routed and shared experts; not the expert bias);
    FLOPs == FlopCounterMode's count: 6 per activated weight a token, the combine."""
    built = measured["none"]
    s = built["shapes"]["moe"]
    assert moe_cost.parameters(s).total == built["part_numel"]["decoder.layers.1.mlp"]
    per_token = 6 * moe_cost.parameters(s).activated + moe_cost.combine_flops_per_token(s)
    assert per_token * TOKENS == built["part_flops"]["decoder.layers.1.mlp"]


def test_dense_mlp_cost_matches_the_built_mlp(measured):
    built = measured["none"]
    hidden, ffn, gated = built["shapes"]["mlp"]
    assert mlp_parameters(hidden, ffn, gated) == built["part_numel"]["decoder.layers.0.mlp"]
    assert 6 * mlp_parameters(hidden, ffn, gated) * TOKENS == \
        built["part_flops"]["decoder.layers.0.mlp"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_bytes_equal_the_census_of_their_module(measured, variant):
    """MLA's, the MoE layer's and the dense MLP's saved bytes (FP8's way of keeping them
    under fp8), each against the census of its own module, for every recomputation
    choice."""
    built, (kept, modules) = measured[variant], _kept(variant)
    seq = _seq(_argv(variant))
    shapes, saved = built["shapes"], built["saved"]
    attention = mla_cost.saved_terms(shapes["mla"], seq * BATCH, seq, modules, 1, kept)
    assert math.ceil(sum(attention.values())) == saved["decoder.layers.0.self_attention"], \
        attention
    moe = moe_cost.saved_terms(shapes["moe"], seq * BATCH, modules, 1, kept)
    assert math.ceil(sum(moe.values())) == saved["decoder.layers.1.mlp"], moe
    mlp = cost.mlp_saved_terms(*shapes["mlp"], seq * BATCH, modules, kept)
    assert math.ceil(sum(mlp.values())) == saved["decoder.layers.0.mlp"], mlp


def test_flops_equal_a_count_from_the_shapes(measured):
    """FlopCounterMode counts the matmuls (forward and backward) of the built model, the
    experts' grouped GEMMs with the formula above; the CPU flash attention kernel is not
    among the ops it counts, so q.k and p.v are added from the shapes: 2 FLOPs a
    multiply-add, causal, 3x forward for forward + backward."""
    m = d.shape(d.parse([*_argv("none"), "--vocab-size", str(VOCAB)]))
    flops = cost.training_flops_per_token(m, SEQ)
    attention = 3 * (m.num_layers + m.mtp_num_layers) * cost.attention_flops_per_token(
        m.attention, SEQ)
    counted = measured["none"]["flops"]
    assert counted + attention * SEQ * BATCH == flops["total"] * SEQ * BATCH


def _rank_numel(rank, world_size):
    import os

    from tests.helpers.mla_build import megatron_ranks

    # Megatron's validation checks both against the layout
    os.environ.update(WORLD_SIZE=str(world_size), CUDA_DEVICE_MAX_CONNECTIONS="1")
    with megatron_ranks(tp=2, ep=2):
        built = _built([*_argv("none"), "--tensor-model-parallel-size", "2",
                        "--expert-tensor-parallel-size", "1",
                        "--expert-model-parallel-size", "2"], census=False, flops=False)
    return sum(built["numel"].values())


def test_each_tp_ep_rank_holds_describes_share():
    """TP=2 splits heads, FFN widths, shared experts and the vocabulary; MLA's
    down-projections, norms and router are whole on each; EP=2 halves the experts."""
    numel = run_ranks(_rank_numel, 2, timeout=600)
    args = d.parse([*_argv("none"), "--tensor-model-parallel-size", "2",
                    "--expert-tensor-parallel-size", "1",
                    "--expert-model-parallel-size", "2", "--vocab-size", str(VOCAB)])
    (rank,) = d.describe(args)["per_rank"]
    assert numel == [rank["parameters"]] * 2


def test_full_size_mla_layer_matches_the_benchmarks_census():
    """bench/results.md (mla_saved_bytes b): a DeepSeek-V3 dense layer measured on the CPU
    in BF16, GiB at 4096 tokens per recomputation choice (the bench scaled seq 256 x 16;
    3 decimals)."""
    m = d.shape(d.parse(["--preset", "deepseek-v3", "--plugins", "mla", "moe"]))
    cpu = Activations(element=2, cpu_attention=True)
    for modules, gib in (((), 1.831), (("layernorm",), 1.706), (("mla_up_proj",), 1.269),
                         (("layernorm", "mla_up_proj"), 1.144)):
        got = cost.layer_saved_bytes(m, 0, 4096, 4096, frozenset(modules), 1, cpu) / 2 ** 30
        assert abs(got - gib) < 0.0015, (modules, got)
