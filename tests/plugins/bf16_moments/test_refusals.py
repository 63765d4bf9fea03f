"""The bf16_moments plugin's start-up checks: Megatron's moment flags turn it on, and what it
cannot do (other dtypes, optimizers, offloading, FSDP) is refused by name."""

from __future__ import annotations

import pytest
import torch

from tests.plugins.bf16_moments.test_adam import BF16_MOMENTS, megatron_args


def test_moment_flags():
    from plugins import PluginError
    from plugins.bf16_moments.plugin import check_moment_flags

    assert check_moment_flags(megatron_args()) is True
    # strings before mapping
    assert check_moment_flags(megatron_args(exp_avg_sq_dtype="fp32")) is True
    assert check_moment_flags(megatron_args(exp_avg_dtype=torch.float32,
                                            exp_avg_sq_dtype=torch.float32)) is False
    refused = {
        "can be stored in fp32 or bf16 only": megatron_args(exp_avg_sq_dtype=torch.float16),
        "needs Transformer Engine's FusedAdam":
            megatron_args(use_precision_aware_optimizer=True),
        "use --optimizer adam": megatron_args(optimizer="sgd"),
        "not with --optimizer-cpu-offload": megatron_args(optimizer_cpu_offload=True),
        "not with --use-megatron-fsdp": megatron_args(use_megatron_fsdp=True),
    }
    for message, args in refused.items():
        with pytest.raises(PluginError, match=message):
            check_moment_flags(args)


def test_the_flags_turn_the_plugin_on(monkeypatch):
    from plugins import PluginError
    from tests.helpers.plugin_args import enabled

    args, plugins = enabled(BF16_MOMENTS, monkeypatch)
    assert [p.name for p in plugins] == ["bf16_moments"]
    assert len(plugins[0].fixes()) == 2
    args, plugins = enabled(["--exp-avg-sq-dtype", "bf16"], monkeypatch)
    assert [p.name for p in plugins] == ["bf16_moments"]
    args, plugins = enabled([], monkeypatch)
    assert plugins == []
    with pytest.raises(PluginError, match="give Megatron's --exp-avg-dtype bf16"):
        enabled(["--plugins", "bf16_moments"], monkeypatch)
    with pytest.raises(PluginError, match="fp32 or bf16 only"):
        enabled(["--exp-avg-dtype", "fp16"], monkeypatch)


def test_a_plugin_its_flags_turn_on_is_said_at_start_up(monkeypatch):
    """The argument dump's `plugins` line lists --plugins only; the start-up log says that the
    moment flags enabled the plugin."""
    import sys

    from megatron.training.arguments import parse_args

    from plugins import default_registry

    registry = default_registry()
    for argv, said in ((["--exp-avg-dtype", "bf16"],
                        ["megaseek: plugin bf16_moments is enabled by its Megatron flags (not "
                         "named in --plugins)"]),
                       (["--plugins", "bf16_moments", "--exp-avg-dtype", "bf16"], [])):
        monkeypatch.setattr(sys, "argv", ["pretrain", *argv])
        args = parse_args(extra_args_provider=registry.add_arguments)
        assert registry.plan(args).enabled_by_their_flags(args) == said
