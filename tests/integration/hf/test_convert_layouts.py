"""`megaseek convert hf-to-megatron` at a parallel layout: T*P*E gloo ranks, each building
and filling only its part of the model, write the same checkpoint as the one-process path.

Both checkpoints of a tiny random DeepSeek-V3 (MoE, a dense layer, an MTP layer) are
loaded into the one-process model, in one spawned rank, and compared tensor by tensor.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import paths
from tests.integration.hf.test_convert import tiny_hf, with_mtp

REPO = paths.REPO
LAYOUTS = {
    "tp2-ep2": ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
}


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"})


def _convert(source: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    argv = ["hf-to-megatron", str(source), str(out), *flags]
    return _run(f"from integration.hf import cli\ncli.main({argv!r})\n")


def convert_one_process_and_load(source: str, out: str, checkpoints: list[str],
                                 result: str) -> None:
    """The one-process command into `out`, then `out` and each of `checkpoints` loaded
    into the one-process model (as `megatron-to-hf` loads them) and saved to `result`; in
    one process to pay Megatron's start-up once."""
    from megatron.core import dist_checkpointing

    from integration.hf import cli
    from integration.hf.convert import _on_one_rank, build_model

    cli.main(["hf-to-megatron", source, out])
    _on_one_rank()  # in place already: the command's import set it up
    states = []
    for folder in map(Path, [out, *checkpoints]):
        config, vocab, positions = cli._config_from_hf(folder / "hf_config.json")
        model = build_model(config, vocab, positions)
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                         str(folder / "release"))
        model.load_state_dict(loaded["model"], strict=True)
        states.append({k: v for k, v in model.state_dict().items() if torch.is_tensor(v)})
    torch.save(states, result)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    tiny_hf(root / "plain", num_hidden_layers=5, first_k_dense_replace=1)
    with_mtp(root / "plain", root / "hf")  # 4 decoder layers (one dense) + the MTP layer
    return root / "hf"


def test_every_layout_writes_the_one_process_checkpoint(hf_folder, tmp_path):
    outs = {name: tmp_path / name for name in LAYOUTS}
    for name, flags in LAYOUTS.items():
        done = _convert(hf_folder, outs[name], *flags)
        assert done.returncode == 0, done.stderr[-3000:]
        ranks = int(flags[1]) * (int(flags[3]) if len(flags) > 2 else 1)
        assert done.stdout.count("peak RSS") == ranks, done.stdout
    one, result = tmp_path / "one", tmp_path / "states.pt"
    args = [str(hf_folder), str(one), [str(p) for p in outs.values()], str(result)]
    done = _run("from tests.integration.hf.test_convert_layouts import "
                "convert_one_process_and_load as f\n"
                f"f(*{args!r})\n")
    assert done.returncode == 0, done.stderr[-3000:]
    expected, *states = torch.load(result)
    assert any(k.startswith("mtp.") for k in expected) and any("experts" in k for k in expected)
    for name, state in zip(outs, states):
        assert state.keys() == expected.keys(), name
        for key, tensor in expected.items():
            assert torch.equal(state[key], tensor), (name, key)
        for file in ("latest_checkpointed_iteration.txt", "hf_config.json",
                     "megatron_flags.txt"):
            assert (outs[name] / file).read_text() == (one / file).read_text(), (name, file)
    result.unlink()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.parametrize("flags, message", [
    (["--expert-model-parallel-size", "3"], "--expert-model-parallel-size 3: does not divide"),
    (["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size 3: does not divide"),
    (["--pipeline-model-parallel-size", "3"],
     "--pipeline-model-parallel-size 3: does not divide"),
    (["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size 0: must be at least 1"),
    (["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "4",
      "--pipeline-model-parallel-size", "16"], "128 processes"),
    (["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "dualpipev"],
     "--pipeline-schedule dualpipev is not supported"),
])
def test_bad_layout_is_refused_naming_the_flag_and_nothing_written(hf_folder, tmp_path, flags,
                                                                   message, capsys):
    from integration.hf import cli

    with pytest.raises(SystemExit) as exited:  # before any rank starts or Megatron is set up
        cli.main(["hf-to-megatron", str(hf_folder), str(tmp_path / "out"), *flags])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
