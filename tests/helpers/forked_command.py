"""A `python -m module ...` or `python script.py ...` command line run in a process forked
from the tests' fork server (`tests.helpers.multirank.forked_context`), which has imported torch,
Megatron and the plugins once: a fresh interpreter imports them again, about 4 s of CPU,
on each rank of the suite's hundred-odd training runs.

    rank = start([sys.executable, "-m", "integration.pretrain", ...], env, cwd, out, err)
    rank.poll()       # None while it runs, else its exit code (minus the signal if killed)

The child runs the command as the interpreter would (`runpy`, `sys.argv`, the working
directory and environment given, its output at descriptors 1 and 2 of the given files,
unbuffered) and ends as the interpreter does: non-daemon threads joined, `atexit`
handlers run, the exit code of `SystemExit` or 1 with the traceback. What a fork cannot
give is a fresh interpreter's shutdown (module teardown, finalizers): the tests of
shutdown itself launch with real torchrun (`tests.helpers.training_runs.torchrun(...,
launcher="torchrun")`).
"""

from __future__ import annotations

import atexit
import io
import multiprocessing
import os
import runpy
import subprocess
import sys
import threading
import traceback
from pathlib import Path

from tests.helpers import multirank


def can_fork(cmd: list[str], env: dict[str, str]) -> bool:
    """Whether `cmd` can run forked with environment `env`: this interpreter, `-m module`
    or a script, and a fork server that is the same as a fresh process. Not under
    TRITON_INTERPRET=1 (Triton chose at its import, in the server, without), and not where
    CUDA is visible (a forked child of a process that asked CUDA for its devices cannot
    use them)."""
    import torch

    runs_python = len(cmd) >= 2 and cmd[0] == sys.executable
    plain = runs_python and (cmd[1] == "-m" or not cmd[1].startswith("-"))
    interpreted = "1" in (env.get("TRITON_INTERPRET"), os.environ.get("TRITON_INTERPRET"))
    return plain and not interpreted and not torch.cuda.is_available()


class ForkedProcess:
    """`subprocess.Popen`'s poll / wait / terminate / kill over a forked child."""

    def __init__(self, process) -> None:
        self._process = process
        self.pid = process.pid

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(str(self.pid), timeout)
        return self._process.exitcode

    def terminate(self) -> None:
        self._process.terminate()

    def kill(self) -> None:
        self._process.kill()


def start(cmd: list[str], env: dict[str, str], cwd: Path, stdout_path: str,
          stderr_path: str) -> ForkedProcess:
    """Starts `cmd` (see `can_fork`) in a forked child; its output goes to the two files."""
    ctx = multirank.forked_context()
    with multirank.child_environment():
        process = ctx.Process(target=_run_as_main, daemon=False,
                              args=(cmd[1:], env, str(cwd), stdout_path, stderr_path))
        process.start()
    return ForkedProcess(process)


def _run_as_main(argv: list[str], env: dict[str, str], cwd: str, stdout_path: str,
                 stderr_path: str) -> None:
    """The child: `python *argv` as a fresh interpreter would run it, then its exit."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    multiprocessing.set_start_method(None, force=True)  # the platform's, not the server's
    for fd, path in ((1, stdout_path), (2, stderr_path)):  # C and C++ output too
        file = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(file, fd)
        os.close(file)
    # Unbuffered, as if PYTHONUNBUFFERED: a rank terminated by its launcher keeps its output.
    sys.stdout, sys.stderr = (
        io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding=sys.stdout.encoding,
                         errors=stream.errors, line_buffering=True, write_through=True)
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)))
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = cwd  # as `python -m` puts the working directory first
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException:  # noqa: BLE001  (the interpreter's report of an uncaught one)
        traceback.print_exc()
        code = 1
    # The interpreter's exit, which os._exit skips: threads, then atexit handlers.
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_code(exit: SystemExit) -> int:
    """The process exit code the interpreter gives `SystemExit(exit.code)`."""
    if exit.code is None:
        return 0
    if isinstance(exit.code, int):
        return exit.code & 0xFF
    print(exit.code, file=sys.stderr)
    return 1
