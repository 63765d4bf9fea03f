"""`python -m integration.pretrain` with Megatron's `--exp-avg-dtype` / `--exp-avg-sq-dtype`
honoured without Transformer Engine (`plugins.fp8.optimizer_hook`), until the plugin
registry wires it: right after Megatron parses and validates its arguments, the moment
flags are checked and, where BF16 moments are asked for, installed for the run."""

import sys
from functools import wraps

import integration  # noqa: F401  (makes megatron.training importable on Python 3.11)
from integration import pretrain
from integration.patching import Patcher
from plugins.fp8.optimizer_hook import attach_bf16_moments


def main(argv: list[str]) -> None:
    import megatron.training.arguments as arguments

    patcher = Patcher()
    parse_and_validate_args = arguments.parse_and_validate_args

    @wraps(parse_and_validate_args)
    def parse_validate_and_attach(*args, **kwargs):
        parsed = parse_and_validate_args(*args, **kwargs)
        attach_bf16_moments(parsed, patcher)
        return parsed

    # integration.pretrain.main imports parse_and_validate_args from this module at call time.
    patcher.setattr(arguments, "parse_and_validate_args", parse_validate_and_attach)
    try:
        pretrain.main(argv)
    finally:
        patcher.undo()


if __name__ == "__main__":
    main(sys.argv[1:])
