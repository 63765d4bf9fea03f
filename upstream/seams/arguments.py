"""The argument seams: the plugins' flags join Megatron's parser, their start-up checks run
before Megatron prints its argument dump, and what Megatron's parser or validation
refuses is said in words, once, instead of raised or printed by every rank."""

from __future__ import annotations

import os
from functools import wraps
from typing import Any, Callable

from upstream.megatron_modules import megatron_arguments
from upstream.patching import Fix, Patcher, source_has
from upstream.seams import SEAM, VERSION
from upstream.seams.errors import MegatronRefused


def plugin_arguments(add_arguments: Callable, on_parsed: Callable[[Any], None]) -> Fix:
    """`add_arguments(parser)` runs in every parse of Megatron's arguments (megatron.training
    parses again for its own probes, e.g. ft_integration.py:78); `on_parsed(args)` after
    the parse that `parse_and_validate_args` makes (the script's)."""

    def apply(patcher: Patcher) -> None:
        arguments = megatron_arguments()
        parse_args, parse_and_validate_args = arguments.parse_args, arguments.parse_and_validate_args

        @wraps(parse_args)
        def parse_args_with_plugin_flags(extra_args_provider=None, ignore_unknown_args=False):
            def provide(parser):
                parser = add_arguments(parser)
                return extra_args_provider(parser) if extra_args_provider else parser

            return parse_args(provide, ignore_unknown_args)

        @wraps(parse_and_validate_args)
        def parse_validate_and_enable(*args, **kwargs):
            parsed = parse_and_validate_args(*args, **kwargs)
            on_parsed(parsed)
            return parsed

        patcher.setattr(arguments, "parse_args", parse_args_with_plugin_flags)
        patcher.setattr(arguments, "parse_and_validate_args", parse_validate_and_enable)

    return Fix(
        "seam:plugin-arguments",
        f"megatron/training/arguments.py parse_args, parse_and_validate_args ({VERSION})",
        "a launch script passes only its own extra_args_provider; the plugin flags join "
        "every parse, and the plugins are enabled right after the script's",
        lambda: source_has(megatron_arguments().parse_and_validate_args,
                           "parse_args("),
        apply, SEAM)


def checks_before_argument_dump(check: Callable[[Any], None],
                                check_first: Callable[[Any], None] | None = None) -> Fix:
    """`check(args)` runs at the end of Megatron's `validate_args`, before it prints the
    argument dump, so that a configuration error is the first thing the user reads;
    `check_first(args)` runs before `validate_args` (for values its own checks would misread
    or crash on). An assertion of Megatron's own validation becomes a `MegatronRefused`
    that says it in words (`upstream.argument_words`) with its place."""

    def apply(patcher: Patcher) -> None:
        arguments = megatron_arguments()
        print_args, validate_args = arguments._print_args, arguments.validate_args

        @wraps(validate_args)
        def validate_or_refuse(args, *rest, **kwargs):
            if check_first is not None:
                check_first(args)
            try:
                return validate_args(args, *rest, **kwargs)
            except (AssertionError, ValueError) as error:
                if not _raised_by_megatron(error):
                    raise  # e.g. a plugin's PluginError from the check above
                raise MegatronRefused(_quoted(error, args)) from error

        patcher.setattr(arguments, "validate_args", validate_or_refuse)

        @wraps(print_args)
        def check_then_print(title, args):
            if title == "arguments":
                check(args)
            print_args(title, args)

        patcher.setattr(arguments, "_print_args", check_then_print)

    return Fix(
        "seam:checks-before-argument-dump",
        f"megatron/training/arguments.py:1904 (validate_args ends with "
        f"_print_args('arguments', args)) ({VERSION})",
        "Megatron prints some 800 argument lines before returning; plugin checks run "
        "before them, and its own failed checks are said in words instead of raised as "
        "AssertionError tracebacks",
        lambda: source_has(megatron_arguments().validate_args,
                           '_print_args("arguments", args)'),
        apply, SEAM)


def _raised_by_megatron(error: Exception) -> bool:
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"{os.sep}megatron{os.sep}" in frames[-1].filename


def _quoted(error: Exception, args: Any = None) -> str:
    import traceback

    from upstream.argument_words import assert_condition, in_words

    frame = traceback.extract_tb(error.__traceback__)[-1]
    where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
    condition = (assert_condition(frame.filename, frame.lineno)
                 if isinstance(error, AssertionError) else None)
    said = in_words(condition, str(error).strip(), args)
    return f"Megatron's argument check failed: {said} (megatron/training/{where})"


def argument_errors_refused() -> Fix:
    """A command line Megatron's parser refuses (an unknown flag, a bad value) raises
    `MegatronRefused` with argparse's message, so that the run ends with one line on rank
    0 as every refusal does, instead of argparse's usage and error printed by every rank."""

    def apply(patcher: Patcher) -> None:
        import argparse

        arguments = megatron_arguments()
        parse_args = arguments.parse_args

        def refuse(parser, message):
            raise MegatronRefused(message)

        @wraps(parse_args)
        def parse_or_refuse(*args, **kwargs):
            with patcher.scoped(argparse.ArgumentParser, "error", refuse):
                return parse_args(*args, **kwargs)

        patcher.setattr(arguments, "parse_args", parse_or_refuse)

    return Fix(
        "seam:argument-errors-refused",
        f"megatron/training/arguments.py parse_args: parser.parse_args / parse_known_args "
        f"({VERSION}); argparse.ArgumentParser.error prints the usage and exits",
        "each rank parses the command line and argparse prints its usage and error on every "
        "one; the error is raised instead, and reported once by the run's frame",
        lambda: source_has(megatron_arguments().parse_args, "parse_args(")
        or source_has(megatron_arguments().parse_args, "parse_known_args("),
        apply, SEAM)
