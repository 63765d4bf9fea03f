"""What the results were measured on: machine, date and the versions that matter."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version


def package_version(package: str) -> str:
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


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "unknown"


def accelerator(device) -> dict[str, str]:
    """The device a GPU benchmark ran on and the versions that decide its speed."""
    import torch

    info = {"device": str(device), "triton": package_version("triton")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update({
            "gpu": f"{p.name}, sm{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                   f"{p.total_memory / 2**30:.0f} GiB, L2 {p.L2_cache_size / 2**20:.0f} MiB",
            "cuda (torch build)": str(torch.version.cuda),
            "driver": _driver(),
        })
    return info


def describe() -> dict[str, str]:
    """The machine, now; with the GPU's description where there is one."""
    import torch

    processor = platform.processor() or platform.machine()
    model = _cpu_model()
    info = {
        "machine": platform.platform(),
        "cpus": str(os.cpu_count()),
        "processor": f"{processor} ({model})" if model else processor,
        "torch threads": str(torch.get_num_threads()),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "megatron-core": package_version("megatron-core"),
    }
    if torch.cuda.is_available():
        info.update(accelerator(torch.device("cuda", torch.cuda.current_device())))
    return info
