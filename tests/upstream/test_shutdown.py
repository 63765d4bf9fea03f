"""Both entry points end a 2-rank gloo run cleanly (`upstream.shutdown`): every rank
exits 0, and once the training has returned no process group is left, nor a gloo
thread that could still take the GIL while the interpreter finalises (which aborted the
demo's rank 1 with "terminate called without an active exception"), nor a non-daemon
thread."""

from __future__ import annotations

import re

import pytest

from tests.helpers import paths
from tests.helpers.training_runs import TINY_GPT, torchrun

pytestmark = pytest.mark.slow
RELEASE = str(paths.RELEASE_SCRIPT)
SHORT = TINY_GPT + ["--tensor-model-parallel-size", "2", "--train-iters", "3", "--eval-iters", "1"]

# Runs an entry point's main() as torchrun would, then says what the process still holds.
WRAPPER = """\
import os
import threading

from integration.{entry} import main

main()

import torch.distributed as dist

gloo = 0
if os.path.isdir("/proc/self/task"):
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{{task}}/comm") as comm:
                gloo += "gloo" in comm.read()
        except OSError:  # the thread ended meanwhile
            pass
others = [t.name for t in threading.enumerate()
          if not t.daemon and t is not threading.main_thread()]
print(f"after main, rank {{os.environ['RANK']}}: initialized={{dist.is_initialized()}} "
      f"non_daemon_threads={{others}} gloo_threads={{gloo}}", flush=True)
"""
MARKER = re.compile(r"after main, rank (\d): initialized=(\w+) non_daemon_threads=(.*?) "
                    r"gloo_threads=(\d+)")


@pytest.mark.parametrize("entry,script_args", [
    ("pretrain", SHORT),
    ("launch", [RELEASE, *SHORT, "--mock-data", "--tokenizer-type", "NullTokenizer",
                "--vocab-size", "128"]),
], ids=["pretrain", "launch"])
def test_every_rank_ends_with_no_process_group_left(entry, script_args, tmp_path):
    wrapper = tmp_path / f"run_{entry}.py"
    wrapper.write_text(WRAPPER.format(entry=entry))
    output = torchrun([str(wrapper)], script_args, tmp_path,  # raises unless both exit 0
                      launcher="torchrun")

    found = {rank: rest for rank, *rest in MARKER.findall(output)}
    assert sorted(found) == ["0", "1"], f"a rank did not report after main():\n{output[-3000:]}"
    for rank, (initialized, others, gloo) in found.items():
        assert initialized == "False", f"rank {rank} left torch.distributed initialised"
        assert others == "[]", f"rank {rank} left non-daemon threads: {others}"
        assert gloo == "0", f"rank {rank} left {gloo} gloo threads (a process group not destroyed)"
