"""gpu_moe: one DeepSeekMoE layer on a GPU vs Megatron-Core's MoELayer, and the experts'
grouped GEMMs (issue 5).

(a) layer    forward + backward of plugins.moe.layer.DeepSeekMoE and of Megatron-Core's
             MoELayer from its local spec, side by side, EP = 1, the same routing options
             and weights, built as bench.moe's CPU comparison builds them. Megatron 0.19.2's
             local spec runs its experts as SequentialMLP (one GEMM per expert):
             LocalSpecProvider.grouped_mlp_modules ignores moe_grouped_gemm, and its only
             grouped-GEMM experts (TEGroupedMLP) need Transformer Engine.
(b) grouped  torch._grouped_mm as plugins.common.experts runs it (fc1, fc2 forward) in
             TFLOP/s next to one dense torch.mm of the same FLOPs, and the experts module's
             forward + backward, with tokens spread evenly over the experts.

`python -m bench gpu_moe` on a GPU; `--smoke` runs a tiny layer on the CPU in FP32.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from bench import device as dev
from bench import machine, timing
from bench.result import Result, Table

NAME = "gpu_moe"
LAYERS = {"A": "megaseek DeepSeekMoE (plugins.moe.layer)"}
MEGATRON = "Megatron-Core MoELayer, local spec (SequentialMLP), '{}' dispatcher"


@dataclass(frozen=True)
class Setup:
    hidden: int
    experts: int
    ffn: int  # each routed expert's intermediate size
    top_k: int
    groups: int
    group_top_k: int  # Megatron scores a group by its top top_k / group_top_k experts,
    # megaseek by its top 2: the same only when top_k / group_top_k == 2
    tokens: int
    dtype: torch.dtype
    dispatchers: tuple[str, ...]  # Megatron's, one layer each
    warmup: int
    reps: int


# DeepSeek-V3's expert shapes and 8/4/8 group routing, with 64 of its 256 experts.
FULL = Setup(hidden=7168, experts=64, ffn=2048, top_k=8, groups=8, group_top_k=4,
             tokens=4096, dtype=torch.bfloat16, dispatchers=("alltoall", "allgather"),
             warmup=3, reps=20)
SMOKE = Setup(hidden=256, experts=8, ffn=128, top_k=4, groups=4, group_top_k=2, tokens=256,
              dtype=torch.float32, dispatchers=("alltoall", "allgather"), warmup=1, reps=3)


def config(setup: Setup, dispatcher: str, device: torch.device):
    """bench.moe's routing configuration (sigmoid scores, expert bias, group top-k,
    scaling, no aux loss, no shared expert) at this benchmark's sizes and dtype."""
    from bench.moe import moe_config

    return dataclasses.replace(
        moe_config(dispatcher), hidden_size=setup.hidden, num_moe_experts=setup.experts,
        moe_ffn_hidden_size=setup.ffn, moe_router_topk=setup.top_k,
        moe_router_num_groups=setup.groups, moe_router_group_topk=setup.group_top_k,
        params_dtype=setup.dtype, bf16=setup.dtype == torch.bfloat16,
        # Router logits in FP32 from the (BF16) weights, as megaseek's router computes them,
        # so both layers choose the same experts.
        moe_router_dtype="fp32",
        use_cpu_initialization=device.type == "cpu", perform_initialization=False)


def build(setup: Setup, device: torch.device):
    """{"A": DeepSeekMoE, "B", "C", ...: Megatron MoELayer per dispatcher}, same weights,
    and the reasons any Megatron layer could not be built."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend

    from plugins.moe.layer import DeepSeekMoE, DeepSeekMoESubmodules

    spec = get_moe_module_spec_for_backend(LocalSpecProvider(), setup.experts)
    place = torch.device(device) if device.type == "cuda" else contextlib.nullcontext()
    layers, dropped = {}, {}
    with place:
        layers["A"] = DeepSeekMoE(config(setup, setup.dispatchers[0], device),
                                  DeepSeekMoESubmodules(spec.keywords["submodules"].shared_experts))
        random_weights(layers["A"], torch.Generator(device).manual_seed(7))
        for key, dispatcher in zip("BCDEFG", setup.dispatchers):
            try:
                layers[key] = spec(config=config(setup, dispatcher, device)).to(device)
                copy_weights(layers["A"], layers[key])
            except Exception as error:  # noqa: BLE001  (reported, the row is dropped)
                layers.pop(key, None)
                dropped[key] = dev.failure(error)
    return layers, dropped


def random_weights(ours, g: torch.Generator) -> None:
    """N(0, 1/fan_in) experts and router, bias ~ 0.1 N(0, 1), expert by expert (no FP32
    copy of the whole stack)."""
    with torch.no_grad():
        for stack in (ours.experts.weight1, ours.experts.weight2):
            for w in stack:
                w.copy_(torch.randn(w.shape, generator=g, device=w.device) / w.shape[1] ** 0.5)
        w = ours.router.weight
        w.copy_(torch.randn(w.shape, generator=g, device=w.device) / w.shape[1] ** 0.5)
        b = ours.router.e_score_correction_bias
        b.copy_(torch.randn(b.shape, generator=g, device=b.device) * 0.1)


def copy_weights(ours, megatron) -> None:
    """megaseek's weights into Megatron's layer (fc1 is [gate | up] in both)."""
    with torch.no_grad():
        for e, expert in enumerate(megatron.experts.local_experts):
            expert.linear_fc1.weight.copy_(ours.experts.weight1[e])
            expert.linear_fc2.weight.copy_(ours.experts.weight2[e])
        megatron.router.weight.copy_(ours.router.weight)
        megatron.router.expert_bias.copy_(ours.router.e_score_correction_bias)


def _rel(diff_max: torch.Tensor, ref_max: torch.Tensor) -> float:
    return (diff_max / ref_max).item()


def agreement(megatron, ours, x, grad, ref_out, ref_in_grad) -> dict[str, float]:
    """max |Megatron's - megaseek's| / max |megaseek's| for the output, the input grad and
    the weight grads (ours' grads from its last step); expert by expert, so no stacked or
    FP32 copy of a whole [E, 2F, H] gradient is made."""
    from bench.moe import fwd_bwd

    out, in_grad = fwd_bwd(megatron, x, grad)
    errors = {"output": _rel((out.float() - ref_out.float()).abs().max(),
                             ref_out.float().abs().max()),
              "input grad": _rel((in_grad.float() - ref_in_grad.float()).abs().max(),
                                 ref_in_grad.float().abs().max()),
              "router grad": _rel((megatron.router.weight.grad.float()
                                   - ours.router.weight.grad.float()).abs().max(),
                                  ours.router.weight.grad.float().abs().max())}
    experts = megatron.experts.local_experts
    for name, stack, linear in (("w1", ours.experts.weight1, "linear_fc1"),
                                ("w2", ours.experts.weight2, "linear_fc2")):
        diff = max((getattr(e, linear).weight.grad.float() - g.float()).abs().max()
                   for e, g in zip(experts, stack.grad))
        errors[f"{name} grad"] = _rel(diff, stack.grad.abs().max().float())
    return errors


def top_kernels(layer, x, grad, device, steps: int = 2, top: int = 5) -> str:
    """The ops with the most device time (CPU time on the CPU) per step: where time goes."""
    from torch.profiler import ProfilerActivity, profile

    from bench.moe import fwd_bwd

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fwd_bwd(layer, x, grad)
        timing.synchronize(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    return ", ".join(f"{e.key[:60]} {getattr(e, key) / steps / 1e3:.2f} ms ({e.count // steps}x)"
                     for e in ops[:top])


def expert_flops(setup: Setup) -> int:
    """FLOPs of the routed experts' GEMMs in one forward (SwiGLU fc1 is [2F, H])."""
    return 2 * setup.tokens * setup.top_k * 3 * setup.hidden * setup.ffn


def measure_layers(setup: Setup, device: torch.device) -> dict:
    from bench.moe import fwd_bwd

    g = torch.Generator(device).manual_seed(3)
    shape = (setup.tokens, 1, setup.hidden)  # [s, b, h]
    x = torch.randn(shape, generator=g, device=device).to(setup.dtype)
    grad = torch.randn(shape, generator=g, device=device).to(setup.dtype)
    layers, dropped = build(setup, device)
    ref_out, ref_in_grad = fwd_bwd(layers["A"], x, grad)
    errors = {k: agreement(layer, layers["A"], x, grad, ref_out, ref_in_grad)
              for k, layer in layers.items() if k != "A"}
    del ref_out, ref_in_grad
    calls = {k: (lambda i, layer=layer: fwd_bwd(layer, x, grad)) for k, layer in layers.items()}
    times = timing.interleaved(calls, setup.reps, setup.warmup, device)
    timing.log("MoE layer fwd+bwd", times)
    profiles = {}
    for key, layer in layers.items():
        try:
            profiles[key] = top_kernels(layer, x, grad, device)
        except Exception as error:  # noqa: BLE001
            profiles[key] = dev.failure(error)
    dispatcher = dict(zip("BCDEFG", setup.dispatchers))
    names = {k: LAYERS.get(k) or MEGATRON.format(dispatcher[k]) for k in [*layers, *dropped]}
    return {"times_s": times, "max_rel_error_vs_A": errors, "dropped": dropped,
            "names": names, "top_ops": profiles, "experts_path": experts_path(x)}


def experts_path(x: torch.Tensor) -> str:
    from plugins.common import experts

    grouped = getattr(experts, "_grouped_mm_available", None)
    if grouped is not None and grouped(x.reshape(-1, x.shape[-1])):
        return "torch._grouped_mm (one grouped GEMM per projection)"
    return "a loop over experts (torch._grouped_mm unavailable for this device/dtype)"


def measure_grouped(setup: Setup, device: torch.device) -> dict:
    """fc1 / fc2 grouped GEMMs at the layer's shapes with the tokens spread evenly."""
    from plugins.common.experts import LocalExperts

    rows = setup.tokens * setup.top_k
    counts = [rows // setup.experts] * setup.experts
    counts[-1] += rows - sum(counts)
    place = torch.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with place:
        experts = LocalExperts(config(setup, "alltoall", device), setup.experts, setup.hidden,
                               setup.ffn)
    g = torch.Generator(device).manual_seed(5)
    with torch.no_grad():
        for stack in (experts.weight1, experts.weight2):
            for w in stack:
                w.copy_(torch.randn(w.shape, generator=g, device=device) / w.shape[1] ** 0.5)
    x = torch.randn(rows, setup.hidden, generator=g, device=device).to(setup.dtype)
    h = torch.randn(rows, setup.ffn, generator=g, device=device).to(setup.dtype)
    dy = torch.randn(rows, setup.hidden, generator=g, device=device).to(setup.dtype)
    ends = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    w1, w2 = experts.weight1.detach(), experts.weight2.detach()
    x_grad = x.clone().requires_grad_()

    def fwd_bwd(i):
        out = experts(x_grad, counts)
        torch.autograd.grad(out, (x_grad, experts.weight1, experts.weight2), dy)

    fc1, fc2 = 2 * rows * setup.hidden * 2 * setup.ffn, 2 * rows * setup.ffn * setup.hidden
    cases = {
        "fc1 grouped": (lambda i: torch._grouped_mm(x, w1.transpose(1, 2), offs=ends), fc1),
        "fc1 dense, same FLOPs": (lambda i: torch.mm(x, w1[0].t()), fc1),
        "fc2 grouped": (lambda i: torch._grouped_mm(h, w2.transpose(1, 2), offs=ends), fc2),
        "fc2 dense, same FLOPs": (lambda i: torch.mm(h, w2[0].t()), fc2),
        "experts fwd+bwd (LocalExperts)": (fwd_bwd, 3 * (fc1 + fc2)),
    }
    times = timing.interleaved({k: c for k, (c, _) in cases.items()}, setup.reps,
                                 setup.warmup, device)
    timing.log("experts' GEMMs", times)
    return {"rows": rows, "tokens_per_expert": counts[0], "times_s": times,
            "flops": {k: f for k, (_, f) in cases.items()}}


def measure(device: torch.device, setup: Setup) -> dict:
    """Every number of the benchmark, JSON-able (times in seconds, errors as strings)."""
    sections = {}
    with dev.megatron_on(device):
        for key, fn in (("layer", measure_layers), ("grouped", measure_grouped)):
            with dev.failure_recorded(sections, key, device):  # the other still runs
                sections[key] = fn(setup, device)
    return {"device": machine.accelerator(device), "setup": {
        k: (str(v) if isinstance(v, torch.dtype) else v)
        for k, v in dataclasses.asdict(setup).items()}, **sections}


# --------------------------------------------------------------------------- tables


def _cell(times, base=None, flops=None) -> str:
    if isinstance(times, str):
        return f"failed: {times[:60]}"
    t = timing.median(times)
    q1, q3 = timing.quartiles(times)
    parts = [f"{t * 1e3:.2f} ms ({q1 * 1e3:.2f}–{q3 * 1e3:.2f})"]
    if flops:
        parts.append(f"{flops / t / 1e12:.3g} TFLOP/s")
    if base:
        parts.append(f"{t / base:.2f}x A's time")
    return ", ".join(parts)


def result(raw: dict) -> Result:
    s = raw["setup"]
    d = raw["device"]
    notes = [f"Device: {d.get('gpu', d['device'])}; CUDA {d.get('cuda (torch build)', '-')}, "
             f"driver {d.get('driver', '-')}, triton {d['triton']}.",
             f"One MoE layer: hidden {s['hidden']}, {s['experts']} routed experts of ffn "
             f"{s['ffn']} (SwiGLU), top-{s['top_k']} from {s['group_top_k']} of {s['groups']} "
             f"groups, sigmoid scores with expert bias, gates normalized and scaled by 2.5, "
             f"no aux loss, no shared expert, {s['tokens']} tokens, {s['dtype']}, one rank, "
             f"EP = 1; step = zero_grad + forward + backward; {s['warmup']} warm-up rounds, "
             f"then {s['reps']} interleaved rounds, median (p25–p75)."]
    tables = []
    layer = raw.get("layer")
    if isinstance(layer, dict):
        flops = 3 * expert_flops(_setup(s))
        base = timing.median(layer["times_s"].get("A"))
        rows = [[f"{k}: {layer['names'][k]}", _cell(t, base if k != "A" else None, flops)]
                for k, t in layer["times_s"].items()]
        rows += [[f"{k}: {layer['names'][k]}", f"dropped: {why}"]
                 for k, why in layer["dropped"].items()]
        tables.append(Table("(a) MoE layer forward + backward (TFLOP/s of the routed experts' "
                            "GEMMs, 3x the forward's)", ["layer", "median"], rows))
        notes.append(f"A's routed experts run as {layer['experts_path']}.")
        for k, errs in layer["max_rel_error_vs_A"].items():
            notes.append(f"{k} vs A, max |difference| / max |A's value|: " + ", ".join(
                f"{name} {v:.1e}" for name, v in errs.items()) + ".")
        notes.append("Most device time per step (torch.profiler, 2 steps): " + " | ".join(
            f"{k}: {v}" for k, v in layer["top_ops"].items()) + ".")
    elif layer is not None:
        notes.append(f"(a) failed: {layer}")
    grouped = raw.get("grouped")
    if isinstance(grouped, dict):
        rows = [[k, _cell(t, None, grouped["flops"][k])] for k, t in grouped["times_s"].items()]
        tables.append(Table(
            f"(b) Experts' GEMMs, {grouped['rows']} (token, expert) rows, "
            f"{grouped['tokens_per_expert']} per expert", ["GEMM", "median"], rows))
    elif grouped is not None:
        notes.append(f"(b) failed: {grouped}")
    return Result(NAME, [], notes, tables, raw=raw)


def _setup(fields: dict) -> Setup:
    return Setup(**{**fields, "dtype": getattr(torch, fields["dtype"].split(".")[-1])})


def run(smoke: bool = False) -> Result:
    """The registry's entry (which skips it without a GPU unless `smoke`): a one-GPU
    DeepSeek-V3 shape, or a tiny layer on whatever device there is."""
    return result(measure(dev.default_device(), SMOKE if smoke else FULL))
