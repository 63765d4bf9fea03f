"""What the results were measured on: machine, date and the versions that matter."""

from __future__ import annotations

import datetime
import os
import platform
from importlib.metadata import PackageNotFoundError, version


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    # platform.processor() is often just "x86_64" (or "") on Linux; cpuinfo names the part.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def describe() -> dict[str, str]:
    import torch

    processor = platform.processor() or platform.machine()
    model = _cpu_model()
    return {
        "machine": platform.platform(),
        "cpus": str(os.cpu_count()),
        "processor": f"{processor} ({model})" if model else processor,
        "torch threads": str(torch.get_num_threads()),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "megatron-core": _version("megatron-core"),
    }
