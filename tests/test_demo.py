"""The README's demo presets pass Megatron's argument parsing and every plugin's start-up
checks (e.g. FP8's 128-multiples with MLA's and MoE's dimensions), without training."""

from __future__ import annotations

import pytest

from upstream import cpu
from integration.demo import command
from tests.plugin_args import enabled


@pytest.mark.parametrize("presets, plugins", [
    ([], []),
    (["--mla"], ["mla"]),
    (["--moe"], ["moe"]),
    (["--fp8"], ["fp8"]),
    (["--mla", "--moe"], ["mla", "moe"]),
    (["--mla", "--moe", "--fp8"], ["mla", "moe", "fp8"]),
], ids=lambda v: "+".join(v) or "dense" if isinstance(v, list) else None)
def test_demo_presets_pass_start_up_checks(presets, plugins, monkeypatch):
    argv = command(presets)
    megatron_args = argv[argv.index("integration.pretrain") + 1:]
    args, enabled_plugins = enabled(cpu.with_cpu_arguments(megatron_args), monkeypatch)
    assert [p.name for p in enabled_plugins] == plugins
    if "fp8" in plugins:
        assert args.tensor_model_parallel_size == 1 and args.fp8_backend == "emulated"
