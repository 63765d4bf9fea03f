"""`--preset NAME`: expansion, precedence of the user's flags, refusals, and every preset
parsing and validating as the launch path does (Megatron's parser and validation plus the
plugins' start-up checks, on one process; nothing is built)."""

from __future__ import annotations

import pytest

from integration import presets
from integration.presets import PRESETS, expand, options


def test_argv_without_preset_comes_back_unchanged(capsys):
    argv = ["--num-layers", "2", "--hidden-size=64"]
    assert expand(argv) == argv
    assert capsys.readouterr().out == ""


def test_expansion_is_printed_once_on_rank_0(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    argv = expand(["--preset", "tiny", "--micro-batch-size", "2"])
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and printed[0].startswith("megaseek: --preset tiny: --num-layers 4 ")
    assert "--moe-layer-freq '([0]+[1]*3)'" in printed[0]  # shell-quoted: copy-pasteable
    assert argv[-2:] == ["--micro-batch-size", "2"] and "--preset" not in argv
    monkeypatch.setenv("RANK", "1")
    expand(["--preset", "tiny"])
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("user", [["--hidden-size", "256"], ["--hidden-size=256"]])
def test_a_flag_the_user_gives_wins(user):
    argv = expand(["--preset", "tiny", *user], announce=False)
    assert options(argv)["--hidden-size"] == ["256"]
    assert sum(a.startswith("--hidden-size") for a in argv) == 1  # the preset's is dropped


def test_the_users_plugins_list_wins_with_its_plugins_flags():
    """--plugins mla moe with deepseek-v3: no FP8 flag is left behind (it would be refused
    as orphaned); the MLA and MoE flags stay."""
    argv = expand(["--preset", "deepseek-v3", "--plugins", "mla", "moe"], announce=False)
    found = options(argv)
    assert found["--plugins"] == ["mla", "moe"] and argv.count("--plugins") == 1
    assert "--fp8-format" not in found and "--fp8-recipe" not in found
    assert found["--kv-lora-rank"] == ["512"] and found["--num-experts"] == ["256"]
    dense = options(expand(["--preset", "deepseek-v3", "--plugins", "moe"], announce=False))
    assert "--multi-latent-attention" not in dense and "--q-lora-rank" not in dense


def test_unknown_preset_lists_the_presets(capsys):
    with pytest.raises(SystemExit) as exited:
        expand(["--preset", "foo"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("megaseek: error: --preset foo: unknown; the presets are tiny, ")
    assert all(name in err for name in PRESETS)


def test_a_bad_preset_is_said_once_on_rank_0(monkeypatch, capsys):
    """Every rank expands the presets; only rank 0 says what is wrong (the others wait for
    it before exiting, as every refusal: integration.hooks.exit_refused)."""
    from integration import hooks

    slept = []
    monkeypatch.setattr(hooks.time, "sleep", slept.append)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exited:
        expand(["--preset", "foo"])
    assert exited.value.code == 2 and capsys.readouterr().err == "" and slept


@pytest.mark.parametrize("argv, message", [
    (["--preset", "deepseek-v3", "--num-experts", "100"],
     "--num-experts 100 is not divisible by the preset's --moe-router-num-groups 8 "
     "(--preset deepseek-v3)"),
    (["--preset", "deepseek-v3", "--moe-router-group-topk", "9"],
     "--moe-router-group-topk 9 is more than the preset's --moe-router-num-groups 8"),
    (["--preset", "tiny", "--moe-router-topk", "20"],
     "--moe-router-topk 20 is more than the preset's --num-experts 16"),
    (["--preset", "deepseek-v3", "--moe-router-topk", "200"],
     "--moe-router-topk 200 is more than the 128 experts that the preset's "
     "--moe-router-group-topk 4 of the preset's --moe-router-num-groups 8 over the preset's "
     "--num-experts 256 allow"),
    (["--preset", "tiny", "--num-layers", "8"],
     "--num-layers 8 does not match the preset's --moe-layer-freq ([0]+[1]*3) (4 layers)"),
    (["--preset", "deepseek-v3", "--tensor-model-parallel-size", "3"],
     "the preset's --num-attention-heads 128 is not divisible by "
     "--tensor-model-parallel-size 3"),
    (["--preset", "deepseek-v3", "--expert-model-parallel-size", "3"],
     "the preset's --num-experts 256 is not divisible by --expert-model-parallel-size 3"),
    (["--preset", "tiny", "--preset", "deepseek-v3"],
     "--preset given twice (tiny and deepseek-v3); give one"),
    (["--preset"], "--preset needs a name"),
], ids=["groups-divide-experts", "group-topk", "topk", "topk-groups-fill", "layer-freq",
        "tp-heads", "ep-experts", "twice", "no-name"])
def test_contradictions_fail_naming_both(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        expand(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_consistent_overrides_pass():
    """Overrides that change both sides together, or stay consistent, go through."""
    expand(["--preset", "tiny", "--num-layers", "2", "--moe-layer-freq", "([0]+[1])"],
           announce=False)
    expand(["--preset", "deepseek-v3", "--num-experts", "64", "--expert-model-parallel-size",
            "64"], announce=False)


def test_every_preset_names_its_sources():
    for preset in PRESETS.values():
        assert preset.sources and preset.summary
    assert "Disagreement" in PRESETS["deepseek-v3"].sources
    assert "Disagreement" in PRESETS["deepseek-v2-lite"].sources


def test_tiny_is_the_demos_model():
    """The demo trains the tiny preset: MLA, MoE, FP8 (their shapes 128-wide where FP8 needs
    whole tiles), one MTP layer, built through the DeepSeek-V3 spec."""
    from integration import demo

    assert demo.MODEL == ["--preset", "tiny"]
    tiny = options(PRESETS["tiny"].flags())
    assert tiny["--plugins"] == ["mla", "moe", "fp8"] and tiny["--mtp-num-layers"] == ["1"]
    assert tiny["--spec"] == ["integration.deepseek_v3", "decoder_spec"]
    assert tiny["--hidden-size"] == ["128"] and tiny["--q-lora-rank"] == ["128"]


@pytest.mark.parametrize("name, extra", [(name, []) for name in PRESETS] + [
    ("deepseek-v3", ["--plugins", "mla", "moe"]),
    ("deepseek-v3", ["--expert-model-parallel-size", "64"]),
], ids=[*PRESETS, "deepseek-v3-no-fp8", "deepseek-v3-ep64"])
def test_preset_parses_and_validates(name, extra, monkeypatch):
    """Megatron's parse_args and validate_args and every plugin's start-up check accept
    the preset (with the CPU flags `megaseek pretrain` adds), and the model is the preset's."""
    from tests.helpers.plugin_args import validated
    from upstream import cpu

    monkeypatch.setenv("WORLD_SIZE", "64" if "--expert-model-parallel-size" in extra else "1")
    argv = cpu.with_cpu_arguments(expand(["--preset", name, "--micro-batch-size", "1",
                                          *extra], announce=False))
    args, plugins = validated(argv)
    flags = options(presets.preset_flags(name, extra))
    assert [p.name for p in plugins if p.name in ("mla", "moe", "fp8")] == (
        flags.get("--plugins") or options(extra)["--plugins"])
    assert args.num_layers == int(flags["--num-layers"][0])
    assert args.hidden_size == int(flags["--hidden-size"][0])
    if "--num-experts" in flags:
        assert args.num_experts == int(flags["--num-experts"][0])
    if name in ("deepseek-v3", "tiny"):
        assert args.mtp_num_layers == 1


def test_pretrain_and_launch_expand_the_preset(monkeypatch, capsys, tmp_path):
    """Both entry points refuse an unknown preset at once (exit 2), before Megatron starts."""
    from integration import launch, pretrain

    monkeypatch.setenv("WORLD_SIZE", "1")  # no single-rank set-up of the environment
    with pytest.raises(SystemExit) as exited:
        pretrain.main(["--preset", "nope"])
    assert exited.value.code == 2
    script = tmp_path / "script.py"
    script.write_text("raise SystemExit(5)\n")
    with pytest.raises(SystemExit) as exited:
        launch.main([str(script), "--preset", "nope"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.count("--preset nope: unknown") == 2
