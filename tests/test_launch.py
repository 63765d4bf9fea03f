"""An unmodified Megatron-style launch script runs through `megaseek launch` with plugins."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from tests.training_runs import TINY_GPT, losses, torchrun

pytestmark = pytest.mark.slow
SCRIPTS = Path(__file__).parent / "launch_scripts"
ARGS = TINY_GPT + ["--vocab-size", "128", "--mock-data", "--train-iters", "4",
                   "--tensor-model-parallel-size", "2"]


def parameter_count(output: str) -> int:
    found = re.findall(r"number of parameters on .*?: (\d+)", output)
    assert found, "Megatron printed no parameter count"
    return int(found[0])


def test_launch_script_runs_with_plugin_hooks(tmp_path):
    plain = torchrun(["-m", "integration.launch", str(SCRIPTS / "pretrain_gpt_like.py")],
                     ARGS, tmp_path)
    trace = tmp_path / "trace.txt"
    probed = torchrun([str(SCRIPTS / "launch_with_probe_plugin.py"),
                       str(SCRIPTS / "pretrain_gpt_like.py")],
                      ARGS + ["--plugins", "probe", "--probe-trace", str(trace)], tmp_path)

    assert sorted(losses(plain)) == sorted(losses(probed)) == [1, 2, 3, 4]
    # The spec transform dropped each layer's MLP: fewer parameters than the plain run.
    assert parameter_count(probed) < parameter_count(plain)
    events = Counter(trace.read_text().split("\n")[:-1])
    for rank in ("0", "1"):
        assert events[f"{rank} spec"] == 1
        assert events[f"{rank} schedule"] >= 4  # one per training step (plus evaluation)
        assert events[f"{rank} step"] == 4


def test_plugin_flag_without_plugin_fails_at_start(tmp_path):
    with pytest.raises(AssertionError, match=r"--probe-trace needs '--plugins probe'"):
        torchrun([str(SCRIPTS / "launch_with_probe_plugin.py"),
                  str(SCRIPTS / "pretrain_gpt_like.py")],
                 ARGS + ["--probe-trace", str(tmp_path / "t")], tmp_path)
