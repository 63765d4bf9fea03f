"""What the GPU benchmarks share besides timing (bench.timing): the device, the errors a
case can end with, freeing memory between cases, and Megatron's model-parallel state on
one rank of the device.

On a CPU-only machine the same functions run (gloo with megaseek's CPU fixes), so the
benchmarks' smoke modes exercise every code path without a GPU.
"""

from __future__ import annotations

import contextlib
import gc
import traceback

import torch


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def failure(error: BaseException) -> str:
    """One line naming an error, for a table cell; the whole message goes to the notes."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"


def free(device: torch.device) -> None:
    """Give cached blocks back between cases, so one large case does not starve the next
    (modules in reference cycles, as Megatron's, wait for the garbage collector)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@contextlib.contextmanager
def failure_recorded(into: dict, key: str, device: torch.device):
    """Runs the block; an exception is printed and stored as `into[key]` (the table says
    why, and the next case goes on); cached GPU memory is given back either way."""
    try:
        yield
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        into[key] = failure(error)
    finally:
        free(device)


def megatron_on(device: torch.device):
    """TP = PP = EP = 1 on a one-rank group for `device` (bench.single_rank)."""
    from bench.single_rank import megatron_single_rank

    return megatron_single_rank(device)
