"""`megaseek convert` streams: each Megatron parameter (hf-to-megatron) or layer
(megatron-to-hf) is made, written and dropped before the next, on a model built on the meta
device (`integration.hf.lazy_save`, `integration.hf.lazy_load`).

The oracle is the in-memory conversion (the whole model filled by `import_hf`, saved with
`dist_checkpointing.save`; loaded whole and written by `export_hf`): the streamed checkpoints,
at one process and at TP=2 x EP=2 and PP=2, load tensor-identical to it, and the streamed
Hugging Face export equals its export. Peak memory is measured in subprocesses on generated
multi-shard checkpoints of N and 2N layers: it does not grow with the layers.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import paths
from tests.integration.hf.test_convert import BASE, hf_tensors, tiny_hf, with_mtp
from tests.integration.hf.test_convert_layouts import LAYOUTS, _convert, _run

REPO = paths.REPO


def synthetic_hf(folder: Path, seed: int = 0, **overrides) -> dict[str, int]:
    """A random DeepSeek-V3 folder written straight into safetensors, one shard per decoder
    layer plus one for the embedding, final norm and head (shapes from a transformers model
    on the meta device, so no model is ever held). Returns {shard file: bytes}."""
    from safetensors.torch import save_file
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(**{**BASE, **overrides})
    config.architectures = ["DeepseekV3ForCausalLM"]
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in DeepseekV3ForCausalLM(config).state_dict().items()}
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    shards: dict[str, list[str]] = {}
    for name in shapes:
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        index = int(layer.group(1)) + 1 if layer else 0
        shards.setdefault(f"model-{index:05d}-of-{config.num_hidden_layers + 1:05d}"
                          ".safetensors", []).append(name)
    g = torch.Generator().manual_seed(seed)
    sizes = {}
    for file, names in shards.items():
        tensors = {n: (torch.randn(shapes[n], generator=g) * 0.2 if len(shapes[n]) > 1
                       else torch.rand(shapes[n], generator=g) + 0.5) for n in names}
        save_file(tensors, str(folder / file))
        sizes[file] = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {}, "weight_map": {n: f for f, names in shards.items() for n in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return sizes


def in_memory_oracle(source: str, streamed: list[str], in_memory: str, exports: str,
                     result: str) -> None:
    """Today's in-memory conversions as the oracle, in one process (Megatron's start-up paid
    once): `import_hf` + `dist_checkpointing.save` into `in_memory`; each checkpoint of
    `streamed` and `in_memory` loaded into the one-process model, their tensors and
    `.metadata` saved to `result`; the first streamed checkpoint exported both ways (the
    whole model loaded then `export_hf`, and the streamed command) under `exports`."""
    from megatron.core import dist_checkpointing

    from integration.hf import cli, export_hf, import_hf
    from integration.hf.convert import build_model

    model, config = import_hf(source)
    Path(in_memory).mkdir()
    dist_checkpointing.save({"model": model.sharded_state_dict(), "checkpoint_version": 3.0,
                             "iteration": 0}, in_memory)
    config, vocab, positions = cli._config_from_hf(Path(streamed[0]) / "hf_config.json")
    models, metadata = [], []
    for release in [*(str(Path(s) / "release") for s in streamed), in_memory]:
        model = build_model(config, vocab, positions)
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, release)
        model.load_state_dict(loaded["model"], strict=True)
        models.append(model)
        metadata.append(pickle.loads((Path(release) / ".metadata").read_bytes())
                        .state_dict_metadata)
    exports = Path(exports)
    export_hf(models[0], config, exports / "in-memory", max_shard_bytes=8192,
              max_position_embeddings=positions)
    states = [{k: v for k, v in m.state_dict().items() if torch.is_tensor(v)} for m in models]
    cli.main(["megatron-to-hf", streamed[0], str(exports / "streamed"),
              "--max-shard-size", "8KB"])
    torch.save({"states": states, "metadata": metadata}, result)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny MoE + MTP checkpoint converted streamed at each layout and in memory."""
    root = tmp_path_factory.mktemp("streaming")
    tiny_hf(root / "plain", num_hidden_layers=5, first_k_dense_replace=1)
    with_mtp(root / "plain", root / "hf")  # 4 decoder layers (one dense) + the MTP layer
    streamed = {"one": root / "one", **{name: root / name for name in LAYOUTS}}
    for name, out in streamed.items():
        done = _convert(root / "hf", out, *LAYOUTS.get(name, []))
        assert done.returncode == 0, done.stderr[-3000:]
    (root / "exports").mkdir()
    args = [str(root / "hf"), [str(p) for p in streamed.values()], str(root / "in-memory"),
            str(root / "exports"), str(root / "result.pt")]
    done = _run("from tests.integration.hf.test_streaming import in_memory_oracle as f\n"
                f"f(*{args!r})\n")
    assert done.returncode == 0, done.stderr[-3000:]
    found = torch.load(root / "result.pt", weights_only=False)
    return root, list(streamed), found


def test_streamed_checkpoints_load_as_the_in_memory_one(converted):
    _, names, found = converted
    *states, expected = found["states"]
    assert any(k.startswith("mtp.") for k in expected) and any("experts" in k for k in expected)
    for name, state in zip(names, states):
        assert state.keys() == expected.keys(), name
        for key, tensor in expected.items():
            assert torch.equal(state[key], tensor), (name, key)
    # the one-process checkpoint is the same checkpoint: same tensors, chunks and properties
    assert found["metadata"][0] == found["metadata"][-1]


def test_streamed_export_is_the_in_memory_export(converted):
    root, _, _ = converted
    streamed, in_memory = root / "exports" / "streamed", root / "exports" / "in-memory"
    assert (streamed / "config.json").read_text() == (in_memory / "config.json").read_text()
    index = "model.safetensors.index.json"
    assert (streamed / index).read_text() == (in_memory / index).read_text()
    assert len(list(streamed.glob("*.safetensors"))) > 5  # 8 KB shards
    source, back, expected = hf_tensors(root / "hf"), hf_tensors(streamed), hf_tensors(in_memory)
    assert back.keys() == expected.keys() == source.keys()
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor) and torch.equal(tensor, source[name]), name


BAD_INPUT = """
import sys
from integration.hf import cli
for argv in {cases!r}:
    try:
        cli.main(argv)
    except SystemExit as e:
        print("exit", e.code, flush=True)
"""


def test_errors_found_while_streaming_leave_nothing(tmp_path):
    """A shape that does not match the config (found once the model is built) and an MTP
    copy of the embedding that differs from it (found as the embedding is written): the
    tensor is named, and neither the output folder nor its staging is left."""
    from safetensors.torch import load_file, save_file

    tiny_hf(tmp_path / "plain", num_hidden_layers=3, first_k_dense_replace=1)
    with_mtp(tmp_path / "plain", tmp_path / "mtp")
    shape = tmp_path / "shape"
    shape.mkdir()
    for file in (tmp_path / "mtp").iterdir():
        (shape / file.name).write_bytes(file.read_bytes())
    config = json.loads((shape / "config.json").read_text())
    (shape / "config.json").write_text(json.dumps(dict(config, intermediate_size=40)))
    copy = "model.layers.2.embed_tokens.weight"
    index = json.loads((tmp_path / "mtp" / "model.safetensors.index.json").read_text())
    file = tmp_path / "mtp" / index["weight_map"][copy]
    tensors = load_file(file)
    tensors[copy] = tensors[copy] + 1
    save_file(tensors, str(file))
    out = tmp_path / "out"
    cases = [["hf-to-megatron", str(shape), str(out)],
             ["hf-to-megatron", str(tmp_path / "mtp"), str(out)]]
    done = _run(BAD_INPUT.format(cases=cases))
    assert done.stdout.count("exit 2") == 2, done.stdout + done.stderr[-3000:]
    assert "model.layers.0.mlp.down_proj.weight: shape (32, 48) does not match" in done.stderr
    assert f"{copy} differs from the main model's embedding.word_embeddings.weight" \
        in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mtp", "plain", "shape"]


# --- peak memory ----------------------------------------------------------------------------

MEASURE = """
import megatron.core.models.gpt, plugins  # noqa: F401  (the imports before the baseline)
from integration.hf import cli
from integration.hf.layout import peak_rss_mib
before = peak_rss_mib()
cli.main({argv!r})
print("PEAK", before, peak_rss_mib(), flush=True)
"""


def peak_rss_increase(argv: list[str]) -> float:
    """MiB of peak RSS `megaseek convert argv` adds over the process's imports, measured in
    a subprocess of its own by VmHWM (ru_maxrss would start at this process's peak: Linux
    keeps it over fork and exec).

    glibc's malloc serves blocks below its dynamic mmap threshold (up to 32 MiB) from its
    heap, where freed ones stay resident: this model's tensors (8 MiB at most) would ratchet
    the peak up layer by layer where a real model's (hundreds of MiB) are unmapped when
    freed. A fixed 1 MiB threshold makes these behave like those."""
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    done = subprocess.run([sys.executable, "-c", MEASURE.format(argv=argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = map(float, re.search(r"PEAK (\S+) (\S+)", done.stdout).groups())
    return after - before


# Layers of about 27 MiB (8 routed experts of 512 x 512 in fp32), one shard each.
WIDE = dict(hidden_size=512, moe_intermediate_size=512, intermediate_size=1024,
            n_routed_experts=8, first_k_dense_replace=1)


def test_peak_memory_does_not_grow_with_the_layers(tmp_path):
    """The same model with 3 and 6 decoder layers, both ways: the 6-layer conversion's peak
    is within a quarter of the 3 extra layers' weight of the 3-layer one's (the in-memory
    conversion's peak grew by all of it: docs/cli.md)."""
    increase = {}
    for layers in (3, 6):
        sizes = synthetic_hf(tmp_path / f"hf{layers}", num_hidden_layers=layers, **WIDE)
        megatron, back = tmp_path / f"megatron{layers}", tmp_path / f"back{layers}"
        increase[layers] = (
            peak_rss_increase(["hf-to-megatron", str(tmp_path / f"hf{layers}"), str(megatron)]),
            peak_rss_increase(["megatron-to-hf", str(megatron), str(back),
                               "--max-shard-size", "4MB"]))
        layer = max(sizes.values())
    extra = 3 * layer / 2**20
    assert extra > 75
    for direction, (small, large) in enumerate(zip(increase[3], increase[6])):
        assert large - small < extra / 4, (direction, increase, extra)
