"""`megaseek pretrain` / `python -m integration.pretrain`: Megatron's GPT pretraining with
megaseek's plugins, through `megatron.training.pretrain` as Megatron-LM's
`pretrain_gpt.py` does. Takes every Megatron argument plus `--plugins` and plugin flags.

Run it under torchrun. Without CUDA it runs on CPU with gloo (`upstream.cpu`).
It builds Megatron's local modules unless `--transformer-impl transformer_engine` is given
(Megatron's own default is TE's: `integration.transformer_engine`).
Without `--data-path` or `--mock-data`, it trains on the built-in byte-level corpus
(`integration.corpus`), with `--tokenizer-type NullTokenizer` and `--vocab-size 257`
unless the user gives one (257 or more).
"""

from __future__ import annotations

import os
import sys
import tempfile

import integration  # noqa: F401  (makes megatron.training importable on Python 3.11)
from integration import hooks, presets
from integration.corpus import BYTE_VOCAB_SIZE, build_byte_corpus
from plugins import PluginError, PluginRegistry, default_registry
from upstream import cpu, shutdown
from upstream.cpu import given


def with_defaults(argv: list[str], user_argv: list[str] | None = None) -> list[str]:
    """Adds what a CPU run needs, Megatron's local modules (the plugins' modules are local
    ones; `--transformer-impl transformer_engine` builds TE's spec where it is given) and
    the built-in corpus, each where the user chose nothing. Only flags the user did not
    give are added; nothing the user gave is changed. `user_argv` is the command line as
    the user wrote it (before `--preset` expanded; default `argv`): a preset's
    `--vocab-size` gives way to the built-in corpus's, the user's is kept (or refused)."""
    user_argv = argv if user_argv is None else user_argv
    argv = cpu.with_cpu_arguments(argv)
    added: list[str] = []
    if not given(argv, "--transformer-impl"):
        added += ["--transformer-impl", "local"]
    if not (given(argv, "--data-path") or given(argv, "--mock-data")
            or given(argv, "--train-data-path")):
        own_tokenizer = given(argv, "--tokenizer-type")
        if own_tokenizer or given(user_argv, "--vocab-size"):
            check_vocabulary_holds_the_corpus(argv)
        cache = os.environ.get("MEGASEEK_DATA_CACHE", os.path.join(tempfile.gettempdir(), "megaseek-data"))
        added += ["--data-path", build_byte_corpus(cache), "--split", "90,5,5"]
        if not own_tokenizer:
            added += ["--tokenizer-type", "NullTokenizer"]
            if not given(user_argv, "--vocab-size"):
                added += ["--vocab-size", str(BYTE_VOCAB_SIZE)]
    return argv + added


def check_training_length(argv: list[str]) -> None:
    """Megatron's `pretrain()` asks for a training length only once the model is built
    (training.py:1939); a run of `megaseek pretrain` always trains."""
    if not any(given(argv, flag) for flag in ("--train-iters", "--train-samples",
                                              "--skip-train")):
        raise PluginError("give --train-iters N (or --train-samples N): how long to train")


def check_vocabulary_holds_the_corpus(argv: list[str]) -> None:
    """The built-in corpus's token ids go up to 256; with the NullTokenizer the model's
    vocabulary is --vocab-size (padded), and a smaller one fails at the first forward
    with an IndexError in the embedding (a device-side assert on GPU). Other tokenizers
    bring their own vocabulary; of a user's --data-path nothing is known at start-up (the
    largest id is in no index: only reading all the data would tell)."""
    chosen = presets.options(argv)
    vocab = (chosen.get("--vocab-size") or [None])[-1]
    tokenizer = (chosen.get("--tokenizer-type") or ["NullTokenizer"])[-1]  # the corpus's own
    if tokenizer != "NullTokenizer" or vocab is None:
        return
    if vocab.isdigit() and int(vocab) < BYTE_VOCAB_SIZE:
        raise PluginError(f"--vocab-size {vocab} is smaller than the built-in corpus's "
                          f"{BYTE_VOCAB_SIZE} token ids (bytes and the end-of-document token; "
                          f"it trains on it without --data-path or --mock-data): give "
                          f"--vocab-size {BYTE_VOCAB_SIZE} or more, or your own --data-path")


def one_rank_without_torchrun() -> None:
    """Started without torchrun (no WORLD_SIZE in the environment): run as the only rank,
    and say so, rather than fail on a missing MASTER_ADDR."""
    if "WORLD_SIZE" in os.environ:
        return
    # Port 0: the only rank hosts the rendezvous store, which binds a free port itself
    # (torch's env:// rendezvous passes it to TCPStore) and no other rank needs to know
    # it. A port picked here and released first could be taken before the store binds it.
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    print("megaseek: not started by torchrun: running one rank (for several, start it as "
          "`torchrun --nproc-per-node N -m integration.pretrain ...`)", file=sys.stderr)


HELP_FLAGS = ("-h", "--help")


def print_help(registry: PluginRegistry, prog: str = "megaseek pretrain") -> None:
    """Megatron's flags and the plugins' (the parser a run parses with), after what
    megaseek adds to them."""
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    class Formatter(argparse.RawDescriptionHelpFormatter):
        # Help texts taken from config docstrings may hold a bare '%' that argparse reads
        # as a format (transformer_config.py:1278, "1.10 = 10%)": Megatron's own --help
        # fails on it with a ValueError); such a text is printed as written.
        def _expand_help(self, action):
            try:
                return super()._expand_help(action)
            except (ValueError, TypeError, KeyError):
                return action.help

    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False, formatter_class=Formatter,
        usage=f"{prog} [--preset NAME] [MEGATRON AND PLUGIN FLAGS]",
        description=__doc__ + "\n--preset NAME: a model's flags, put before the others "
                              f"(one of {', '.join(presets.PRESETS)}).")
    registry.add_arguments(add_megatron_arguments(parser))
    parser.print_help()


def main(argv: list[str] | None = None, registry: PluginRegistry | None = None) -> None:
    user_argv = list(sys.argv[1:] if argv is None else argv)
    registry = registry or default_registry()
    if any(flag in user_argv for flag in HELP_FLAGS):
        print_help(registry)
        return
    one_rank_without_torchrun()
    argv = presets.expand(user_argv)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

    with hooks.megatron_run(registry) as run:
        check_training_length(argv)
        argv = with_defaults(argv, user_argv)
        from megatron.core.enums import ModelType
        from megatron.training import pretrain
        from megatron.training.argument_utils import pretrain_cfg_container_from_args
        from megatron.training.arguments import parse_and_validate_args

        from integration import gpt

        sys.argv = [sys.argv[0], *argv]  # Megatron parses sys.argv
        args = parse_and_validate_args(extra_args_provider=registry.add_arguments)
        hooks.enable(run)
        pretrain(pretrain_cfg_container_from_args(args), gpt.datasets_provider,
                 ModelType.encoder_or_decoder, gpt.forward_step, model_provider=gpt.model_provider)
    shutdown.end_run()  # pretrain() leaves the process groups up: every rank ends them together


if __name__ == "__main__":
    main()
