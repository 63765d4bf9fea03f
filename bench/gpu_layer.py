"""gpu_layer: one DeepSeek-V3-shaped decoder layer (MLA + MoE) on one GPU, FP8 against
BF16, and both against the same layer with Megatron-Core's MoELayer (issue 22).

The layer is megaseek's, built from Megatron's local layer spec as the plugins build it
(`plugins.mla.spec.with_mla`, `plugins.moe.spec.with_deepseek_moe`, and for FP8
`plugins.fp8.spec.with_fp8_linears` with the FP8 SwiGLU), one rank, EP = TP = 1:
  A   MLA + DeepSeekMoE (routed experts as one grouped GEMM per projection), BF16;
  B   A with every linear and the experts in FP8, W held (`--fp8-cache-weights`: the
      weights quantized once per step, here before timing: every micro-batch but a step's
      first);
  B1  B with the weight cache dropped before each step (one micro-batch per step: W and W^T
      quantized in it);
  C   MLA + Megatron-Core's MoELayer (local spec: SequentialMLP, one GEMM per expert), BF16:
      gpu_moe's comparison inside the whole layer.
All share one set of weights (B's parameters are A's; C's experts are views of A's
stacks). Step = zero_grad + forward + backward of the layer on [tokens, 1, hidden].
Where the time goes: torch.profiler's kernels per step, by family (bench.profiling).

`python -m bench gpu_layer` on a GPU; `--smoke` builds a tiny layer on the CPU (FP32, the
`emulated` FP8 backend; there torch's CPU grouped GEMM reads its offsets on the host, which
the host-wait column counts and a GPU does not do).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench import device as dev
from bench import fp8_calls, machine, profiling, timing
from bench.result import Result, Table

NAME = "gpu_layer"
SCALING = 2.5  # DeepSeek-V3's routed scaling factor (as bench.moe's comparison)


@dataclass(frozen=True)
class Setup:
    hidden: int
    heads: int
    q_lora: int
    kv_lora: int
    qk_head: int
    rope_head: int
    v_head: int
    experts: int
    ffn: int  # each routed expert's intermediate size
    shared_ffn: int  # the shared expert's
    top_k: int
    groups: int
    group_top_k: int
    tokens: int
    dtype: torch.dtype
    warmup: int
    reps: int
    profile_steps: int


# DeepSeek-V3's layer with 64 of its 256 routed experts (one GPU's memory): hidden 7168,
# 128 heads, q_lora 1536, kv_lora 512, heads of 128 + 64 (RoPE), v 128; experts of ffn 2048,
# top-8 from 4 of 8 groups, one shared expert; 4096 tokens.
FULL = Setup(hidden=7168, heads=128, q_lora=1536, kv_lora=512, qk_head=128, rope_head=64,
             v_head=128, experts=64, ffn=2048, shared_ffn=2048, top_k=8, groups=8,
             group_top_k=4, tokens=4096, dtype=torch.bfloat16, warmup=3, reps=12,
             profile_steps=1)
SMOKE = Setup(hidden=256, heads=4, q_lora=128, kv_lora=128, qk_head=32, rope_head=16,
              v_head=32, experts=8, ffn=128, shared_ffn=128, top_k=4, groups=4,
              group_top_k=2, tokens=256, dtype=torch.float32, warmup=1, reps=3,
              profile_steps=1)

LAYERS = {
    "A": "megaseek MLA + DeepSeekMoE, BF16",
    "B": "A in FP8 (`{backend}` backend), W held (quantized once per step)",
    "B1": "A in FP8, W quantized in the step (one micro-batch per step)",
    "C": "MLA + Megatron-Core MoELayer (local spec, SequentialMLP, 'alltoall'), BF16",
}


def config(setup: Setup, device: torch.device, fp8: bool):
    """DeepSeek-V3's attention and routing (sigmoid scores with expert bias, group top-k,
    gates normalized and scaled, no aux loss) at this benchmark's sizes. Router logits in
    FP32, as megaseek's router computes them, so both MoE layers choose the same experts.
    FP8: the MLPs call their activation module (the FP8 SwiGLU), as the fp8 plugin sets."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    return MLATransformerConfig(
        num_layers=1, hidden_size=setup.hidden, num_attention_heads=setup.heads,
        ffn_hidden_size=setup.shared_ffn, q_lora_rank=setup.q_lora,
        kv_lora_rank=setup.kv_lora, qk_head_dim=setup.qk_head,
        qk_pos_emb_head_dim=setup.rope_head, v_head_dim=setup.v_head,
        normalization="RMSNorm", layernorm_epsilon=1e-6, rope_type="rope",
        rotary_base=10000, attention_dropout=0.0, hidden_dropout=0.0,
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        num_moe_experts=setup.experts, moe_ffn_hidden_size=setup.ffn,
        moe_shared_expert_intermediate_size=setup.shared_ffn,
        moe_router_topk=setup.top_k, moe_router_num_groups=setup.groups,
        moe_router_group_topk=setup.group_top_k, moe_router_topk_scaling_factor=SCALING,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_load_balancing_type="none", moe_token_dispatcher_type="alltoall",
        moe_router_dtype="fp32", use_te_activation_func=fp8,
        params_dtype=setup.dtype, bf16=setup.dtype == torch.bfloat16,
        use_cpu_initialization=device.type == "cpu", perform_initialization=False)


def layer_specs(setup: Setup, backend: str) -> dict:
    """{"A", "B", "C"}: the three layers' specs (B1 is B's layer)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from plugins.fp8.spec import with_fp8_linears
    from plugins.mla.spec import with_mla
    from plugins.moe.plugin import MoEPluginConfig
    from plugins.moe.spec import with_deepseek_moe

    megatron = with_mla(get_gpt_layer_local_spec(num_experts=setup.experts,
                                                 moe_grouped_gemm=False,
                                                 normalization="RMSNorm"))
    ours = with_deepseek_moe(megatron, MoEPluginConfig())
    return {"A": ours, "B": with_fp8_linears(ours, backend, swiglu=True, cache_weights=True),
            "C": megatron}


def random_weights(layer, g: torch.Generator) -> None:
    """N(0, 1/fan_in) matrices (expert by expert for stacks: no FP32 copy of a whole
    stack), 1 + 0.1 N(0, 1) norm weights, router bias 0.1 N(0, 1)."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dim() == 1:
                scale, offset = (0.1, 0.0) if "bias" in name else (0.1, 1.0)
                p.copy_(offset + scale * torch.randn(p.shape, generator=g, device=p.device))
                continue
            for w in (p if p.dim() == 3 else [p]):
                w.copy_(torch.randn(w.shape, generator=g, device=w.device) / w.shape[-1] ** 0.5)
        bias = layer.mlp.router.e_score_correction_bias
        bias.copy_(0.1 * torch.randn(bias.shape, generator=g, device=bias.device))


def _set(module: torch.nn.Module, dotted: str, value) -> None:
    *path, leaf = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    setattr(module, leaf, value)


def share_weights(ours, fp8, megatron) -> None:
    """fp8's parameters and buffers (the router's expert bias) become ours' (the same
    tensors); megatron's attention, norms, router and shared expert too, its experts views
    of ours' stacks (Megatron's fc1 is [gate | up] as ours), its expert bias a copy."""
    mine = dict(ours.named_parameters())
    for own, other in ((mine, dict(fp8.named_parameters())),
                       (dict(ours.named_buffers()), dict(fp8.named_buffers()))):
        if set(other) != set(own):
            raise RuntimeError(f"the FP8 layer's tensors differ: {sorted(set(other) ^ set(own))}")
        for name, t in own.items():
            _set(fp8, name, t)
    for name, _ in list(megatron.named_parameters()):
        if name in mine:
            _set(megatron, name, mine[name])
    experts = ours.mlp.experts
    for e, expert in enumerate(megatron.mlp.experts.local_experts):
        expert.linear_fc1.weight = torch.nn.Parameter(experts.weight1.data[e])
        expert.linear_fc2.weight = torch.nn.Parameter(experts.weight2.data[e])
    with torch.no_grad():
        megatron.mlp.router.expert_bias.copy_(ours.mlp.router.e_score_correction_bias)


def build(setup: Setup, device: torch.device, backend: str) -> dict:
    from megatron.core.transformer.spec_utils import build_module

    specs = layer_specs(setup, backend)
    place = torch.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with place:
        layers = {key: build_module(spec, config=config(setup, device, key == "B"),
                                    layer_number=1) for key, spec in specs.items()}
    random_weights(layers["A"], torch.Generator(device).manual_seed(7))
    share_weights(layers["A"], layers["B"], layers["C"])
    dev.free(device)  # the replaced weights
    return {key: layer.train() for key, layer in layers.items()}


def step(layer, x: torch.Tensor, grad: torch.Tensor, drop_fp8_weights: bool = False):
    """zero_grad + forward + backward: (output, input grad)."""
    from plugins.fp8.weight_cache import drop_fp8_weights as drop

    if drop_fp8_weights:  # a new step: the optimizer changed the weights
        drop([layer])
    layer.zero_grad(set_to_none=True)
    inp = x.detach().requires_grad_()
    out, _ = layer(inp, attention_mask=None)
    out.backward(grad)
    return out.detach(), inp.grad


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref||: a token routed to other experts moves the largest difference
    far more than the whole."""
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def agreement(layers: dict, x: torch.Tensor, grad: torch.Tensor) -> dict:
    """B's and C's output and input grad against A's (same weights and inputs), one step
    each: {layer: {what: ||difference|| / ||A's||}}, or the error a step raised."""
    ref = step(layers["A"], x, grad)
    errors = {}
    for key in ("B", "C"):
        try:
            got = step(layers[key], x, grad)
            errors[key] = {what: _rel(a, r) for what, a, r in zip(("output", "input grad"),
                                                                   got, ref)}
        except Exception as error:  # noqa: BLE001  (the timing says so too)
            errors[key] = dev.failure(error)
    return errors


def measure_layer(setup: Setup, device: torch.device) -> dict:
    backend = fp8_calls.backend()
    g = torch.Generator(device).manual_seed(3)
    shape = (setup.tokens, 1, setup.hidden)  # [s, b, h]
    x = torch.randn(shape, generator=g, device=device).to(setup.dtype)
    grad = torch.randn(shape, generator=g, device=device).to(setup.dtype)
    layers = build(setup, device, backend)
    calls = {"A": lambda i: step(layers["A"], x, grad),
             "B": lambda i: step(layers["B"], x, grad),
             "B1": lambda i: step(layers["B"], x, grad, drop_fp8_weights=True),
             "C": lambda i: step(layers["C"], x, grad)}
    errors = agreement(layers, x, grad)  # B's first step fills its FP8 weight cache
    times = timing.interleaved(calls, setup.reps, setup.warmup, device)
    timing.log("decoder layer step", times)
    profiles = {}
    for key, call in calls.items():
        if isinstance(times[key], str):
            continue
        try:
            p = profiling.profiled(lambda call=call: call(0), device, setup.profile_steps)
            profiles[key] = {**profiling.device_time(p), "launches": profiling.launches(p),
                             "host_waits": profiling.host_waits(p)}
        except Exception as error:  # noqa: BLE001
            profiles[key] = dev.failure(error)
    memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
    return {"backend": backend, "times_s": times, "max_rel_error_vs_A": errors,
            "profiles": profiles, "max_memory_allocated": memory,
            "names": {k: v.format(backend=backend) for k, v in LAYERS.items()}}


def measure(device: torch.device, setup: Setup) -> dict:
    """Every number of the benchmark, JSON-able (times in seconds, errors as strings)."""
    sections = {}
    with dev.megatron_on(device):
        with dev.failure_recorded(sections, "layer", device):
            sections["layer"] = measure_layer(setup, device)
    return {"device": machine.accelerator(device), "setup": {
        k: (str(v) if isinstance(v, torch.dtype) else v)
        for k, v in dataclasses.asdict(setup).items()}, **sections}


# --------------------------------------------------------------------------- tables


def _cell(times, base=None) -> str:
    if isinstance(times, str):
        return f"failed: {times[:60]}"
    t = timing.median(times)
    q1, q3 = timing.quartiles(times)
    cell = f"{t * 1e3:.2f} ms ({q1 * 1e3:.2f}–{q3 * 1e3:.2f})"
    return cell + (f", {base / t:.2f}x" if base else "")


def _launches(count) -> str:
    if count is None:
        return "- (no device)"
    return f"{count['total']}" if isinstance(count, dict) else "-"


def result(raw: dict) -> Result:
    s, d = raw["setup"], raw["device"]
    notes = [f"Device: {d.get('gpu', d['device'])}; CUDA {d.get('cuda (torch build)', '-')}, "
             f"driver {d.get('driver', '-')}, triton {d['triton']}.",
             f"One decoder layer: hidden {s['hidden']}, MLA with {s['heads']} heads (q_lora "
             f"{s['q_lora']}, kv_lora {s['kv_lora']}, head {s['qk_head']} + {s['rope_head']} "
             f"RoPE, v {s['v_head']}), {s['experts']} routed experts of ffn {s['ffn']} "
             f"(SwiGLU), top-{s['top_k']} from {s['group_top_k']} of {s['groups']} groups, one "
             f"shared expert of ffn {s['shared_ffn']}, RMSNorm; {s['tokens']} tokens, batch 1, "
             f"{s['dtype']}, one rank, EP = TP = 1. Step = zero_grad + forward + backward; "
             f"{s['warmup']} warm-up rounds, then {s['reps']} interleaved rounds, median "
             "(p25–p75)."]
    tables = []
    layer = raw.get("layer")
    if not isinstance(layer, dict):
        notes.append(f"failed: {layer}")
        return Result(NAME, [], notes, tables, raw=raw)
    times, names = layer["times_s"], layer["names"]
    rows = []
    for key, label in names.items():
        if key not in times:
            continue
        t = times[key]
        ratios = []
        for base in ("A", "C"):
            bt, kt = timing.median(times.get(base)), timing.median(t)
            if base != key and bt and kt:
                ratios.append(f"{bt / kt:.2f}x {base}'s speed")
        prof = layer["profiles"].get(key)
        rows.append([f"{key}: {label}", _cell(t), ", ".join(ratios) or "-",
                     _launches(prof.get("launches")) if isinstance(prof, dict) else "-",
                     str(prof.get("host_waits", "-")) if isinstance(prof, dict) else "-"])
    a, b, b1, c = (timing.median(times.get(k)) for k in ("A", "B", "B1", "C"))
    if a and b and b1:
        notes.append(f"FP8 (B) against BF16 (A): {a / b:.2f}x A's speed with W held, "
                     f"{a / b1:.2f}x with the step's W quantization in it (B1).")
    if a and b and c:
        notes.append(f"Against the layer with Megatron-Core's MoELayer in BF16 (C): A "
                     f"{c / a:.2f}x, B {c / b:.2f}x C's speed.")
    tables.append(Table("(a) Decoder layer step (forward + backward): median, speed relative "
                        "to A and to C", ["layer", "median", "speed", "launches per step",
                                          "host waits per step"], rows))
    families = sorted({f for p in layer["profiles"].values() if isinstance(p, dict)
                       for f in p["families"]},
                      key=lambda f: -max(p["families"].get(f, 0)
                                         for p in layer["profiles"].values()
                                         if isinstance(p, dict)))
    shown = [k for k, p in layer["profiles"].items() if isinstance(p, dict)]
    if shown:
        frows = []
        for f in families:
            frow = [f]
            for k in shown:
                p = layer["profiles"][k]
                sec = p["families"].get(f, 0.0)
                frow.append(f"{sec * 1e3:.2f} ms ({sec / p['total']:.0%})" if p["total"]
                            else "-")
            frows.append(frow)
        frows.append(["total"] + [f"{layer['profiles'][k]['total'] * 1e3:.2f} ms"
                                  for k in shown])
        tables.append(Table("(b) Where the time goes: device time per step by kernel family "
                            "(torch.profiler; on the CPU, op self time)",
                            ["family", *shown], frows))
        for k in shown:
            top = layer["profiles"][k]["top"]
            notes.append(f"{k}'s longest kernels per step: " + "; ".join(
                f"{t['name'][:70]} {t['seconds'] * 1e3:.2f} ms ({t['count']:g}x)" for t in top)
                + ".")
    for k, why in layer["profiles"].items():
        if isinstance(why, str):
            notes.append(f"{k} not profiled: {why}")
    for k, errs in layer["max_rel_error_vs_A"].items():
        notes.append(f"{k} vs A, ||difference|| / ||A's value||: " + (
            ", ".join(f"{n} {v:.1e}" for n, v in errs.items()) if isinstance(errs, dict)
            else f"failed: {errs}") + ".")
    if layer.get("max_memory_allocated"):
        notes.append(f"Peak GPU memory allocated: {layer['max_memory_allocated'] / 2**30:.1f} "
                     "GiB (all layers, one set of weights).")
    notes.append("B's families: FP8 GEMM and FP8 quantization are its FP8 work; launches "
                 "count kernels, copies and fills queued per step.")
    return Result(NAME, [], notes, tables, raw=raw)


def run(smoke: bool = False) -> Result:
    """The registry's entry (which skips it without a GPU unless `smoke`): DeepSeek-V3's
    layer on one GPU, or a tiny one on whatever device there is."""
    return result(measure(dev.default_device(), SMOKE if smoke else FULL))
