"""PluginRegistry: `--plugins`, plugin flags, slots, validation and Megatron's parser."""

from __future__ import annotations

import argparse

import pytest

from plugins import PLUGINS_FLAG, Plugin, PluginError, PluginRegistry, _Unset, default_registry


# --- small test plugins ----------------------------------------------------------------

def _alpha_arguments(group):
    group.add_argument("--alpha-rate", type=float, default=0.5)
    group.add_argument("--alpha-verbose", action="store_true")


def _beta_arguments(group):
    group.add_argument("--beta-size", type=int, default=3)
    group.add_argument("--beta-mode", choices=["x", "y"], default="x")


def _validate_beta(args):
    if args.beta_size <= 0:
        raise PluginError("--beta-size must be positive")


def make_plugins(validate_calls: list | None = None):
    calls = validate_calls if validate_calls is not None else []

    def validate_alpha(args):
        calls.append(("alpha", args.alpha_rate))
        if not 0.0 <= args.alpha_rate <= 1.0:
            raise PluginError(f"--alpha-rate must be in [0, 1], got {args.alpha_rate}")

    alpha = Plugin("alpha", "test plugin alpha", add_arguments=_alpha_arguments,
                   validate=validate_alpha, slots=frozenset({"self_attention"}))
    beta = Plugin("beta", "test plugin beta", add_arguments=_beta_arguments,
                  validate=_validate_beta, slots=frozenset({"schedule"}))
    # No flags of its own; replaces the same slot as alpha.
    gamma = Plugin("gamma", "test plugin gamma", slots=frozenset({"self_attention"}))
    return alpha, beta, gamma


@pytest.fixture
def validate_calls():
    return []


@pytest.fixture
def registry(validate_calls):
    return PluginRegistry(make_plugins(validate_calls))


def parse(registry: PluginRegistry, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    registry.add_arguments(parser)
    return parser.parse_args(argv)


# --- enabling --------------------------------------------------------------------------

def test_enabled_in_registry_order_whatever_the_command_line_order(registry):
    # Hooks run in the order the plugins were registered, so that the model is the same
    # for every order of --plugins.
    for order in (["beta", "alpha"], ["alpha", "beta"]):
        assert [p.name for p in registry.enabled(parse(registry, ["--plugins", *order]))] == [
            "alpha", "beta"]


def test_defaults_filled_in(registry):
    args = parse(registry, ["--plugins", "beta", "alpha"])
    registry.enabled(args)
    # Every plugin flag ends up with its declared default, not the parse-time marker.
    assert args.alpha_rate == 0.5 and type(args.alpha_rate) is float
    assert args.alpha_verbose is False
    assert args.beta_size == 3
    assert args.beta_mode == "x"


def test_given_values_are_kept(registry):
    args = parse(registry, ["--plugins", "alpha", "beta", "--alpha-rate", "0.25",
                            "--alpha-verbose", "--beta-mode", "y"])
    assert [p.name for p in registry.enabled(args)] == ["alpha", "beta"]
    assert args.alpha_rate == 0.25
    assert args.alpha_verbose is True
    assert args.beta_mode == "y"
    assert args.beta_size == 3


def test_flags_of_disabled_plugins_get_their_defaults_too(registry):
    args = parse(registry, ["--plugins", "alpha"])
    registry.enabled(args)
    # Code may read any plugin's flag; a disabled plugin's flags hold plain defaults.
    assert args.beta_size == 3
    assert args.beta_mode == "x"
    assert not any(isinstance(v, _Unset) for v in vars(args).values())


def test_no_plugins_enabled(registry):
    args = parse(registry, [])
    assert args.plugins == []
    assert registry.enabled(args) == []
    assert args.alpha_rate == 0.5


def test_plugin_objects_are_the_registered_ones(registry):
    alpha = make_plugins()[0]
    reg = PluginRegistry([alpha])
    args = parse(reg, ["--plugins", "alpha"])
    assert reg.enabled(args)[0] is alpha
    assert reg.names == ["alpha"]


def test_names_are_sorted(registry):
    assert registry.names == ["alpha", "beta", "gamma"]


# --- errors ----------------------------------------------------------------------------

def test_unknown_plugin_names_flag_and_available(registry):
    args = parse(registry, ["--plugins", "alpha", "nosuch"])
    with pytest.raises(PluginError) as err:
        registry.enabled(args)
    message = str(err.value)
    assert PLUGINS_FLAG in message
    assert "nosuch" in message
    for name in ("alpha", "beta", "gamma"):
        assert name in message
    # The error is a ValueError too (callers may catch either).
    assert isinstance(err.value, ValueError)


def test_unknown_plugin_in_empty_registry_says_none_available():
    reg = PluginRegistry()
    args = parse(reg, ["--plugins", "ema"])
    with pytest.raises(PluginError, match=r"unknown plugin.*ema.*available: none"):
        reg.enabled(args)


def test_flag_without_its_plugin(registry):
    args = parse(registry, ["--plugins", "beta", "--alpha-rate", "0.1"])
    with pytest.raises(PluginError) as err:
        registry.enabled(args)
    message = str(err.value)
    assert "--alpha-rate" in message
    assert f"{PLUGINS_FLAG} alpha" in message
    assert "--beta" not in message  # beta is enabled: its flags are fine


def test_flag_without_its_plugin_when_nothing_is_enabled(registry):
    args = parse(registry, ["--beta-mode", "y"])
    with pytest.raises(PluginError, match=r"--beta-mode.*--plugins beta"):
        registry.enabled(args)


def test_flag_given_with_its_default_value_is_still_an_error(registry):
    args = parse(registry, ["--alpha-rate", "0.5"])
    with pytest.raises(PluginError, match=r"--alpha-rate.*--plugins alpha"):
        registry.enabled(args)


def test_store_true_flag_without_its_plugin(registry):
    args = parse(registry, ["--alpha-verbose"])
    with pytest.raises(PluginError, match="--alpha-verbose"):
        registry.enabled(args)


def test_every_orphan_flag_is_named(registry):
    args = parse(registry, ["--alpha-rate", "0.1", "--beta-size", "4"])
    with pytest.raises(PluginError) as err:
        registry.enabled(args)
    assert "--alpha-rate" in str(err.value) and "--beta-size" in str(err.value)


def test_two_plugins_claiming_the_same_slot(registry):
    args = parse(registry, ["--plugins", "alpha", "gamma"])
    with pytest.raises(PluginError) as err:
        registry.enabled(args)
    message = str(err.value)
    assert "alpha" in message and "gamma" in message
    assert "self_attention" in message


def test_plugins_with_different_slots_coexist(registry):
    args = parse(registry, ["--plugins", "gamma", "beta"])
    assert [p.name for p in registry.enabled(args)] == ["beta", "gamma"]  # registry order


def test_same_plugin_listed_twice(registry):
    args = parse(registry, ["--plugins", "beta", "beta"])
    with pytest.raises(PluginError, match=r"--plugins.*beta"):
        registry.enabled(args)


def test_two_plugins_defining_the_same_flag_fail_at_add_arguments():
    def alpha_again(group):
        group.add_argument("--alpha-rate", type=float, default=0.9)

    reg = PluginRegistry([make_plugins()[0], Plugin("other", "o", add_arguments=alpha_again)])
    # argparse itself refuses the second identical option string.
    with pytest.raises((PluginError, argparse.ArgumentError), match="--alpha-rate"):
        reg.add_arguments(argparse.ArgumentParser())


def test_two_plugins_defining_the_same_dest_fail_naming_both():
    def alpha_underscore(group):  # another spelling of the same argparse dest
        group.add_argument("--alpha_rate", type=float, default=0.9)

    reg = PluginRegistry([make_plugins()[0], Plugin("other", "o", add_arguments=alpha_underscore)])
    with pytest.raises(PluginError) as err:
        reg.add_arguments(argparse.ArgumentParser())
    assert "'alpha'" in str(err.value) and "'other'" in str(err.value)


def test_registering_a_name_twice():
    alpha = make_plugins()[0]
    reg = PluginRegistry([alpha])
    with pytest.raises(PluginError, match="alpha"):
        reg.register(Plugin("alpha", "another alpha"))
    with pytest.raises(PluginError, match="alpha"):
        PluginRegistry([alpha, alpha])
    assert reg.names == ["alpha"]


# --- validation ------------------------------------------------------------------------

def test_validate_runs_only_for_enabled_plugins(registry, validate_calls):
    args = parse(registry, ["--plugins", "gamma"])
    registry.enabled(args)
    assert validate_calls == []

    reg = PluginRegistry(make_plugins(validate_calls))
    args = parse(reg, ["--plugins", "alpha", "--alpha-rate", "0.75"])
    reg.enabled(args)
    assert validate_calls == [("alpha", 0.75)]  # once, with the given value


def test_validate_sees_defaults_filled_in(registry, validate_calls):
    args = parse(registry, ["--plugins", "alpha"])
    registry.enabled(args)
    assert validate_calls == [("alpha", 0.5)]


def test_validate_error_propagates(registry):
    args = parse(registry, ["--plugins", "alpha", "--alpha-rate", "2"])
    with pytest.raises(PluginError, match=r"--alpha-rate must be in \[0, 1\], got 2.0"):
        registry.enabled(args)


def test_validate_exception_type_is_kept():
    def boom(args):
        raise RuntimeError("boom from validate")

    reg = PluginRegistry([Plugin("delta", "d", validate=boom)])
    with pytest.raises(RuntimeError, match="boom from validate"):
        reg.enabled(parse(reg, ["--plugins", "delta"]))
    # Not enabled: never called.
    assert reg.enabled(parse(reg, [])) == []


def test_disabled_plugin_with_invalid_default_is_not_validated():
    def strict_arguments(group):
        group.add_argument("--strict-level", type=int, default=-1)

    def strict_validate(args):
        raise PluginError("--strict-level must be >= 0")

    reg = PluginRegistry([Plugin("strict", "s", add_arguments=strict_arguments,
                                 validate=strict_validate), make_plugins()[1]])
    args = parse(reg, ["--plugins", "beta"])
    assert [p.name for p in reg.enabled(args)] == ["beta"]
    assert args.strict_level == -1


# --- default registry ------------------------------------------------------------------

def test_default_registry_is_fresh_each_call():
    first, second = default_registry(), default_registry()
    assert first is not second
    first.register(Plugin("only-in-first", "x"))
    assert "only-in-first" in first.names
    assert "only-in-first" not in second.names
    assert "only-in-first" not in default_registry().names


def test_default_registry_parses_with_no_plugins():
    reg = default_registry()
    args = parse(reg, [])
    assert args.plugins == []
    assert reg.enabled(args) == []
    # A fresh registry per parser: the same flags can be added again.
    args = parse(default_registry(), [])
    assert args.plugins == []


# --- Megatron's parser -----------------------------------------------------------------

@pytest.fixture(scope="module")
def megatron_arguments():
    import integration  # noqa: F401  (makes megatron.training importable on Python 3.11)
    from megatron.training import arguments

    return arguments


def test_megatron_parse_args_with_plugin_flags(megatron_arguments, monkeypatch):
    reg = PluginRegistry(make_plugins())
    # Local modules, as CPU runs have them: a plugin that declares nothing about
    # Transformer Engine refuses Megatron's default (tests/test_transformer_engine.py).
    monkeypatch.setattr("sys.argv", ["x", "--plugins", "alpha", "--alpha-rate", "0.1",
                                     "--transformer-impl", "local"])
    args = megatron_arguments.parse_args(extra_args_provider=reg.add_arguments,
                                         ignore_unknown_args=False)
    assert [p.name for p in reg.enabled(args)] == ["alpha"]
    assert args.alpha_rate == 0.1
    assert args.beta_size == 3
    # Megatron's own flags are parsed alongside.
    assert hasattr(args, "num_layers") and hasattr(args, "micro_batch_size")


def test_megatron_parse_args_rejects_orphan_flag(megatron_arguments, monkeypatch):
    reg = PluginRegistry(make_plugins())
    monkeypatch.setattr("sys.argv", ["x", "--beta-size", "7"])
    args = megatron_arguments.parse_args(extra_args_provider=reg.add_arguments,
                                         ignore_unknown_args=False)
    with pytest.raises(PluginError, match=r"--beta-size.*--plugins beta"):
        reg.enabled(args)


def test_megatron_parse_args_without_plugins(megatron_arguments, monkeypatch):
    reg = default_registry()
    monkeypatch.setattr("sys.argv", ["x"])
    args = megatron_arguments.parse_args(extra_args_provider=reg.add_arguments,
                                         ignore_unknown_args=False)
    assert args.plugins == []
    assert reg.enabled(args) == []


def test_megatron_parse_args_rejects_unknown_flag(megatron_arguments, monkeypatch, capsys):
    reg = PluginRegistry(make_plugins())
    monkeypatch.setattr("sys.argv", ["x", "--plugins", "alpha", "--alpha-rat", "0.1"])
    with pytest.raises(SystemExit):
        megatron_arguments.parse_args(extra_args_provider=reg.add_arguments,
                                      ignore_unknown_args=False)
    assert "--alpha-rat" in capsys.readouterr().err


def test_add_arguments_on_a_second_parser(registry):
    # Megatron may build its parser more than once from the same registry.
    parse(registry, ["--plugins", "beta"])
    args = parse(registry, ["--plugins", "alpha"])
    assert [p.name for p in registry.enabled(args)] == ["alpha"]
    assert args.alpha_rate == 0.5 and args.beta_size == 3
    args = parse(registry, ["--plugins", "beta", "--alpha-rate", "0.5"])
    with pytest.raises(PluginError, match=r"--alpha-rate.*--plugins alpha"):
        registry.enabled(args)


# --- known limitations (see the report that came with these tests) -----------------------

def test_enabled_twice_on_the_same_args(registry):
    args = parse(registry, ["--plugins", "alpha"])
    registry.enabled(args)
    assert [p.name for p in registry.enabled(args)] == ["alpha"]


def test_a_megatron_flag_that_needs_a_disabled_plugin_fails_at_start():
    needs = Plugin("needy", "test", needed_by=lambda args: (
        "--needy-megatron-flag needs --plugins needy" if args.needy_megatron_flag else None))
    registry = PluginRegistry([needs])
    parser = argparse.ArgumentParser()
    parser.add_argument("--needy-megatron-flag", action="store_true")
    registry.add_arguments(parser)
    with pytest.raises(PluginError, match="--needy-megatron-flag needs --plugins needy"):
        registry.enabled(parser.parse_args(["--needy-megatron-flag"]))
    assert registry.enabled(parser.parse_args(["--needy-megatron-flag", "--plugins", "needy"]))
    assert registry.enabled(parser.parse_args([])) == []
