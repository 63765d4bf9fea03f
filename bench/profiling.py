"""What torch.profiler says about a call, for the GPU benchmarks: the work it queues on the
device (kernel launches, copies and fills), the times it makes the host wait for the
device, and where the device time goes by kernel family.

On the CPU (the benchmarks' smoke runs) the same functions run: nothing is queued on a
device, so the launch count is None; host waits are still seen as the ops that would wait
on a GPU (`.item()`, `bool(t)`, `nonzero`); the families are those of the CPU ops, timed
on the CPU.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

# Ops that read a device value on the host: each is one wait for the device.
SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_static",
                      "aten::unique", "aten::_unique2", "aten::masked_select"})
# CUDA runtime calls that wait.
SYNC_CALLS = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize",
                        "cudaEventSynchronize", "cudaMemcpy"})
COPY = re.compile(r"^(memcpy|memset)", re.IGNORECASE)
CALL = "bench::profiled_call"  # the range around each profiled call


@dataclass(frozen=True)
class Profile:
    events: list          # torch.autograd.profiler_util.FunctionEvent, the whole trace
    calls: int            # how many calls of the profiled function it covers
    on_device: bool       # device (CUDA) activity was recorded

    def device_ops(self) -> list:
        """The device's activities: kernels, copies, fills (none on the CPU)."""
        return [e for e in self.events if _queued_work(e)]


DEVICE_WORK = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
NOT_WORK = re.compile(r"^(context|stream|event|device) ?sync", re.IGNORECASE)


def _queued_work(e) -> bool:
    """A kernel, copy or fill on the device. The trace also puts ranges (record_function's,
    mirrored on the GPU's timeline) and synchronizations there; torch versions without
    the event's activity type are told by its name."""
    kind = getattr(e, "activity_type", None)
    if isinstance(kind, str) and kind:
        return kind in DEVICE_WORK
    return (e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
            and e.name != CALL and not NOT_WORK.match(e.name))


def profiled(fn: Callable[[], object], device: torch.device, calls: int = 2) -> Profile:
    """`calls` calls of fn under torch.profiler, each in a `CALL` range, the device drained
    before the profiler stops (outside the ranges: not counted as the call's wait)."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            with record_function(CALL):
                fn()
        if cuda:
            torch.cuda.synchronize(device)
    return Profile(list(prof.events()), calls, cuda)


def launches(p: Profile) -> dict[str, int] | None:
    """Device work queued per call: {"kernels", "copies" (memcpy/memset), "total"}; None
    where no device activity was recorded (the CPU)."""
    if not p.on_device:
        return None
    ops = p.device_ops()
    copies = sum(1 for e in ops if COPY.match(e.name)
                 or getattr(e, "activity_type", None) in ("gpu_memcpy", "gpu_memset"))
    kernels = len(ops) - copies
    return {"kernels": kernels // p.calls, "copies": copies // p.calls,
            "total": len(ops) // p.calls}


def _ancestors(event) -> list[str]:
    names, parent = [], event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def host_waits(p: Profile) -> int:
    """Times per call the host waits for the device, counted twice: as the syncing ops, and
    as the waiting CUDA runtime calls (each such op makes one; a device-to-host copy or a
    torch.cuda.synchronize makes one of its own); the larger count. On the CPU only the
    ops, which would wait on a GPU. What starts inside a call's range counts, on any
    thread (on a GPU, autograd runs backward on a thread of its own)."""
    spans = [(e.time_range.start, e.time_range.end) for e in p.events
             if e.name == CALL and e.device_type == DeviceType.CPU]
    inside = [e for e in p.events if e.device_type == DeviceType.CPU
              and any(start <= e.time_range.start <= end for start, end in spans)]
    ops = sum(1 for e in inside if e.name in SYNC_OPS)
    calls = sum(1 for e in inside if e.name in SYNC_CALLS)
    return max(ops, calls) // p.calls


# Kernel families, the first match wins: (family, pattern on the kernel's name, pattern on
# the names of the ops that launched it). Kernel names are cuBLAS's (nvjet_*, sm90_xmma_*),
# CUTLASS's, PyTorch's (at::native::*) and Triton's (the @triton.jit function's name).
FAMILIES: tuple[tuple[str, str | None, str | None], ...] = (
    ("copy / fill", r"^(memcpy|memset)|copy_|catarray|fill",
     r"^aten::(copy_|_to_copy|contiguous|clone|cat|stack|pad|constant_pad_nd|fill_|zero_)$"),
    ("FP8 quantization", r"quantiz|_e4m3|amax|_tile_scales", r"quantiz"),
    ("attention", r"flash|fmha|attention|attn|sdpa|softmax", r"scaled_dot_product|attention"),
    ("FP8 GEMM", r"e4m3|f8f8|fp8|qgmma|_block_scaled_gemm|scaled_mm",
     r"_scaled_mm|scaled_mm|_scaled_grouped_mm"),
    ("grouped GEMM", r"group(ed)?_?(mm|gemm)|groupproblem", r"_grouped_mm"),
    ("BF16 GEMM", r"gemm|nvjet|xmma|cutlass|wgmma|matmul|(^|_)mm(_|$)|cublas",
     r"aten::(mm|addmm|bmm|matmul|linear|baddbmm)$"),
    ("norm", r"norm|rms", None),
    ("routing / permutation", r"sort|topk|scatter|gather|index|cumsum|histc|bincount|"
     r"nonzero|unique|radix", r"sort|topk|scatter|gather|index|cumsum|histc|bincount"),
    ("elementwise / reduction", r"elementwise|vectorized|unrolled|reduce|silu|sigmoid|"
     r"mul|add|div|where|clamp|abs|neg|exp|pow|sum", None),
)


def family(name: str, launched_by: list[str]) -> str:
    """The family of one kernel by its own name or the op that launched it (launched_by[0]),
    else by the ops above that; on the CPU, of one op (launched_by: itself, then the ops
    above it)."""
    lower = name.lower()
    near = [lower] + [n.lower() for n in launched_by[:1]]
    for label, own, parent in FAMILIES:
        if re.search(own, lower) or (parent and any(re.search(parent, n) for n in near)):
            return label
    for label, _, parent in FAMILIES:
        if parent and any(re.search(parent, n.lower()) for n in launched_by[1:]):
            return label
    return "other"


def _launched_by(p: Profile) -> dict[int, list[str]]:
    """Each device op's launching op and that op's ancestors, by id(device op): through the
    trace's correlation ids where the event has them, else through the kernels the
    profiler lists under each op (by kernel name)."""
    cpu = [e for e in p.events if e.device_type == DeviceType.CPU]
    frontend = {e.id: e for e in cpu if getattr(e, "linked_correlation_id", 0) == 0}
    by_name: dict[str, list[str]] = {}
    for e in cpu:
        for kernel in getattr(e, "kernels", ()):
            by_name.setdefault(kernel.name, [e.name, *_ancestors(e)])
    chains = {}
    for op in p.device_ops():
        parent = frontend.get(getattr(op, "linked_correlation_id", None) or -1)
        chains[id(op)] = ([parent.name, *_ancestors(parent)] if parent is not None
                          else by_name.get(op.name, []))
    return chains


def device_time(p: Profile, top: int = 5) -> dict:
    """Seconds per call by family, and the `top` kernels (or CPU ops) by time per call.

    On a device: every kernel, copy and fill, by its own duration. On the CPU: the self
    time of every op (no op counted twice)."""
    by_family: dict[str, float] = defaultdict(float)
    by_name: Counter = Counter()
    counts: Counter = Counter()
    if p.on_device:
        chains = _launched_by(p)
        for op in p.device_ops():
            seconds = (op.time_range.end - op.time_range.start) / 1e6
            by_family[family(op.name, chains[id(op)])] += seconds
            by_name[op.name] += seconds
            counts[op.name] += 1
    else:
        for op in p.events:
            if (op.device_type != DeviceType.CPU or op.name == CALL
                    or getattr(op, "is_user_annotation", False)):
                continue
            seconds = op.self_cpu_time_total / 1e6
            by_family[family(op.name, [op.name, *_ancestors(op)])] += seconds
            by_name[op.name] += seconds
            counts[op.name] += 1
    per_call = lambda s: s / p.calls  # noqa: E731
    return {"families": {k: per_call(v) for k, v in sorted(by_family.items(),
                                                          key=lambda kv: -kv[1])},
            "top": [{"name": name, "seconds": per_call(s), "count": counts[name] / p.calls}
                    for name, s in by_name.most_common(top)],
            "total": per_call(sum(by_family.values()))}
