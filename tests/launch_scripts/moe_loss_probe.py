"""`integration.pretrain` that also prints each auxiliary loss the moe plugin's layers hand
to Megatron's MoE metrics tracker, one line per layer forward: `aux ITERATION RANK NAME
VALUE` (ITERATION as Megatron's log line numbers it), for comparison with that log line."""

import os

from integration.pretrain import main
from plugins.moe.layer import DeepSeekMoE

record = DeepSeekMoE._record


def record_and_print(self, name, value, **groups):
    from megatron.training import get_args

    print(f"aux {get_args().curr_iteration + 1} {os.environ['RANK']} {name} {value.item()!r}",
          flush=True)
    record(self, name, value, **groups)


if __name__ == "__main__":
    DeepSeekMoE._record = record_and_print
    main()
