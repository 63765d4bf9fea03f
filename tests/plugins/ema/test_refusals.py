"""The ema plugin's start-up checks: flags it cannot honour fail naming the flag (and what to
change), an EMA that averages at least once is accepted, and too little host memory is named
with the figures."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("flags, message", [
    (["--ema-decay", "1.0"], r"--ema-decay must be in \(0, 1\); got 1.0"),
    (["--ema-decay", "0"], r"--ema-decay must be in \(0, 1\); got 0.0"),
    ([], r"--plugins ema needs --ema-decay"),
    (["--ema-decay", "0.9", "--ema-interval", "0"], r"--ema-interval must be at least 1; got 0"),
    (["--ema-decay", "0.9", "--ema-start-iter", "-1"], r"--ema-start-iter .* got -1"),
    (["--ema-decay", "0.9", "--ema-eval", "--eval-iters", "0"],
     r"--ema-eval needs evaluation: give --eval-iters > 0 \(got --eval-iters 0\)"),
    # The EMA would never average within the run: only a copy of the weights.
    (["--ema-decay", "0.9", "--ema-start-iter", "11", "--train-iters", "10"],
     r"--ema-start-iter 11 .* --train-iters 10: the EMA would first average at iteration 11, "
     r"after the run ends.*lower --ema-start-iter"),
    (["--ema-decay", "0.9", "--ema-interval", "11", "--train-iters", "10"],
     r"--ema-interval 11 with --train-iters 10: .* at iteration 11.*lower --ema-interval"),
    (["--ema-decay", "0.9", "--ema-start-iter", "9", "--ema-interval", "4", "--train-iters",
      "10"], r"first average at iteration 12, after the run ends.*lower --ema-interval"),
])
def test_bad_flags_fail_naming_the_flag(flags, message, monkeypatch):
    from plugins import PluginError
    from tests.helpers.plugin_args import enabled

    with pytest.raises(PluginError, match=message):
        enabled(["--plugins", "ema", *flags], monkeypatch)


@pytest.mark.parametrize("flags", [
    ["--ema-start-iter", "10", "--train-iters", "10"],  # averages once, at the last step
    ["--ema-interval", "5", "--ema-start-iter", "3", "--train-iters", "5"],
    ["--ema-interval", "50", "--train-samples", "80"],  # iterations unknown until Megatron's
])
def test_an_ema_that_averages_at_least_once_is_accepted(flags, monkeypatch):
    from tests.helpers.plugin_args import enabled

    args, plugins = enabled(["--plugins", "ema", "--ema-decay", "0.9", *flags], monkeypatch)
    assert [p.name for p in plugins] == ["ema"]


def test_good_flags_enable_the_plugin(monkeypatch):
    from tests.helpers.plugin_args import enabled

    args, plugins = enabled(["--plugins", "ema", "--ema-decay", "0.999", "--ema-eval",
                             "--eval-iters", "2"], monkeypatch)
    assert [p.name for p in plugins] == ["ema"]
    assert (plugins[0].config.ema_interval, plugins[0].config.ema_start_iter) == (1, 0)


def test_too_little_host_memory_names_the_figure():
    from plugins import PluginError
    from plugins.ema.plugin import check_host_memory

    check_host_memory(1000, 2, available=16000)
    with pytest.raises(PluginError, match=r"--plugins ema: the EMA needs 0.50 GiB .*"
                                          r"67108864 parameters owned per rank.*0.25 GiB"):
        check_host_memory(2 ** 26, 1, available=2 ** 28)
