"""A plugin's configuration: one frozen dataclass per plugin, its fields declared once.

A field is either
- one of the plugin's own flags, `flag("--ema-decay", default, help=...)`: the registry
  turns it into an argparse option (type from the default or `type=`, the help text, any
  other argparse keyword) in the plugin's group of Megatron's parser; or
- a Megatron argument the plugin's hooks need, `megatron("log_interval")`: read from
  Megatron's parsed arguments when the run plan is made, before Megatron validates them
  (values Megatron derives later come from the objects the hooks receive: the model's
  TransformerConfig, the process groups).

`read(Config, args)` builds the config from a parsed command line: a flag the user did not
give takes its declared default (its argparse default is `argparse.SUPPRESS`, so that the
registry tells a given flag from a defaulted one without placeholders), a Megatron value
is copied as parsed. The config is then what the plugin's hooks receive, never `args`.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Iterator

_FLAG, _MEGATRON, _DERIVE = "megaseek.flag", "megaseek.megatron", "megaseek.derive"


@dataclasses.dataclass(frozen=True)
class Flag:
    """A plugin flag as argparse takes it: the option and its keywords, default aside."""

    option: str  # e.g. "--ema-decay"
    help: str
    argparse: dict

    @property
    def dest(self) -> str:
        return self.option.lstrip("-").replace("-", "_")


def flag(option: str, default: Any, *, help: str, **argparse_keywords: Any):
    """A dataclass field that is the plugin flag `option` (default `default`)."""
    return dataclasses.field(default=_frozen(default), metadata={
        _FLAG: Flag(option, help, argparse_keywords)})


def megatron(dest: str, default: Any = None,
             derive: Callable[[argparse.Namespace], Any] | None = None):
    """A dataclass field holding Megatron's argument `dest` (argparse's name) as parsed;
    `default` where the arguments have no such attribute (an older saved checkpoint).
    `derive(args)`, where given, reads it as Megatron's validation will set it from other
    flags (e.g. --recompute-activations: `plugins.common.flags.recompute_granularity`)."""
    return dataclasses.field(default=default, metadata={_MEGATRON: dest, _DERIVE: derive})


def flags(config_type: type | None) -> Iterator[tuple[dataclasses.Field, Flag]]:
    """The plugin flags `config_type` declares, in declaration order."""
    if config_type is None:
        return
    for field in dataclasses.fields(config_type):
        if _FLAG in field.metadata:
            yield field, field.metadata[_FLAG]


def _frozen(value: Any) -> Any:
    """Lists (argparse's nargs values) as tuples: a config does not change."""
    return tuple(value) if isinstance(value, list) else value


def add_flags(config_type: type | None, group: argparse._ArgumentGroup) -> None:
    """Adds the flags of `config_type` to `group`; an ungiven flag leaves no attribute on
    the parsed namespace (`argparse.SUPPRESS`), which `read` then fills from the field."""
    for field, declared in flags(config_type):
        if field.name != declared.dest:  # the field is named as argparse names the flag
            raise TypeError(f"{config_type.__name__}.{field.name} declares {declared.option}: "
                            f"name the field {declared.dest}")
        group.add_argument(declared.option, default=argparse.SUPPRESS, help=declared.help,
                           **declared.argparse)


def read(config_type: type, args: argparse.Namespace) -> Any:
    """`config_type` from parsed arguments (read only)."""
    values = {}
    for field in dataclasses.fields(config_type):
        if _FLAG in field.metadata:
            values[field.name] = _frozen(getattr(args, field.name, field.default))
        elif _MEGATRON in field.metadata:
            derive = field.metadata[_DERIVE]
            value = (derive(args) if derive is not None
                     else getattr(args, field.metadata[_MEGATRON], field.default))
            values[field.name] = _frozen(value)
    return config_type(**values)
