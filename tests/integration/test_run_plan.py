"""The run plan as a run makes it (`integration.hooks.megatron_run`): once, before Megatron
validates its arguments, with the plugins' overrides applied and said first, so that
Megatron validates what will run."""

from __future__ import annotations

import sys

import pytest

import integration  # noqa: F401  (megatron.training on Python 3.11)
from integration import hooks
from plugins import PluginRegistry, builtin_plugins
from upstream import cpu

DUALPIPEV = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
             "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "1",
             "--global-batch-size", "8", "--untie-embeddings-and-output-weights",
             "--pipeline-model-parallel-size", "2", "--transformer-impl", "local",
             "--plugins", "dualpipe", "--pipeline-schedule", "dualpipev"]


class CountingRegistry(PluginRegistry):
    """The built-in plugins, counting the plans made."""

    def __init__(self) -> None:
        super().__init__(builtin_plugins())
        self.plans = 0

    def plan(self, args, checked=True):
        self.plans += 1
        return super().plan(args, checked)


@pytest.fixture
def two_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")


def _validated_in_a_run(argv, monkeypatch):
    """(run, args, the plan `enable` attached) for `argv`, parsed and validated by Megatron
    inside a run's frame, the plugins attached for the model only."""
    registry = CountingRegistry()
    with hooks.megatron_run(registry) as run:
        from megatron.training import arguments  # its functions as the run's frame wraps them

        monkeypatch.setattr(sys, "argv", ["pretrain", *cpu.with_cpu_arguments(argv)])
        args = arguments.parse_args(extra_args_provider=registry.add_arguments)
        arguments.validate_args(args, {})
        plan = hooks.enable(run, model_only=True)
    return registry, run, args, plan


def test_overrides_are_applied_and_said_before_megatron_validates(two_ranks, monkeypatch,
                                                                   capsys):
    registry, run, args, plan = _validated_in_a_run(DUALPIPEV, monkeypatch)
    out = capsys.readouterr().out
    said = ("megaseek: --plugins dualpipe sets Megatron's "
            "num_virtual_stages_per_pipeline_rank = 2")
    assert said in out
    # Megatron validated the two virtual stages: its own line says it, after ours.
    assert out.index(said) < out.index("Number of virtual stages per pipeline stage: 2")
    assert args.virtual_pipeline_model_parallel_size == 2
    assert [(o.plugin, o.dest, o.value) for o in plan.overrides] == [
        ("dualpipe", "num_virtual_stages_per_pipeline_rank", 2),
        ("dualpipe", "align_param_gather", False)]


def test_the_plan_is_made_once_per_run(two_ranks, monkeypatch):
    registry, run, args, plan = _validated_in_a_run(DUALPIPEV, monkeypatch)
    assert registry.plans == 1
    assert run.plan is plan and plan.names == ["dualpipe"]
    assert plan.config("dualpipe").pipeline_schedule == "dualpipev"
    # No notes on Megatron's arguments: only what the plugins' overrides set.
    assert not {"plugin_flags_defaulted", "megaseek_flags_honoured"} & set(vars(args))


def test_a_second_validation_with_other_arguments_is_refused(two_ranks, monkeypatch):
    registry = CountingRegistry()
    with pytest.raises(RuntimeError, match="a run is planned once"):
        with hooks.megatron_run(registry):
            from megatron.training import arguments

            monkeypatch.setattr(sys, "argv", ["pretrain", *cpu.with_cpu_arguments(DUALPIPEV)])
            for _ in range(2):
                arguments.validate_args(
                    arguments.parse_args(extra_args_provider=registry.add_arguments), {})


def test_a_refused_plan_stops_before_megatron_validates(two_ranks, monkeypatch, capsys):
    # The plugins' checks come first: Megatron prints nothing of its validation.
    with pytest.raises(SystemExit) as exit:
        _validated_in_a_run([a for a in DUALPIPEV if a != "--untie-embeddings-and-output-weights"],
                            monkeypatch)
    assert exit.value.code == 2
    captured = capsys.readouterr()
    assert "needs --untie-embeddings-and-output-weights" in captured.err
    assert "Number of virtual stages" not in captured.out
