"""The README's demo (`integration.demo`): its command line with every plugin on, and with
each switched off, passes Megatron's parsing and every plugin's start-up checks; a short
real run of the whole recipe ends with the loss plot and the summary as its last lines
(`integration.demo_report`)."""

from __future__ import annotations

import pytest

from integration import presets
from integration.demo import PLUGINS, RANKS, SWITCHES, megatron_arguments, switched_off
from tests.helpers.plugin_args import enabled
from upstream import cpu


def _parsed(extra: list[str], monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(RANKS))  # the plugins check the demo's layout
    argv = presets.expand(megatron_arguments(extra), announce=False)
    return enabled(cpu.with_cpu_arguments(argv), monkeypatch)


def test_the_default_is_the_whole_recipe(monkeypatch):
    args, plugins = _parsed([], monkeypatch)
    assert sorted(p.name for p in plugins) == sorted(PLUGINS)
    assert args.mtp_num_layers == 1 and args.multi_latent_attention
    assert args.pipeline_model_parallel_size == 2 and args.expert_model_parallel_size == 2
    config = {p.name: p.config for p in plugins}
    assert config["dualpipe"].pipeline_schedule == "dualpipev" and config["moe"].moe_fp8_dispatch
    assert config["fp8"].backend == "emulated" and config["fp8"].fp8_cache_weights
    assert config["ema"].ema_eval and args.recompute_modules == ["layernorm", "mla_up_proj"]


@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("spelling", ["--no-{}", "--without {}"])
def test_each_switch_removes_its_plugin_and_its_flags(switch, spelling, monkeypatch):
    args, plugins = _parsed(spelling.format(switch).split(), monkeypatch)
    assert sorted(p.name for p in plugins) == sorted(name for name in PLUGINS if name != switch)
    if switch == "mla":
        assert not args.multi_latent_attention and args.recompute_granularity is None
    if switch == "moe":
        assert not args.num_experts and args.expert_model_parallel_size == 1
    if switch == "fp8":
        assert not getattr(args, "fp8", None) and not getattr(args, "fp8_cache_weights", False)
    # A plugin switched off leaves none of its flags given.
    if switch == "dualpipe":  # Megatron's 1F1B on the same 2 pipeline ranks
        assert args.pipeline_model_parallel_size == 2 and not hasattr(args, "pipeline_schedule")
    if switch == "ema":
        assert not hasattr(args, "ema_decay")
    if switch == "mtp":
        assert not args.mtp_num_layers
    else:
        assert args.mtp_num_layers == 1


def test_megatron_flags_pass_through_and_win():
    argv = megatron_arguments(["--no-ema", "--train-iters", "7", "--plugins", "bf16_moments"])
    assert argv.count("--plugins") == 1
    assert argv[argv.index("--plugins") + 1:] == ["mla", "moe", "fp8", "dualpipe", "bf16_moments"]
    assert argv[len(argv) - 1 - argv[::-1].index("--train-iters") + 1] == "7"
    with pytest.raises(SystemExit):
        switched_off(["--without", "attention"])


SHORT = ["--train-iters", "4", "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1",
         "--lr-warmup-iters", "1"]


@pytest.mark.slow
def test_a_short_run_of_the_whole_recipe_ends_with_the_plot_and_the_summary(tmp_path, capsys,
                                                                          monkeypatch):
    from integration import demo, demo_report

    monkeypatch.setenv("MEGASEEK_DATA_CACHE", str(tmp_path / "data"))
    out = tmp_path / "demo"
    demo.main(["--out", str(out), *SHORT])  # raises SystemExit unless the run exits 0

    screen = capsys.readouterr().out.rstrip().splitlines()
    png, log = out / "losses.png", out / "train.log"
    assert png.stat().st_size > 10_000
    summary = screen[screen.index("== demo summary " + "=" * 56):]
    assert summary[-2:] == [f"whole log          {log}", summary[-1]]
    assert summary[-1].startswith("TensorBoard")
    text = "\n".join(summary)
    for label in ("training loss", "MTP loss (mtp_1)", "validation loss", "with EMA weights",
                  "tokens/s", "expert load", f"loss plot          {png}"):
        assert label in text

    run = demo_report.read(log.read_text())
    assert sorted(run.train) == sorted(run.mtp) == [1, 2, 3, 4]
    assert sorted(run.validation) == sorted(run.ema_validation) == [2, 4]
    assert run.batch_size == 32 and run.seq_length == 128
    assert demo_report.tokens_per_second(run) > 0
    assert run.expert_load and all(loads for _, loads in run.expert_load)
    assert all(2.0 < loss < 7.0 for loss in run.train.values())
