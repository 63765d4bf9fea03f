"""Hugging Face DeepSeek-V3 checkpoints in and out (`integration.hf`), against transformers.

Tiny random `DeepseekV3ForCausalLM`s are made here (no downloads) and saved in several
shards; the Megatron side runs in one spawned rank (`run_ranks(..., 1)`: Megatron's
parallel state stays out of the test process), all cases in one run to pay Megatron's
start-up once. Checks that need no Megatron model (config, names, FP8 scales, the staged
folder) run here: `import_hf` stops on them before it builds anything.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import paths
from tests.helpers.multirank import run_ranks

REPO = paths.REPO
VOCAB, SEQ = 50, 9
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
            n_shared_experts=1, n_routed_experts=4, kv_lora_rank=16, q_lora_rank=24,
            qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=8, n_group=2, topk_group=1,
            num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=64,
            routed_scaling_factor=2.5)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.7}
CASES = {
    # q-LoRA, YaRN with mscale_all_dim != mscale, groups, one dense layer
    "yarn_qlora_k1": dict(rope_scaling=YARN),
    # no q-LoRA (q_proj), plain RoPE, every layer MoE, no groups
    "rope_noqlora_k0": dict(q_lora_rank=None, first_k_dense_replace=0, n_group=1, topk_group=1),
    # DeepSeek-V3's mscales (1, 1), two dense layers of four, two shared experts
    "yarn_dsv3_k2": dict(rope_scaling=dict(YARN, mscale_all_dim=1.0), first_k_dense_replace=2,
                         n_shared_experts=2, num_hidden_layers=4),
}


def tiny_hf(folder: Path, seed: int = 0, **overrides):
    """A random DeepseekV3ForCausalLM saved by transformers in ~20 KB shards; its weights
    are O(1) (norms around 1, a non-zero e_score_correction_bias that changes choices) so
    every path matters."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV3Config(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        for module in model.modules():
            # Positive: transformers masks the groups it drops with 0.0, DeepSeek (and the
            # moe plugin) with -inf; they choose alike while every biased score is > 0.
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.uniform_(0.0, 0.3)
    model.save_pretrained(folder, max_shard_size="20KB")
    return model


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def hf_logits(folder: Path) -> torch.Tensor:
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens()).logits


def megatron_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(tokens(), torch.arange(SEQ).expand(2, SEQ), None)


def with_mtp(src: Path, dst: Path, seed: int = 3) -> None:
    """`src` (a transformers folder with num_hidden_layers L+1) rewritten as DeepSeek
    publishes checkpoints: L layers plus layer L as the MTP layer (enorm, hnorm, eh_proj,
    shared_head, copies of the embedding and head), num_nextn_predict_layers 1."""
    from safetensors.torch import save_file

    cfg = json.loads((src / "config.json").read_text())
    layers = cfg["num_hidden_layers"] - 1
    cfg.update(num_hidden_layers=layers, num_nextn_predict_layers=1)
    tensors = hf_tensors(src)
    g = torch.Generator().manual_seed(seed)
    hidden = cfg["hidden_size"]
    p = f"model.layers.{layers}."
    tensors.update({
        p + "enorm.weight": torch.rand(hidden, generator=g) + 0.5,
        p + "hnorm.weight": torch.rand(hidden, generator=g) + 0.5,
        p + "eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=g) * 0.2,
        p + "shared_head.norm.weight": torch.rand(hidden, generator=g) + 0.5,
        p + "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
        p + "shared_head.head.weight": tensors["lm_head.weight"].clone(),
    })
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(cfg))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: tensors[n].contiguous() for n in part}, str(dst / file))
    index = {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))


def fp8_checkpoint(src: Path, dst: Path, seed: int = 5) -> dict[str, torch.Tensor]:
    """`src` rewritten in DeepSeek's FP8 format: every 2-D projection weight (not the
    embedding, head, norms, router) as E4M3 bytes plus `weight_scale_inv` per 128x128
    block, ragged edges included. Returns the weights by the formula
    W[i, j] = fp32(q[i, j]) * scale_inv[i // 128, j // 128]."""
    from safetensors.torch import save_file

    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                  "quant_method": "fp8", "weight_block_size": [128, 128]}
    g = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for name, w in hf_tensors(src).items():
        fp8 = w.dim() == 2 and "proj" in name
        if not fp8:
            tensors[name] = expected[name] = w
            continue
        q = (torch.randn(w.shape, generator=g) * 100).to(torch.float8_e4m3fn)
        blocks = (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
        scale = torch.rand(blocks, generator=g) * 1e-2 + 1e-3
        tensors[name], tensors[name + "_scale_inv"] = q, scale
        full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
        expected[name] = q.float() * full[: w.shape[0], : w.shape[1]]
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(dst / "model.safetensors"))
    return expected


# --- one rank of Megatron: every case that builds a model --------------------------------

def _megatron_cases(rank, world_size, root: str):
    from integration.hf import HFConversionError, export_hf, import_hf

    root = Path(root)
    found = {}
    for case in CASES:
        model, config = import_hf(root / case)
        found[case] = {"logits": megatron_logits(model)}
        out = root / f"{case}-export"
        export_hf(model, config, out)
        again, _ = import_hf(out)
        found[case]["state"] = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
        found[case]["again"] = {k: v for k, v in again.state_dict().items() if torch.is_tensor(v)}
        try:
            export_hf(model, config, out)
        except HFConversionError as e:
            found[case]["exists"] = str(e)
        export_hf(model, config, out, overwrite=True)

    model, config = import_hf(root / "mtp")
    found["mtp"] = {"state": {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)},
                    "has_mtp": model.mtp is not None}
    export_hf(model, config, root / "mtp-export", max_shard_bytes=4096)
    model, _ = import_hf(root / "mtp", mtp_num_layers=0)
    found["mtp0"] = {"has_mtp": getattr(model, "mtp", None) is not None,
                     "logits": megatron_logits(model)}
    model, config = import_hf(root / "fp8")
    export_hf(model, config, root / "fp8-export")
    model, config = import_hf(root / "yarn_qlora_k1")
    export_hf(model, config, root / "fp8-written", fp8=True)
    again, again_config = import_hf(root / "fp8-written")
    export_hf(again, again_config, root / "fp8-written-back")
    try:
        import_hf(root / "badshape")
    except HFConversionError as e:
        found["badshape"] = str(e)
    found["non-finite"] = _non_finite_cases(root, import_hf, export_hf, HFConversionError)
    return found


def _non_finite_cases(root: Path, import_hf, export_hf, error) -> dict[str, str]:
    """What the conversions say of a NaN in a checkpoint, an inf in a model being exported,
    and weights beyond float16's range cast to it (either way); nothing is written."""
    said = {}

    def refusal(name, convert, *args, **kwargs):
        try:
            convert(*args, **kwargs)
        except error as e:
            said[name] = str(e)

    refusal("nan import", import_hf, root / "nan")
    refusal("large import as float16", import_hf, root / "large", params_dtype=torch.float16)
    model, config = import_hf(root / "large")
    refusal("large export as float16", export_hf, model, config, root / "large-fp16",
            dtype=torch.float16)
    with torch.no_grad():
        model.state_dict()["decoder.layers.1.mlp.experts.weight1"][2, 0, 0] = float("-inf")
    refusal("inf export", export_hf, model, config, root / "inf-export")
    said["written"] = sorted(p.name for p in root.iterdir()
                             if p.name.startswith((".", "large-", "inf-")))
    return said


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    hf = {case: tiny_hf(root / case, seed=i, **overrides)
          for i, (case, overrides) in enumerate(CASES.items())}
    tiny_hf(root / "mtp-source", seed=7, num_hidden_layers=3, first_k_dense_replace=1)
    with_mtp(root / "mtp-source", root / "mtp")
    tiny_hf(root / "fp8-source", seed=8, intermediate_size=160, moe_intermediate_size=136,
            hidden_size=144, q_lora_rank=None, kv_lora_rank=130, num_hidden_layers=2)
    expected_fp8 = fp8_checkpoint(root / "fp8-source", root / "fp8")
    tiny_hf(root / "badshape", seed=9)
    cfg = json.loads((root / "badshape" / "config.json").read_text())
    (root / "badshape" / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=40)))
    nan = hf_tensors(root / "yarn_qlora_k1")
    nan["model.layers.2.self_attn.o_proj.weight"][3, 1] = float("nan")
    _write(root / "yarn_qlora_k1", root / "nan", nan)
    large = hf_tensors(root / "yarn_qlora_k1")
    large["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e5  # float16 reaches 65504
    _write(root / "yarn_qlora_k1", root / "large", large)
    found = run_ranks(_megatron_cases, 1, str(root))[0]
    # The command, both ways, in one process of its own (Megatron's checkpoint writer
    # starts processes, which run_ranks' daemonic ranks may not).
    to_megatron = ["hf-to-megatron", str(root / "mtp"), str(root / "mtp-megatron")]
    to_hf = ["megatron-to-hf", str(root / "mtp-megatron"), str(root / "mtp-roundtrip"),
             "--max-shard-size", "8KB"]
    no_mtp = ["hf-to-megatron", str(root / "mtp"), str(root / "mtp0-megatron"),
              "--mtp-num-layers", "0"]
    code = ("from integration.hf import cli\n"
            f"cli.main({to_megatron!r})\ncli.main({to_hf!r})\ncli.main({no_mtp!r})\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"},
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found["command"], found["command_log"] = run.stdout, run.stderr
    return root, hf, found, expected_fp8


def _write(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> None:
    """`tensors` as one safetensors file beside a copy of `src`'s config.json."""
    from safetensors.torch import save_file

    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, str(dst / "model.safetensors"))


@pytest.mark.parametrize("case", CASES)
def test_imported_logits_equal_transformers(converted, case):
    root, hf, found, _ = converted
    with torch.no_grad():
        expected = hf[case](tokens()).logits
    # fp32 on both sides, same math in another order (MLA, grouped experts): rounding only
    torch.testing.assert_close(found[case]["logits"], expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("case", CASES)
def test_export_loads_in_transformers_identically(converted, case):
    root, hf, found, _ = converted
    out = root / f"{case}-export"
    assert hf_tensors(out).keys() == hf_tensors(root / case).keys()
    for name, tensor in hf_tensors(root / case).items():
        assert torch.equal(hf_tensors(out)[name], tensor), name
    torch.testing.assert_close(hf_logits(out), hf_logits(root / case), rtol=0, atol=0)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hf_tensors(out))


@pytest.mark.parametrize("case", CASES)
def test_import_of_export_is_tensor_identical(converted, case):
    _, _, found, _ = converted
    state, again = found[case]["state"], found[case]["again"]
    assert state.keys() == again.keys()
    for name in state:
        assert torch.equal(state[name], again[name]), name


def test_existing_output_needs_overwrite(converted):
    _, _, found, _ = converted
    assert "exists; pass overwrite=True" in found["yarn_qlora_k1"]["exists"]


def test_mtp_layer_maps_both_ways(converted):
    root, _, found, _ = converted
    assert found["mtp"]["has_mtp"]
    state, source = found["mtp"]["state"], hf_tensors(root / "mtp")
    p = "model.layers.2."  # after the 2 decoder layers
    for hf_name, megatron in (("enorm.weight", "enorm.weight"), ("hnorm.weight", "hnorm.weight"),
                              ("eh_proj.weight", "eh_proj.weight"),
                              ("shared_head.norm.weight", "final_layernorm.weight"),
                              ("self_attn.kv_b_proj.weight",
                               "mtp_model_layer.self_attention.linear_kv_up_proj.weight"),
                              ("mlp.gate.e_score_correction_bias",
                               "mtp_model_layer.mlp.router.e_score_correction_bias")):
        assert torch.equal(state["mtp.layers.0." + megatron], source[p + hf_name]), hf_name
    exported = hf_tensors(root / "mtp-export")
    assert exported.keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(exported[name], tensor), name
    assert len(list((root / "mtp-export").glob("*.safetensors"))) > 5  # 4 KB shards
    assert json.loads((root / "mtp-export" / "config.json").read_text())[
        "num_nextn_predict_layers"] == 1


def test_command_converts_to_a_megatron_checkpoint_and_back(converted):
    root, _, found, _ = converted
    assert "--mtp-num-layers 1" in found["command"]
    megatron = root / "mtp-megatron"
    assert (megatron / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert (megatron / "release" / "metadata.json").is_file()
    flags = (megatron / "megatron_flags.txt").read_text().split()
    assert flags[flags.index("--mtp-num-layers") + 1] == "1"
    source, back = hf_tensors(root / "mtp"), hf_tensors(root / "mtp-roundtrip")
    assert back.keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(back[name], tensor), name
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging left


def test_ema_export_of_a_converted_checkpoint_says_it_needs_ema(converted, capsys):
    """A converted checkpoint holds no EMA (and no saved arguments): ema-export says what
    it needs, not what else is missing."""
    from integration.cli import main

    root = converted[0]
    with pytest.raises(SystemExit) as exited:
        main(["ema-export", "--load", str(root / "mtp-megatron"), "--save", str(root / "ema")])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "megaseek: error: ema-export needs a checkpoint saved by training with --plugins ema; "
        f"{root / 'mtp-megatron'} holds no EMA (no megaseek:ema.* weights)\n")
    assert not (root / "ema").exists()


def test_mtp_num_layers_0_skips_it(converted):
    _, _, found, _ = converted
    assert not found["mtp0"]["has_mtp"]
    # the command says so once (its streamed save plans again, silently); where depends on
    # the logging Megatron set up in that process
    said = found["command"] + found["command_log"]
    assert said.count("leaving out the checkpoint's 1 MTP layer") == 1


def test_fp8_weights_import_as_the_dequantisation_formula(converted):
    root, _, _, expected = converted
    exported = hf_tensors(root / "fp8-export")
    assert exported.keys() == expected.keys()
    ragged = [n for n, t in expected.items()
              if t.dim() == 2 and t.shape[0] % 128 and t.shape[0] > 128]
    assert ragged  # several blocks with a ragged edge
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name
    written = json.loads((root / "fp8-export" / "config.json").read_text())
    assert "quantization_config" not in written


def test_fp8_export_is_deepseeks_format_and_imports_back(converted):
    root, _, _, _ = converted
    written = hf_tensors(root / "fp8-written")
    config = json.loads((root / "fp8-written" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    back, original = hf_tensors(root / "fp8-written-back"), hf_tensors(root / "yarn_qlora_k1")
    assert back.keys() == original.keys()
    fp8 = [n for n in original if n + "_scale_inv" in written]
    assert "model.layers.1.mlp.experts.0.up_proj.weight" in fp8
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in fp8
    for name, tensor in original.items():
        if name not in fp8:  # embedding, head, norms, router: as they were
            assert torch.equal(back[name], tensor) and written[name].dtype == tensor.dtype, name
            continue
        assert written[name].dtype == torch.float8_e4m3fn
        scale = written[name + "_scale_inv"]
        assert scale.shape == (1, 1)  # tiny weights: one ragged block each
        assert torch.equal(back[name], written[name].float() * scale)
        # E4M3 keeps 3 mantissa bits: each value within 1/16 of itself (or of the block's
        # smallest normal step)
        assert ((back[name] - tensor).abs() <= tensor.abs() / 16 + scale * 2**-9).all(), name


def test_non_finite_weights_are_refused_naming_the_tensor(converted):
    """Both directions check every tensor as it streams past (no copy held): a NaN in the
    Hugging Face checkpoint, an inf in the Megatron model, and a weight that a float16
    cast would turn into inf are each named, and no output is left."""
    root, _, found, _ = converted
    said = found["non-finite"]
    assert said["nan import"].startswith("model.layers.2.self_attn.o_proj.weight: 1 NaN and "
                                         f"0 inf among its 512 values in {root / 'nan'}")
    assert said["inf export"].startswith("model.layers.1.mlp.experts.2.gate_proj.weight: "
                                         "0 NaN and 1 inf")
    assert "decoder.layers.1.mlp.experts.weight1" in said["inf export"]
    assert said["large import as float16"].startswith(
        "decoder.layers.0.mlp.linear_fc1.weight (from model.layers.0.mlp.gate_proj.weight and "
        "1 more): 0 NaN and 1 inf")
    assert "after the cast to torch.float16" in said["large import as float16"]
    assert said["large export as float16"].startswith("model.layers.0.mlp.up_proj.weight: "
                                                      "0 NaN and 1 inf")
    assert said["written"] == []


def test_command_refuses_a_non_finite_checkpoint_in_one_line(converted):
    """`megaseek convert` as a user runs it: the refusal, raised while Megatron's
    checkpoint writer streams the weights, is one line and exit status 2."""
    root, _, _, _ = converted
    run = subprocess.run([sys.executable, "-m", "integration.cli", "convert", "hf-to-megatron",
                          str(root / "nan"), str(root / "nan-megatron")], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"megaseek: error: model.layers.2.self_attn.o_proj.weight: 1 NaN "
                      f"and 0 inf among its 512 values in {root / 'nan' / 'model.safetensors'}; "
                      "a checkpoint with non-finite weights is not converted"]
    assert "Traceback" not in run.stderr
    assert not [p for p in root.iterdir() if p.name.startswith((".nan", "nan-"))]


def test_shape_that_does_not_match_the_config_is_named(converted):
    _, _, found, _ = converted
    assert "model.layers.0.mlp.down_proj.weight: shape (32, 48) does not match" in found["badshape"]


# --- checks before any model is built ----------------------------------------------------

@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    tiny_hf(root / "m", seed=11)
    return root / "m"


def _copy(src: Path, dst: Path, config=None, drop=(), add=None) -> Path:
    from safetensors.torch import save_file

    tensors = hf_tensors(src)
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda c: dict(c, architectures=["LlamaForCausalLM"]), "architectures"),
    (lambda c: dict(c, model_type="llama"), "model_type"),
    (lambda c: dict(c, sliding_window=4), "sliding_window: not understood"),
    (lambda c: dict(c, scoring_func="softmax"), "scoring_func"),
    (lambda c: dict(c, norm_topk_prob=False), "norm_topk_prob"),
    (lambda c: dict(c, rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling.rope_type"),
    (lambda c: dict(c, rope_scaling=dict(YARN, truncate=False)), "rope_scaling.truncate"),
    (lambda c: dict(c, quantization_config={"quant_method": "bitsandbytes"}),
     "quantization_config.quant_method"),
    (lambda c: dict(c, quantization_config={"quant_method": "fp8",
                                            "weight_block_size": [64, 64]}),
     "quantization_config.weight_block_size"),
])
def test_unsupported_config_is_named_and_nothing_built(plain, tmp_path, edit, message):
    from integration.hf import HFConversionError, import_hf

    with pytest.raises(HFConversionError, match=message.replace(".", r"\.")):
        import_hf(_copy(plain, tmp_path / "c", config=edit))


def test_missing_and_extra_tensors_are_named(plain, tmp_path):
    from integration.hf import HFConversionError, import_hf

    missing = _copy(plain, tmp_path / "a", drop=["model.layers.1.mlp.experts.3.up_proj.weight"])
    with pytest.raises(HFConversionError,
                       match=r"missing tensor model\.layers\.1\.mlp\.experts\.3\.up_proj"):
        import_hf(missing)
    extra = _copy(plain, tmp_path / "b", add={"model.layers.0.mlp.gate.weight": torch.zeros(4, 32)})
    with pytest.raises(HFConversionError,
                       match=r"unexpected tensor model\.layers\.0\.mlp\.gate\.weight"):
        import_hf(extra)
    scale = _copy(plain, tmp_path / "d", add={"lm_head.weight_scale_inv": torch.ones(1, 1)})
    with pytest.raises(HFConversionError, match=r"lm_head\.weight_scale_inv: FP8 scales without"):
        import_hf(scale)


def test_partial_mtp_layer_is_an_error_and_missing_one_is_said(plain, tmp_path, caplog):
    from integration.hf import HFConversionError, import_hf
    from integration.hf.convert import _plan
    from integration.hf.config import from_hf_config, read_hf_config
    from integration.hf.safetensors_io import Reader

    with_config = _copy(plain, tmp_path / "a", config=lambda c: dict(c, num_nextn_predict_layers=1))
    with caplog.at_level(logging.WARNING, logger="megaseek.hf"):
        plan = _plan(Reader(with_config), from_hf_config(read_hf_config(with_config)), {})
    assert plan["mtp_layers"] == 0
    assert "no MTP tensors" in caplog.text and caplog.text.count("\n") == 1
    partial = _copy(plain, tmp_path / "b", config=lambda c: dict(c, num_nextn_predict_layers=1),
                    add={"model.layers.3.enorm.weight": torch.ones(32)})
    with pytest.raises(HFConversionError,
                       match=r"missing tensor model\.layers\.3\.eh_proj\.weight"):
        import_hf(partial)


def test_rope_parameters_config_reads_as_rope_scaling():
    from integration.hf.config import from_hf_config

    old = dict(BASE, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
               rope_theta=5000.0, rope_scaling=dict(YARN))
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5000.0,
                              **{k: v for k, v in YARN.items() if k != "type"}}
    assert from_hf_config(new) == from_hf_config(old)
    plain = dict(new, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    assert from_hf_config(plain).yarn is None and from_hf_config(plain).rope_theta == 5000.0


def test_staged_folder_leaves_nothing_on_failure(tmp_path):
    from integration.hf.safetensors_io import staged_folder

    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path / "out") as stage:
            (stage / "config.json").write_text("{}")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_megatron_flags_build_the_same_config(plain, monkeypatch):
    """The flags, through Megatron's parser and validation with the mla and moe plugins,
    give the TransformerConfig fields that `import_hf` builds."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig
    from megatron.training.argument_utils import core_transformer_config_from_args

    from integration.hf import megatron_flags
    from integration.hf.config import from_hf_config, megatron_fields, read_hf_config
    from tests.helpers.plugin_args import validated
    from upstream import cpu

    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = dict(read_hf_config(plain), rope_scaling=YARN, num_nextn_predict_layers=1)
    argv = cpu.with_cpu_arguments([*megatron_flags(cfg), "--plugins", "mla", "moe",
                                   "--micro-batch-size", "1", "--seq-length", "16"])
    args, plugins = validated(argv)
    assert {"mla", "moe"} <= {p.name for p in plugins}
    config = core_transformer_config_from_args(args, MLATransformerConfig)
    for field, value in megatron_fields(from_hf_config(cfg)).items():
        if field != "activation_func":
            assert getattr(config, field) == value, field
    assert args.vocab_size == VOCAB and args.untie_embeddings_and_output_weights


# DeepSeek-V3's config.json as deepseek-ai publishes it (the fields of the Hub file, as far
# as they are known here: docs/notes list it as not verified verbatim).
DEEPSEEK_V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "seq_aux": True, "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 129280,
}


def _options(flags) -> dict[str, str]:
    out, key = {}, None
    for item in flags:
        if item.startswith("--"):
            key = item
            out[key] = ""
        elif key:
            out[key] = (out[key] + " " + item).strip()
    return out


def _value(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def test_published_config_gives_the_deepseek_v3_presets_model():
    """The published config's flags agree with the `deepseek-v3` preset (built from the
    same config by hand) on every model flag both give."""
    from integration import presets
    from integration.hf import megatron_flags

    ours = _options(megatron_flags(DEEPSEEK_V3_CONFIG))
    preset = _options(presets.preset_flags("deepseek-v3", ["--plugins", "mla", "moe"]))
    # training settings, not the model's: the flags say none (Megatron's default aux_loss
    # is refused by the moe plugin), the preset pretrains with the sequence-wise loss
    training = {"--moe-router-load-balancing-type"}
    shared = sorted(set(ours) & set(preset) - training)
    assert len(shared) >= 30
    for flag in shared:
        assert _value(ours[flag]) == _value(preset[flag]), flag
    assert ours["--mtp-num-layers"] == "1" and ours["--num-experts"] == "256"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fp8_plugin_requantizes_an_fp8_checkpoint_to_its_own_blocks(dtype):
    """Keeping a checkpoint's FP8 blocks for `--plugins fp8` would change nothing where
    its scales are each block's amax / 448 (DeepSeek-V3's recipe): the plugin's weight
    quantization of the imported weights gives back the same E4M3 codes, ragged edge
    included, and in fp32 the same scales; in bf16 the scales move by bf16's rounding of
    the block's largest weight (half a bf16 step: 2^-8 at most). Power-of-two scales (later DeepSeek
    checkpoints) would not survive: the plugin computes amax / 448."""
    from integration.hf.fp8 import BLOCK, dequantize_weight, quantize_weight
    from plugins.fp8.weight_cache import quantize_weight as plugin_quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(576, 512, generator=g) * torch.exp(2 * torch.randn(576, 512, generator=g))
    q, scale_inv = quantize_weight(w, BLOCK)  # as DeepSeek's checkpoint holds it
    imported = dequantize_weight("kv_a_proj_with_mqa.weight", q, scale_inv, BLOCK, dtype)
    held = plugin_quantize(imported)  # 576 rows padded to 640, as the plugin holds them
    assert torch.equal(held.q.view(torch.uint8)[:576], q.view(torch.uint8))
    if dtype == torch.float32:
        assert torch.equal(held.scales, scale_inv)
    else:
        assert not torch.equal(held.scales, scale_inv)
        assert ((held.scales / scale_inv - 1).abs() <= 2.0 ** -8).all()
