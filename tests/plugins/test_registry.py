"""PluginRegistry: `--plugins`, plugin flags, slots, validation and Megatron's parser."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import pytest

from plugins import PLUGINS_FLAG, Plugin, PluginError, PluginRegistry, RunPlan, default_registry
from plugins.config import flag


# --- small test plugins ----------------------------------------------------------------

@dataclass(frozen=True)
class AlphaConfig:
    alpha_rate: float = flag("--alpha-rate", 0.5, type=float, help="alpha's rate")
    alpha_verbose: bool = flag("--alpha-verbose", False, action="store_true", help="say more")


@dataclass(frozen=True)
class BetaConfig:
    beta_size: int = flag("--beta-size", 3, type=int, help="beta's size")
    beta_mode: str = flag("--beta-mode", "x", choices=["x", "y"], help="beta's mode")


def _check_beta(config, args):
    if config.beta_size <= 0:
        raise PluginError("--beta-size must be positive")


def make_plugins(validate_calls: list | None = None):
    calls = validate_calls if validate_calls is not None else []

    def check_alpha(config, args):
        calls.append(("alpha", config.alpha_rate))
        if not 0.0 <= config.alpha_rate <= 1.0:
            raise PluginError(f"--alpha-rate must be in [0, 1], got {config.alpha_rate}")

    alpha = Plugin("alpha", "test plugin alpha", config=AlphaConfig, check=check_alpha,
                   slots=frozenset({"self_attention"}))
    beta = Plugin("beta", "test plugin beta", config=BetaConfig, check=_check_beta,
                  slots=frozenset({"schedule"}))
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

def names(plan: RunPlan) -> list[str]:
    return [p.name for p in plan.plugins]


def test_enabled_in_registry_order_whatever_the_command_line_order(registry):
    # Hooks run in the order the plugins were registered, so that the model is the same
    # for every order of --plugins.
    for order in (["beta", "alpha"], ["alpha", "beta"]):
        assert names(registry.plan(parse(registry, ["--plugins", *order]))) == ["alpha", "beta"]


def test_defaults_filled_in(registry):
    plan = registry.plan(parse(registry, ["--plugins", "beta", "alpha"]))
    # Every plugin flag ends up with its declared default in its plugin's config.
    alpha, beta = plan.config("alpha"), plan.config("beta")
    assert alpha.alpha_rate == 0.5 and type(alpha.alpha_rate) is float
    assert alpha.alpha_verbose is False
    assert beta.beta_size == 3
    assert beta.beta_mode == "x"


def test_given_values_are_kept(registry):
    plan = registry.plan(parse(registry, ["--plugins", "alpha", "beta", "--alpha-rate", "0.25",
                                          "--alpha-verbose", "--beta-mode", "y"]))
    assert names(plan) == ["alpha", "beta"]
    assert plan.config("alpha") == AlphaConfig(alpha_rate=0.25, alpha_verbose=True)
    assert plan.config("beta") == BetaConfig(beta_size=3, beta_mode="y")


def test_flags_of_disabled_plugins_are_in_no_config(registry):
    args = parse(registry, ["--plugins", "alpha"])
    plan = registry.plan(args)
    # A disabled plugin has no config; its flags were not given, so they are not on args.
    with pytest.raises(KeyError, match="beta"):
        plan.config("beta")
    assert not hasattr(args, "beta_size") and not hasattr(args, "alpha_rate")


def test_no_plugins_enabled(registry):
    args = parse(registry, [])
    assert args.plugins == []
    assert registry.plan(args) == RunPlan()


def test_plugin_objects_are_the_registered_ones(registry):
    alpha = make_plugins()[0]
    reg = PluginRegistry([alpha])
    assert reg.plan(parse(reg, ["--plugins", "alpha"])).plugins[0].plugin is alpha
    assert reg.names == ["alpha"]


def test_names_are_sorted(registry):
    assert registry.names == ["alpha", "beta", "gamma"]


# --- the run plan ----------------------------------------------------------------------

def test_the_plan_and_its_configs_are_frozen(registry):
    plan = registry.plan(parse(registry, ["--plugins", "alpha", "--alpha-rate", "0.25"]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.plugins = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.config("alpha").alpha_rate = 0.75


def test_configs_are_typed_from_the_declarations(registry):
    plan = registry.plan(parse(registry, ["--plugins", "alpha", "beta", "--alpha-rate", "1",
                                          "--beta-size", "7"]))
    assert type(plan.config("alpha")) is AlphaConfig and type(plan.config("beta")) is BetaConfig
    assert type(plan.config("alpha").alpha_rate) is float and plan.config("beta").beta_size == 7


def test_a_plugin_without_flags_has_no_config(registry):
    assert registry.plan(parse(registry, ["--plugins", "gamma"])).config("gamma") is None


def test_hooks_receive_the_config_never_args():
    seen = []
    hooked = Plugin("alpha", "a", config=AlphaConfig,
                    transform_layer_spec=lambda config, spec: seen.append(config) or spec,
                    on_optimizer_step=lambda config, chunks, opt: seen.append(config))
    reg = PluginRegistry([hooked])
    (enabled,) = reg.plan(parse(reg, ["--plugins", "alpha", "--alpha-rate", "0.2"])).plugins
    assert enabled.transform_layer_spec("spec") == "spec"
    enabled.run_hooks().on_optimizer_step(["chunk"], "optimizer")
    assert seen == [AlphaConfig(alpha_rate=0.2)] * 2


def test_run_state_is_made_once_per_run_and_shared_by_the_run_hooks():
    made = []

    class State:
        def __init__(self, config):
            self.config = config
            made.append(self)

    stateful = Plugin("alpha", "a", config=AlphaConfig, run_state=State,
                      on_optimizer_step=lambda state, chunks, opt: state,
                      on_training_end=lambda state, chunks: state)
    reg = PluginRegistry([stateful])
    (enabled,) = reg.plan(parse(reg, ["--plugins", "alpha"])).plugins
    hooks = enabled.run_hooks()
    assert hooks.on_optimizer_step([], None) is hooks.on_training_end([]) is made[0]
    assert made[0].config == AlphaConfig() and len(made) == 1


def test_the_check_reads_megatron_arguments_but_cannot_write_them():
    def writes(config, args):
        assert args.micro_batch_size == 4  # read: fine
        args.micro_batch_size = 8

    reg = PluginRegistry([Plugin("alpha", "a", config=AlphaConfig, check=writes)])
    parser = argparse.ArgumentParser()
    parser.add_argument("--micro-batch-size", type=int, default=4)
    args = reg.add_arguments(parser).parse_args(["--plugins", "alpha"])
    with pytest.raises(TypeError, match="micro_batch_size.*overrides"):
        reg.plan(args)
    assert args.micro_batch_size == 4


def test_overrides_are_in_the_plan_and_applied_on_request():
    def overrides(config):
        return {"virtual_stages": 2} if config.alpha_verbose else {}

    reg = PluginRegistry([Plugin("alpha", "a", config=AlphaConfig, overrides=overrides)])
    args = parse(reg, ["--plugins", "alpha", "--alpha-verbose"])
    plan = reg.plan(args)
    assert [(o.plugin, o.dest, o.value) for o in plan.overrides] == [("alpha", "virtual_stages", 2)]
    assert not hasattr(args, "virtual_stages")  # making the plan writes nothing
    said = plan.apply_overrides(args)
    assert args.virtual_stages == 2
    assert said == ["megaseek: --plugins alpha sets Megatron's virtual_stages = 2"]
    assert reg.plan(parse(reg, ["--plugins", "alpha"])).overrides == ()


def test_an_override_is_said_with_its_reason_and_only_where_it_changes_a_value():
    from plugins.plan import Explained

    def overrides(config):
        return {"virtual_stages": Explained(2, "two chunks a rank"), "micro_batch_size": 4}

    reg = PluginRegistry([Plugin("alpha", "a", config=AlphaConfig, overrides=overrides)])
    args = parse(reg, ["--plugins", "alpha"])
    args.micro_batch_size = 4  # as Megatron parsed it
    plan = reg.plan(args)
    assert [(o.dest, o.value) for o in plan.overrides] == [("virtual_stages", 2),
                                                           ("micro_batch_size", 4)]
    assert plan.apply_overrides(args) == [
        "megaseek: --plugins alpha sets Megatron's virtual_stages = 2 (two chunks a rank)"]
    assert args.virtual_stages == 2 and args.micro_batch_size == 4


def test_two_plugins_overriding_one_argument_differently_are_refused():
    reg = PluginRegistry([
        Plugin("alpha", "a", overrides=lambda config: {"virtual_stages": 2}),
        Plugin("beta", "b", overrides=lambda config: {"virtual_stages": 3})])
    with pytest.raises(PluginError, match=r"'alpha' and 'beta' need Megatron's virtual_stages"):
        reg.plan(parse(reg, ["--plugins", "alpha", "beta"]))


def test_a_field_named_unlike_its_flag_is_refused_when_the_flags_are_added():
    @dataclass(frozen=True)
    class Misnamed:
        rate: float = flag("--alpha-rate", 0.5, type=float, help="h")

    reg = PluginRegistry([Plugin("alpha", "a", config=Misnamed)])
    with pytest.raises(TypeError, match="name the field alpha_rate"):
        reg.add_arguments(argparse.ArgumentParser())


# --- errors ----------------------------------------------------------------------------

def test_unknown_plugin_names_flag_and_available(registry):
    args = parse(registry, ["--plugins", "alpha", "nosuch"])
    with pytest.raises(PluginError) as err:
        registry.plan(args)
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
        reg.plan(args)


def test_flag_without_its_plugin(registry):
    args = parse(registry, ["--plugins", "beta", "--alpha-rate", "0.1"])
    with pytest.raises(PluginError) as err:
        registry.plan(args)
    message = str(err.value)
    assert "--alpha-rate" in message
    assert f"{PLUGINS_FLAG} alpha" in message
    assert "--beta" not in message  # beta is enabled: its flags are fine


def test_flag_without_its_plugin_when_nothing_is_enabled(registry):
    args = parse(registry, ["--beta-mode", "y"])
    with pytest.raises(PluginError, match=r"--beta-mode.*--plugins beta"):
        registry.plan(args)


def test_flag_given_with_its_default_value_is_still_an_error(registry):
    args = parse(registry, ["--alpha-rate", "0.5"])
    with pytest.raises(PluginError, match=r"--alpha-rate.*--plugins alpha"):
        registry.plan(args)


def test_store_true_flag_without_its_plugin(registry):
    args = parse(registry, ["--alpha-verbose"])
    with pytest.raises(PluginError, match="--alpha-verbose"):
        registry.plan(args)


def test_every_orphan_flag_is_named(registry):
    args = parse(registry, ["--alpha-rate", "0.1", "--beta-size", "4"])
    with pytest.raises(PluginError) as err:
        registry.plan(args)
    assert "--alpha-rate" in str(err.value) and "--beta-size" in str(err.value)


def test_two_plugins_claiming_the_same_slot(registry):
    args = parse(registry, ["--plugins", "alpha", "gamma"])
    with pytest.raises(PluginError) as err:
        registry.plan(args)
    message = str(err.value)
    assert "alpha" in message and "gamma" in message
    assert "self_attention" in message


def test_plugins_with_different_slots_coexist(registry):
    args = parse(registry, ["--plugins", "gamma", "beta"])
    assert names(registry.plan(args)) == ["beta", "gamma"]  # registry order


def test_same_plugin_listed_twice(registry):
    args = parse(registry, ["--plugins", "beta", "beta"])
    with pytest.raises(PluginError, match=r"--plugins.*beta"):
        registry.plan(args)


def test_two_plugins_defining_the_same_flag_fail_naming_both():
    reg = PluginRegistry([make_plugins()[0]])
    # Registering a second owner of --alpha-rate is refused, naming both plugins.
    with pytest.raises(PluginError) as err:
        reg.register(Plugin("other", "o", config=AlphaConfig))
    assert "'alpha'" in str(err.value) and "'other'" in str(err.value)
    assert "--alpha-rate" in str(err.value)


def test_a_plugin_flag_that_megatron_defines_fails_at_add_arguments():
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpha-rate", type=float)  # as if Megatron had it
    with pytest.raises(PluginError, match="'alpha' adds a flag that Megatron or another"):
        PluginRegistry([make_plugins()[0]]).add_arguments(parser)


def test_registering_a_name_twice():
    alpha = make_plugins()[0]
    reg = PluginRegistry([alpha])
    with pytest.raises(PluginError, match="alpha"):
        reg.register(Plugin("alpha", "another alpha"))
    with pytest.raises(PluginError, match="alpha"):
        PluginRegistry([alpha, alpha])
    assert reg.names == ["alpha"]


# --- checks ----------------------------------------------------------------------------

def test_check_runs_only_for_enabled_plugins(registry, validate_calls):
    registry.plan(parse(registry, ["--plugins", "gamma"]))
    assert validate_calls == []

    reg = PluginRegistry(make_plugins(validate_calls))
    reg.plan(parse(reg, ["--plugins", "alpha", "--alpha-rate", "0.75"]))
    assert validate_calls == [("alpha", 0.75)]  # once, with the given value


def test_check_sees_defaults_filled_in(registry, validate_calls):
    registry.plan(parse(registry, ["--plugins", "alpha"]))
    assert validate_calls == [("alpha", 0.5)]


def test_check_error_propagates(registry):
    args = parse(registry, ["--plugins", "alpha", "--alpha-rate", "2"])
    with pytest.raises(PluginError, match=r"--alpha-rate must be in \[0, 1\], got 2.0"):
        registry.plan(args)


def test_check_exception_type_is_kept():
    def boom(config, args):
        raise RuntimeError("boom from check")

    reg = PluginRegistry([Plugin("delta", "d", check=boom)])
    with pytest.raises(RuntimeError, match="boom from check"):
        reg.plan(parse(reg, ["--plugins", "delta"]))
    # Not enabled: never called.
    assert reg.plan(parse(reg, [])).plugins == ()


def test_disabled_plugin_with_invalid_default_is_not_checked():
    @dataclass(frozen=True)
    class StrictConfig:
        strict_level: int = flag("--strict-level", -1, type=int, help="h")

    def strict_check(config, args):
        raise PluginError("--strict-level must be >= 0")

    reg = PluginRegistry([Plugin("strict", "s", config=StrictConfig, check=strict_check),
                          make_plugins()[1]])
    assert names(reg.plan(parse(reg, ["--plugins", "beta"]))) == ["beta"]


def test_a_checkpoints_saved_arguments_are_planned_without_checks(registry, validate_calls):
    # A checkpoint tool plans from the saved arguments of a run that was checked at its
    # start: the model-shaping resolution runs, the checks do not.
    args = parse(registry, ["--plugins", "alpha", "--alpha-rate", "2"])
    assert names(registry.plan(args, checked=False)) == ["alpha"]
    assert validate_calls == []


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
    assert reg.plan(args).plugins == ()
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
    # Transformer Engine refuses Megatron's default (tests/integration/test_transformer_engine.py).
    monkeypatch.setattr("sys.argv", ["x", "--plugins", "alpha", "--alpha-rate", "0.1",
                                     "--transformer-impl", "local"])
    args = megatron_arguments.parse_args(extra_args_provider=reg.add_arguments,
                                         ignore_unknown_args=False)
    plan = reg.plan(args)
    assert names(plan) == ["alpha"]
    assert plan.config("alpha").alpha_rate == 0.1
    # Megatron's own flags are parsed alongside.
    assert hasattr(args, "num_layers") and hasattr(args, "micro_batch_size")


def test_megatron_parse_args_rejects_orphan_flag(megatron_arguments, monkeypatch):
    reg = PluginRegistry(make_plugins())
    monkeypatch.setattr("sys.argv", ["x", "--beta-size", "7"])
    args = megatron_arguments.parse_args(extra_args_provider=reg.add_arguments,
                                         ignore_unknown_args=False)
    with pytest.raises(PluginError, match=r"--beta-size.*--plugins beta"):
        reg.plan(args)


def test_megatron_parse_args_without_plugins(megatron_arguments, monkeypatch):
    reg = default_registry()
    monkeypatch.setattr("sys.argv", ["x"])
    args = megatron_arguments.parse_args(extra_args_provider=reg.add_arguments,
                                         ignore_unknown_args=False)
    assert args.plugins == []
    assert reg.plan(args).plugins == ()


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
    plan = registry.plan(parse(registry, ["--plugins", "alpha"]))
    assert names(plan) == ["alpha"] and plan.config("alpha").alpha_rate == 0.5
    args = parse(registry, ["--plugins", "beta", "--alpha-rate", "0.5"])
    with pytest.raises(PluginError, match=r"--alpha-rate.*--plugins alpha"):
        registry.plan(args)


def test_planned_twice_on_the_same_args_gives_the_same_plan(registry):
    args = parse(registry, ["--plugins", "alpha"])
    assert registry.plan(args) == registry.plan(args)
    assert vars(args) == {"plugins": ["alpha"]}  # no notes left on args


def test_a_megatron_flag_that_needs_a_disabled_plugin_fails_at_start():
    needs = Plugin("needy", "test", needed_by=lambda args: (
        "--needy-megatron-flag needs --plugins needy" if args.needy_megatron_flag else None))
    registry = PluginRegistry([needs])
    parser = argparse.ArgumentParser()
    parser.add_argument("--needy-megatron-flag", action="store_true")
    registry.add_arguments(parser)
    with pytest.raises(PluginError, match="--needy-megatron-flag needs --plugins needy"):
        registry.plan(parser.parse_args(["--needy-megatron-flag"]))
    assert names(registry.plan(parser.parse_args(["--needy-megatron-flag", "--plugins",
                                                  "needy"]))) == ["needy"]
    assert registry.plan(parser.parse_args([])).plugins == ()


def test_a_megatron_value_is_read_as_megatrons_validation_derives_it():
    from plugins.config import megatron, read
    from plugins.common.flags import recompute_granularity as as_validated

    @dataclass(frozen=True)
    class Reads:
        recompute_granularity: str | None = megatron("recompute_granularity",
                                                     derive=as_validated)
        micro_batch_size: int = megatron("micro_batch_size", 1)

    given = argparse.Namespace(recompute_activations=True, recompute_granularity=None)
    assert read(Reads, given) == Reads(recompute_granularity="selective", micro_batch_size=1)
    full = argparse.Namespace(recompute_granularity="full", micro_batch_size=4)
    assert read(Reads, full) == Reads(recompute_granularity="full", micro_batch_size=4)
