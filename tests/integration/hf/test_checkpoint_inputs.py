"""Checkpoints as people have them, for `megaseek convert`: config.json files written by
today's and last year's transformers, other models, broken files, routing the router
refuses, and output folders that cannot be written.

Everything here runs in this process and stops before a model is built (no Megatron
parallel state): the config and the shards' headers are checked first. The config.json
files of tests/integration/hf/data/hf_configs were written by transformers 4.57.1 and
5.25.0 (how: the README there); no second transformers is installed for the tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.integration.hf.test_convert import BASE, tiny_hf

CONFIGS = Path(__file__).parent / "data" / "hf_configs"
WRITTEN = sorted(CONFIGS.glob("transformers-*.json"))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    tiny_hf(root / "m", seed=13)
    return root / "m"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# --- config.json as transformers writes it --------------------------------------------------

def test_the_files_of_two_transformers_releases_are_here():
    versions = {json.loads(p.read_text())["transformers_version"] for p in WRITTEN}
    assert {"4.57.1", "5.25.0"} <= versions and len(WRITTEN) == 4


@pytest.mark.parametrize("path", WRITTEN, ids=lambda p: p.stem)
def test_config_json_of_each_transformers_release_reads_as_the_same_model(path):
    """save_pretrained's file and the full dump (every PretrainedConfig field, as
    `to_json_file(use_diff=False)` writes it) of 4.57.1 and 5.25.0: one architecture.
    5.x writes its default num_nextn_predict_layers 1 (which the import then finds
    without MTP tensors and says so); 4.57 writes none."""
    from integration.hf.config import Yarn, from_hf_config

    model = from_hf_config(json.loads(path.read_text()), path)
    mtp = 1 if "5.25.0" in path.name else 0
    assert model.num_nextn_predict_layers == mtp
    expected = {k: v for k, v in BASE.items() if k != "num_key_value_heads"}
    assert {k: getattr(model, k) for k in expected} == expected
    assert model.yarn == Yarn(factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
                              beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    assert model.dtype == "bfloat16" and model.rope_theta == 10000.0


def test_every_field_of_transformers_base_config_is_classified():
    """Each field PretrainedConfig writes (the installed 4.57) is either one that cannot
    change the model (accepted with any value), one accepted only at the value that builds
    DeepSeek-V3, or a mapped field: none falls through to 'not understood'."""
    from transformers import PretrainedConfig

    from integration.hf.config import FIXED, IDENTITY, MAPPED, METADATA

    fields = set(PretrainedConfig().to_dict())
    assert not fields - METADATA - set(FIXED) - set(IDENTITY) - MAPPED


@pytest.mark.parametrize("field, value", [
    ("mlp_bias", True),                   # Llama's: changes the MLP
    ("sliding_window", 4),                # changes attention
    ("add_cross_attention", True),        # PretrainedConfig's, which would add layers
    ("pruned_heads", {"0": [1]}),
    ("per_layer_config", {"1": {"intermediate_size": 8}}),
    ("is_encoder_decoder", True),
])
def test_fields_that_change_the_model_are_refused_by_name(field, value):
    from integration.hf.config import HFConversionError, from_hf_config

    cfg = json.loads((CONFIGS / "transformers-5.25.0.saved.json").read_text())
    with pytest.raises(HFConversionError, match=rf"^config\.json: {field}: "):
        from_hf_config(dict(cfg, **{field: value}))


def test_transformers_other_names_of_a_field_are_read():
    from integration.hf.config import HFConversionError, from_hf_config

    cfg = json.loads((CONFIGS / "transformers-4.57.1.saved.json").read_text())
    assert from_hf_config(dict(cfg, num_mtp_layers=1)).num_nextn_predict_layers == 1
    with pytest.raises(HFConversionError, match=r"num_local_experts: 8 differs from "
                                                r"n_routed_experts 4"):
        from_hf_config(dict(cfg, num_local_experts=8))


def test_another_model_is_named_as_such_first():
    """A Llama config says it is not DeepSeek-V3, not which of its fields is unknown."""
    from transformers import LlamaConfig

    from integration.hf.config import HFConversionError, from_hf_config

    llama = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=2, num_attention_heads=2).to_diff_dict()
    with pytest.raises(HFConversionError, match=r"^config\.json: model_type llama: not a "
                                                r"DeepSeek-V3 checkpoint"):
        from_hf_config(llama)
    with pytest.raises(HFConversionError, match=r"^config\.json: architectures "
                                                r"LlamaForCausalLM: not a DeepSeek-V3"):
        from_hf_config({"architectures": ["LlamaForCausalLM"], "mlp_bias": False})


@pytest.mark.parametrize("field, value, message", [
    ("rms_norm_eps", -1e-6, "rms_norm_eps: must be above 0, got -1e-06"),
    ("rms_norm_eps", 0, "rms_norm_eps: must be above 0, got 0"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps: needs a finite number, got nan"),
    ("rope_theta", -10000.0, "rope_theta: must be above 0, got -10000.0"),
    ("rope_theta", float("inf"), "rope_theta: needs a finite number, got inf"),
    ("routed_scaling_factor", 0.0, "routed_scaling_factor: must be above 0, got 0.0"),
    ("attention_dropout", 1.0, "attention_dropout: must be below 1, got 1.0"),
    ("attention_dropout", -0.1, "attention_dropout: must be at least 0, got -0.1"),
    ("hidden_size", 0, r"hidden_size: needs an integer >= 1, got 0"),
    ("rope_scaling", {"type": "yarn", "factor": 4, "original_max_position_embeddings": 0},
     r"rope_scaling\.original_max_position_embeddings: must be at least 1, got 0"),
    ("rope_scaling", {"type": "yarn", "factor": 4, "original_max_position_embeddings": 16,
                      "beta_fast": -32}, r"rope_scaling\.beta_fast: must be above 0, got -32"),
    ("rope_scaling", {"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 16},
     r"rope_scaling\.factor: must be at least 1, got 0\.5"),
])
def test_a_number_outside_its_domain_is_refused_naming_the_field(field, value, message):
    """Every number the converter maps is checked against its domain (eps and theta > 0,
    sizes >= 1, dropout in [0, 1), finite), not written into Megatron's flags."""
    from integration.hf.config import HFConversionError, from_hf_config

    cfg = json.loads((CONFIGS / "transformers-4.57.1.saved.json").read_text())
    with pytest.raises(HFConversionError, match=rf"^config\.json: {message}$"):
        from_hf_config(dict(cfg, **{field: value}))


def test_hf_to_megatron_of_a_negative_epsilon_exits_2_naming_it(plain, tmp_path, capsys):
    from integration.hf import cli

    folder = _copy(plain, tmp_path / "c")
    (folder / "config.json").write_text(json.dumps(dict(_config(folder), rms_norm_eps=-1e-6)))
    with pytest.raises(SystemExit) as exited:
        cli.main(["hf-to-megatron", str(folder), str(tmp_path / "out")])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (f"megaseek: error: {folder / 'config.json'}: "
                                       "rms_norm_eps: must be above 0, got -1e-06\n")
    assert not (tmp_path / "out").exists()


# --- broken files --------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ('{"model_type": "deepseek_v3", ', r"not valid JSON \(Expecting property name enclosed "
                                       r"in double quotes at line 1 column 31\)"),
    ("[1, 2]", r"not a model config \(a JSON object of fields\) \(a JSON list\)"),
    (None, r"hidden_size: missing \(an integer >= 1\)"),
    ("rms_norm_eps", r"rms_norm_eps: needs a number, got 'small'"),
    ("rope_scaling", r"rope_scaling\.factor: needs a number, got 'four'"),
])
def test_a_broken_config_json_is_named_with_what_is_wrong(plain, tmp_path, text, message):
    from integration.hf.config import HFConversionError, read_hf_model

    folder = _copy(plain, tmp_path / "c")
    cfg = _config(folder)
    if text is None:
        del cfg["hidden_size"]
    elif text == "rms_norm_eps":
        cfg["rms_norm_eps"] = "small"
    elif text == "rope_scaling":
        cfg["rope_scaling"] = {"type": "yarn", "factor": "four",
                               "original_max_position_embeddings": 16}
    (folder / "config.json").write_text(text if text and text[0] in "[{" else json.dumps(cfg))
    with pytest.raises(HFConversionError,
                       match=rf"^{re.escape(str(folder / 'config.json'))}: {message}"):
        read_hf_model(folder)


def test_a_file_given_for_the_model_folder_is_named_as_a_file(tmp_path):
    from integration.hf.config import HFConversionError, read_hf_model

    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(HFConversionError, match=rf"^{re.escape(str(tmp_path))}/model\.safetensors "
                                                r"is a file: give the Hugging Face model's folder"):
        read_hf_model(tmp_path / "model.safetensors")


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("damage, message", [
    (lambda shard: _cut(shard, shard.stat().st_size - 100),
     "not a readable safetensors file (cut short or corrupt): incomplete metadata, file not "
     "fully covered"),
    (lambda shard: shard.write_bytes(b"\xff" * 64), "not a readable safetensors file (cut short "
                                                    "or corrupt): header too large"),
    (lambda shard: _cut(shard, 4), "not a readable safetensors file (cut short or corrupt): "
                                   "header too small"),
])
def test_a_corrupt_shard_is_named_before_anything_is_built(plain, tmp_path, damage, message):
    from integration.hf import HFConversionError, import_hf

    folder = _copy(plain, tmp_path / "c")
    shard = sorted(folder.glob("model-*.safetensors"))[2]
    damage(shard)
    with pytest.raises(HFConversionError) as refused:
        import_hf(folder)
    assert str(refused.value).startswith(f"{shard}") and str(refused.value).endswith(message)


def test_a_broken_index_is_named(plain, tmp_path):
    from integration.hf import HFConversionError, import_hf

    folder = _copy(plain, tmp_path / "c")
    index = folder / "model.safetensors.index.json"
    index.write_text(index.read_text()[:50])
    with pytest.raises(HFConversionError, match=rf"^{re.escape(str(index))}: not valid JSON"):
        import_hf(folder)


# --- values Megatron or the router would refuse, by their config.json names -----------------

@pytest.mark.parametrize("edit, message", [
    (dict(num_experts_per_tok=5),
     r"num_experts_per_tok: 5 is more than the 4 routed experts \(n_routed_experts\)"),
    (dict(num_experts_per_tok=3), r"num_experts_per_tok \(3\) exceeds the 2 experts that "
                                  r"topk_group \(1\) groups of 2 experts offer"),
    (dict(n_group=3), r"n_routed_experts \(4\) must be divisible by n_group \(3\)"),
    (dict(topk_group=3), r"topk_group \(3\) must be in \[1, n_group \(2\)\]"),
])
def test_routing_the_router_refuses_is_named_by_config_fields(edit, message):
    from integration.hf.config import HFConversionError, from_hf_config

    cfg = json.loads((CONFIGS / "transformers-4.57.1.saved.json").read_text())
    with pytest.raises(HFConversionError, match=rf"^config\.json: {message}$"):
        from_hf_config(dict(cfg, **edit))


def test_megatrons_refusal_of_the_config_names_config_json_fields():
    """What Megatron's own config refuses (here: groups that do not divide the experts,
    past the converter's checks) reads in config.json's names, not Megatron's."""
    from integration.hf.config import HFConversionError, from_hf_config, in_config_terms
    from integration.hf.convert import megatron_config

    hf = from_hf_config(json.loads((CONFIGS / "transformers-4.57.1.saved.json").read_text()))
    with pytest.raises(HFConversionError, match=r"^config\.json: Megatron refuses the model "
                                                r"it describes: n_routed_experts \(4\) should "
                                                r"be divisible by n_group \(3\)"):
        megatron_config(dataclasses.replace(hf, n_group=3), {"mtp_layers": 0}, {})
    assert in_config_terms("--moe-router-topk and moe_router_topk_scaling_factor, "
                           "mtp_num_layers, --num-layers-x") == (
        "num_experts_per_tok and routed_scaling_factor, num_nextn_predict_layers, "
        "--num-layers-x")


# --- the output folder ---------------------------------------------------------------------

@contextlib.contextmanager
def _unprivileged():
    """This process without root's right to write anywhere (permission bits bind it)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)  # nobody
    try:
        yield
    finally:
        os.seteuid(0)


def test_output_folders_that_cannot_be_written_are_refused_by_name(tmp_path):
    from integration.output_dir import OutputFolderError, check_output_folder

    source = tmp_path / "in"
    (source / "sub").mkdir(parents=True)
    for out, message in [(source, "is the input"), (source / "sub" / "x", "is inside the input"),
                         (tmp_path, "contains the input"),
                         (source / "sub", "is inside the input")]:
        with pytest.raises(OutputFolderError, match=message):
            check_output_folder(out, overwrite=True, inputs=[source])
    (tmp_path / "done").mkdir()
    with pytest.raises(OutputFolderError, match=r"done exists; pass --overwrite to replace it"):
        check_output_folder(tmp_path / "done", overwrite=False)
    check_output_folder(tmp_path / "done", overwrite=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputFolderError,
                       match=rf"{re.escape(str(tmp_path / 'file'))} is a file, not a folder"):
        check_output_folder(tmp_path / "file" / "a" / "out", overwrite=False)
    check_output_folder(tmp_path / "new" / "deeper" / "out", overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done", "file", "in"]  # no probe left



@pytest.fixture
def read_only():
    """A folder this process may not write in once `_unprivileged` (made outside pytest's
    private tmp folder, so that the unprivileged user can reach it)."""
    shared = Path(tempfile.mkdtemp(prefix="megaseek-readonly-"))
    try:
        shared.chmod(0o755)
        (shared / "ro").mkdir(mode=0o555)
        yield shared / "ro"
    finally:
        (shared / "ro").chmod(0o755)
        shutil.rmtree(shared)


def test_an_output_folder_without_write_permission_is_refused_before_any_work(
        plain, read_only, capsys):
    # what the command imports before its first check, imported while the interpreter's
    # files (perhaps in root's home) can still be read
    import integration.hf.convert  # noqa: F401
    import integration.hf.layout  # noqa: F401
    import integration.hf.safetensors_io  # noqa: F401
    from integration.hf import cli
    from integration.output_dir import OutputFolderError, check_output_folder

    with _unprivileged(), pytest.raises(OutputFolderError) as refused:
        check_output_folder(read_only / "out", overwrite=False)
    assert str(refused.value) == (f"{read_only / 'out'}: cannot write in {read_only} "
                                  "(Permission denied)")
    with _unprivileged(), pytest.raises(SystemExit) as exited:
        cli.main(["hf-to-megatron", str(plain), str(read_only / "out" / "megatron")])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (f"megaseek: error: {read_only / 'out' / 'megatron'}"
                                       f": cannot write in {read_only} (Permission denied)\n")


@pytest.mark.parametrize("direction", ["hf-to-megatron", "megatron-to-hf"])
def test_convert_exits_2_on_an_existing_output_before_any_work(plain, tmp_path, capsys,
                                                                  direction):
    from integration.hf import cli

    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as exited:
        cli.main([direction, str(plain), str(tmp_path / "out")])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (f"megaseek: error: {tmp_path / 'out'} exists; "
                                       "pass --overwrite to replace it\n")


@pytest.mark.parametrize("direction", ["hf-to-megatron", "megatron-to-hf"])
def test_overwrite_replaces_a_folder_never_a_file(plain, tmp_path, capsys, direction):
    from integration.hf import cli

    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as exited:
            cli.main([direction, str(plain), str(afile), *extra])
        assert exited.value.code == 2
        assert capsys.readouterr().err == (f"megaseek: error: {afile} is not a folder; "
                                           "--overwrite replaces a previous output (a folder), "
                                           "never a file: write to another path\n")
    assert afile.read_text() == "keep me"


def test_megatron_to_hf_names_the_folder_as_given(plain, tmp_path, capsys):
    """CKPT is a positional argument of megatron-to-hf: the refusal names it, not --load."""
    from integration.hf import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(["megatron-to-hf", str(plain), str(tmp_path / "out")])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (f"megaseek: error: {plain}: no checkpoint there "
                                       "(no latest_checkpointed_iteration.txt)\n")


def test_convert_exits_2_naming_the_config_field(plain, tmp_path, capsys):
    from integration.hf import cli

    folder = _copy(plain, tmp_path / "c")
    (folder / "config.json").write_text(json.dumps(dict(_config(folder), num_experts_per_tok=7)))
    with pytest.raises(SystemExit) as exited:
        cli.main(["hf-to-megatron", str(folder), str(tmp_path / "out")])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megaseek: error: {folder / 'config.json'}: "
                          "num_experts_per_tok: 7 is more than the 4 routed experts "
                          "(n_routed_experts)\n") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_check_finite_names_nan_and_inf_in_each_dtype():
    import torch

    from integration.hf import HFConversionError
    from integration.hf.convert import check_finite

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        clean = torch.randn(64, 8).to(dtype)
        check_finite(clean, "w", "here")
        for bad, counts in ((float("nan"), "1 NaN and 0 inf"), (float("inf"), "0 NaN and 1 inf"),
                            (float("-inf"), "0 NaN and 1 inf")):
            dirty = clean.clone()
            dirty[5, 3] = bad
            with pytest.raises(HFConversionError, match=rf"^w: {counts} among its 512 values "
                                                        "here"):
                check_finite(dirty, "w", "here")
    check_finite(torch.zeros(0), "empty", "here")
    check_finite(torch.arange(4), "integers", "here")


def test_the_config_of_an_fp8_moe_run_builds_for_export(monkeypatch):
    """A checkpoint trained with --plugins fp8 and MoE (the tiny preset) exports: FP8 changes
    no weight, and Megatron's config refuses MoE FP8 without Transformer Engine by itself
    (the fp8 plugin lifts that check inside a run only). Before, megatron-to-hf of such a
    checkpoint failed with that ValueError (a new user's try, 2026-12-06)."""
    from integration import checkpoint_tool, presets
    from integration.hf import cli
    from integration.pretrain import with_defaults
    from tests.helpers.plugin_args import validated

    argv = with_defaults(presets.expand(
        ["--preset", "tiny", "--mock-data", "--micro-batch-size", "1", "--global-batch-size",
         "4", "--train-iters", "2", "--lr", "1e-3"], announce=False))
    monkeypatch.setenv("WORLD_SIZE", "4")
    args, _ = validated(argv)
    assert args.fp8 and args.num_experts  # what made Megatron's config refuse
    monkeypatch.setattr(checkpoint_tool, "saved_arguments", lambda directory: args)
    config, vocab, _ = cli._config_from_saved_arguments("ckpt")
    assert config.fp8 is None and config.num_moe_experts == args.num_experts
    assert vocab == args.padded_vocab_size
