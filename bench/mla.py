"""MLA benchmarks.

mla_saved_bytes  Bytes autograd keeps for backward in one megaseek MLA layer (MLA attention,
                 dense SwiGLU MLP, RMSNorms) per `--recompute-modules` choice.
mla_cpu_time     Forward + backward of megaseek's MLASelfAttention against Megatron-Core's.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import time
from collections import Counter
from dataclasses import dataclass

import integration  # noqa: F401  (first: makes megatron.training importable on 3.11)
import torch
import torch.nn.functional as F

from bench.single_rank import megatron_single_rank
from bench.result import Config, Result, Table
from bench.timing import interleaved

MiB = 2 ** 20
# DeepSeek-V3's attention and dense MLP (its first three layers), and all of it / 16
DEEPSEEK_V3 = dict(hidden_size=7168, num_attention_heads=128, q_lora_rank=1536,
                   kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128,
                   ffn_hidden_size=18432)
SCALED = {k: v // 16 for k, v in DEEPSEEK_V3.items()}
RECOMPUTE = {"none": [], "layernorm": ["layernorm"], "mla_up_proj": ["mla_up_proj"],
             "layernorm+mla_up_proj": ["layernorm", "mla_up_proj"]}
SCALED_SEQS = (128, 256)
FULL_SEQS = (64, 128, 256)  # short: the full layer is slow on CPU; extrapolated if linear
EXTRAPOLATE_TO = 4096
SAVED_BYTES_THREADS = 2     # a byte count, not a timing: use both cores
TIME_SEQ, TIME_BATCH, WARMUP, REPS = 256, 2, 5, 60
SMOKE_WARMUP, SMOKE_REPS = 1, 3


def describe(shape: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in shape.items())


def mla_config(shape: dict, dtype=torch.float32, **overrides):
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    return MLATransformerConfig(**{
        **shape, "num_layers": 1, "normalization": "RMSNorm", "layernorm_epsilon": 1e-6,
        "rope_type": "rope", "rotary_base": 10000, "attention_dropout": 0.0,
        "hidden_dropout": 0.0, "add_bias_linear": False, "gated_linear_unit": True,
        "activation_func": F.silu, "use_cpu_initialization": True, "params_dtype": dtype,
        "bf16": dtype == torch.bfloat16, **overrides})


def inputs(shape: dict, seq: int, batch: int, dtype, seed: int):
    """Input and output gradient, [seq, batch, hidden]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(seq, batch, shape["hidden_size"], generator=g).to(dtype) for _ in range(2)]


# ------------------------------------------------------------------- mla_saved_bytes

@dataclass(frozen=True)
class Saved:
    module: str   # innermost module running when autograd saved it
    shape: tuple  # of the first saved view of the storage
    dtype: torch.dtype
    nbytes: int   # of the whole storage

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.module} {list(self.shape)} {dtype} {self.nbytes / MiB:.2f} MiB"


def track_module_names(layer, stack: list[str]) -> list:
    """Hooks that keep stack[-1] the name of the innermost module running."""
    def enter(name):
        return lambda module, args: stack.append(name)

    def leave(module, args, output) -> None:  # None: the output stays as it is
        stack.pop()

    hooks = []
    for name, module in layer.named_modules():
        if name:  # "" is the layer itself
            hooks += [module.register_forward_pre_hook(enter(name)),
                      module.register_forward_hook(leave)]
    return hooks


def saved_for_backward(layer, x, grad) -> tuple[list[Saved], torch.Tensor]:
    """Forward + backward; the storages autograd kept as SelectiveRecompute's ledger sees
    them (in saving order; parameters and recomputed outputs excluded), and the input grad."""
    from plugins.mla.recompute import SelectiveRecompute

    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    kept: dict[int, Saved] = {}
    stack = ["layer"]

    def ledger(t: torch.Tensor, recomputed: bool) -> None:
        ptr = t.untyped_storage().data_ptr()
        if not recomputed and ptr not in params and ptr not in kept:
            kept[ptr] = Saved(stack[-1], tuple(t.shape), t.dtype, t.untyped_storage().nbytes())

    # Without recompute the layer has no SelectiveRecompute: enter an empty one for its ledger.
    counting = layer.selective_recompute or SelectiveRecompute()
    outer = contextlib.nullcontext() if layer.selective_recompute else counting
    counting.ledger, hooks = ledger, track_module_names(layer, stack)
    inp = x.clone().requires_grad_()
    try:
        with outer:
            out, _ = layer(inp, attention_mask=None)
        out.backward(grad)
    finally:
        counting.ledger = None
        for hook in hooks:
            hook.remove()
    return list(kept.values()), inp.grad


def measure(shape: dict, dtype, seqs, seed: int) -> dict:
    """{option: {seq: (saved storages, input grad)}}, every option on the same weights."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from plugins.mla.spec import with_mla

    data = {s: inputs(shape, s, 1, dtype, seed) for s in seqs}
    spec = with_mla(get_gpt_layer_local_spec(normalization="RMSNorm"))
    results, weights = {}, None
    for option, names in RECOMPUTE.items():
        recompute = dict(recompute_granularity="selective", recompute_modules=names)
        config = mla_config(shape, dtype, perform_initialization=weights is None,
                            **(recompute if names else {}))
        layer = build_module(spec, config=config, layer_number=1)
        if weights is None:
            weights = {k: v.clone() if isinstance(v, torch.Tensor) else v
                       for k, v in layer.state_dict().items()}
        layer.load_state_dict(weights)
        results[option] = {s: saved_for_backward(layer, *data[s]) for s in seqs}
        del layer
        gc.collect()  # one full-size layer alive at a time
    return results


def total(saved: list[Saved]) -> int:
    return sum(s.nbytes for s in saved)


def not_linear(by_seq: dict) -> list[str]:
    """Storages that did not grow in proportion to the sequence length from one measured
    length to the next (matched by saving order)."""
    seqs, problems = sorted(by_seq), []
    for s0, s1 in zip(seqs, seqs[1:]):
        a, b = by_seq[s0][0], by_seq[s1][0]
        if [x.module for x in a] != [y.module for y in b]:
            problems.append(f"seq {s0} to {s1}: {len(a)} vs {len(b)} storages, unmatched")
            continue
        problems += [f"{x.describe()} grew x{y.nbytes / x.nbytes:.3g} from seq {s0} to {s1}"
                     for x, y in zip(a, b) if y.nbytes * s0 != x.nbytes * s1]
    return problems


def saved_table(title: str, results: dict) -> Table:
    seqs = sorted(results["none"])
    s_max, k = seqs[-1], EXTRAPOLATE_TO // seqs[-1]
    none = total(results["none"][s_max][0])
    rows = []
    for option, by_seq in results.items():
        nbytes = {s: total(saved) for s, (saved, _) in by_seq.items()}
        equal = all(torch.equal(dx, results["none"][s][1]) for s, (_, dx) in by_seq.items())
        at_k = "not linear" if not_linear(by_seq) else f"{nbytes[s_max] * k / 2 ** 30:.3f}"
        rows.append([option, *(f"{nbytes[s] / MiB:.2f}" for s in seqs),
                     f"{nbytes[s_max] / none:.3f}", at_k, "yes" if equal else "NO"])
    return Table(title, ["recompute", *(f"MiB @ seq {s}" for s in seqs),
                         f"ratio to none @ {s_max}", f"GiB @ {EXTRAPOLATE_TO} (x{k}, if linear)",
                         "input grad bit-equal to none's"], rows,
                 right=frozenset(range(1, len(seqs) + 3)))


def linearity_note(label: str, results: dict) -> str:
    bad = [f"{o}: " + "; ".join(not_linear(r)) for o, r in results.items() if not_linear(r)]
    if bad:
        return f"{label} linearity, measured: NOT linear, not extrapolated: " + " | ".join(bad)
    seqs = sorted(results["none"])
    steps = " and ".join(f"{a} to {b} (x{b / a:g})" for a, b in zip(seqs, seqs[1:]))
    return (f"{label} linearity, measured: every saved storage of every option grew exactly "
            f"as s did, from seq {steps}: linear in s, so the GiB @ {EXTRAPOLATE_TO} column "
            f"is the seq-{seqs[-1]} bytes x {EXTRAPOLATE_TO // seqs[-1]}.")


def dropped_note(label: str, results: dict) -> str:
    """What each option saves less than 'none' at the longest sequence (same module,
    shape, dtype and size), largest first."""
    s_max, parts = max(results["none"]), []
    for option in list(RECOMPUTE)[1:]:
        gone = Counter(results["none"][s_max][0]) - Counter(results[option][s_max][0])
        gone = sorted(gone.elements(), key=lambda s: -s.nbytes)
        parts.append(f"{option}: {total(gone) / MiB:.2f} MiB in {len(gone)} storages ("
                     + "; ".join(s.describe() for s in gone[:3])
                     + ("; ..." if len(gone) > 3 else "") + ")")
    return f"{label} seq {s_max}, what each option stops saving: " + " | ".join(parts) + "."


def run_saved_bytes(smoke: bool = False) -> Result:
    # label: (table title, shape, dtype, sequence lengths, seed)
    cases = {"(a)": (f"(a) DeepSeek-V3 / 16 ({describe(SCALED)}), batch 1, fp32",
                     SCALED, torch.float32, SCALED_SEQS, 1)}
    if not smoke:  # the full layer takes most of the wall time
        cases["(b)"] = (f"(b) DeepSeek-V3 layer ({describe(DEEPSEEK_V3)}), batch 1, bf16",
                        DEEPSEEK_V3, torch.bfloat16, FULL_SEQS, 2)
    start, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(SAVED_BYTES_THREADS)
    try:
        with megatron_single_rank():
            measured = {label: measure(shape, dtype, seqs, seed=seed)
                        for label, (_, shape, dtype, seqs, seed) in cases.items()}
    finally:
        torch.set_num_threads(threads)
    return Result("mla_saved_bytes", [], [
        "Saved bytes: unique storages of the tensors autograd saves inside the layer "
        "(SelectiveRecompute's ledger sees each), parameters and recomputed outputs "
        "excluded, as tests/plugins/mla/test_attention.py counts them; each labelled by the "
        "innermost module running when it was saved. Every option runs on the same weights "
        "and inputs.",
        "Layer: plugins.mla.spec.with_mla(get_gpt_layer_local_spec(normalization='RMSNorm'))"
        ", no biases, dropout 0, plain RoPE, TP = 1.",
        *(linearity_note(label, results) for label, results in measured.items()),
        *(dropped_note(label, results) for label, results in measured.items()),
        f"Wall time {time.perf_counter() - start:.0f} s on {SAVED_BYTES_THREADS} torch threads.",
    ], [saved_table(cases[label][0], results) for label, results in measured.items()])


# ---------------------------------------------------------------------- mla_cpu_time

def core_attentions():
    """(B's, C's) core attention for Megatron's MLASelfAttention (classes made here:
    Megatron is imported only after integration's fixes)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.module import MegatronModule

    class KVChannelsDotProductAttention(DotProductAttention):
        """The minimal fix: Megatron's local DotProductAttention, also taking MLA's
        k_channels/v_channels (None by default: Attention.__init__ first builds it without)."""

        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)
            if k_channels is not None:  # only feeds a default softmax scale MLA overrides
                self.hidden_size_per_attention_head = k_channels
            if v_channels is not None:  # the context's final view: [s, b, heads x v]
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    class SDPACoreAttention(MegatronModule):
        """Causal F.scaled_dot_product_attention: [s, b, n, d] in, [s, b, n * v] out."""

        def __init__(self, config, *args, softmax_scale=None, **unused):
            super().__init__(config=config)
            self.softmax_scale = softmax_scale

        def forward(self, query, key, value, attention_mask, **unused):
            assert attention_mask is None  # causal by is_causal
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
            return out.permute(2, 0, 1, 3).flatten(2)

    return KVChannelsDotProductAttention, SDPACoreAttention


def build_attention(config, core_attention=None):
    """megaseek's MLASelfAttention, or Megatron's (local spec) with this core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from plugins.mla.spec import mla_attention_spec

    spec = mla_attention_spec()
    if core_attention is not None:
        spec = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True,
                                        normalization="RMSNorm").submodules.self_attention
        spec.submodules.core_attention = core_attention
    return build_module(spec, config=config, layer_number=1)


def random_weights(module, seed: int) -> dict[str, torch.Tensor]:
    """N(0, 1/fan_in) linears and 1 + 0.1 N(0, 1) norms, so activations are O(1)."""
    g = torch.Generator().manual_seed(seed)
    return {name: 1 + 0.1 * torch.randn(p.shape, generator=g) if p.dim() == 1
            else torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
            for name, p in module.named_parameters()}


def fwd_bwd(module, x, grad):
    inp = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out, _ = module(inp, attention_mask=None)
    out.backward(grad)
    return out.detach(), inp.grad, {n: p.grad for n, p in module.named_parameters()}


def attention_nodes(module, x) -> str:
    """The softmax/attention nodes in the module's autograd graph: which kernel ran."""
    names, seen, todo = set(), set(), [module(x, attention_mask=None)[0].grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            name = type(node).__name__
            if "Attention" in name or "Softmax" in name:
                names.add(name)
            todo += [n for n, _ in node.next_functions]
    return ", ".join(sorted(names))


def compare(name: str, got, ref) -> str:
    """got's output, input grad and weight grads against ref's (A's)."""
    pairs = [("output", got[0], ref[0]), ("input grad", got[1], ref[1])]
    pairs += [(k, g, ref[2][k]) for k, g in got[2].items()]
    rel = {what: ((a - b).abs().max() / b.abs().max()).item() for what, a, b in pairs}
    worst = max(rel, key=rel.get)
    return (f"{name} vs A, max |difference| / max |A's value|: output {rel['output']:.1e}, "
            f"input grad {rel['input grad']:.1e}, worst of all {worst} {rel[worst]:.1e}: "
            + ("equal up to fp32 rounding." if rel[worst] < 1e-5 else "NOT EQUAL."))


def run_cpu_time(smoke: bool = False) -> Result:
    from plugins.mla.convert import from_interleaved_rope

    x, grad = inputs(SCALED, TIME_SEQ, TIME_BATCH, torch.float32, seed=3)
    with megatron_single_rank():
        fixed_dpa, sdpa = core_attentions()
        config = mla_config(SCALED, qk_layernorm=True)  # else Megatron's latent norms are Identity
        modules = {"A": build_attention(config), "B": build_attention(config, fixed_dpa),
                   "C": build_attention(config, sdpa)}
        # Megatron rotates RoPE pairs (x_2i, x_2i+1), megaseek (x_i, x_i+d/2).
        to_ours = functools.partial(from_interleaved_rope, heads=SCALED["num_attention_heads"],
                                    qk_head_dim=SCALED["qk_head_dim"],
                                    rope_dim=SCALED["qk_pos_emb_head_dim"])
        weights = random_weights(modules["B"], seed=7)
        for name, module in modules.items():
            missing, unexpected = module.load_state_dict(
                to_ours(weights) if name == "A" else weights, strict=False)
            assert not unexpected and all(k.endswith("._extra_state") for k in missing)

        ref = fwd_bwd(modules["A"], x, grad)
        checks = []
        for name in "BC":
            out, dx, grads = fwd_bwd(modules[name], x, grad)
            checks.append(compare(name, (out, dx, to_ours(grads)), ref))
        kernels = "; ".join(f"{n}: {attention_nodes(m, x)}" for n, m in modules.items())
        warmup, reps = (SMOKE_WARMUP, SMOKE_REPS) if smoke else (WARMUP, REPS)
        times = interleaved({n: (lambda i, m=m: fwd_bwd(m, x, grad)) for n, m in modules.items()},
                            reps=reps, warmup=warmup)

    return Result("mla_cpu_time", [
        Config("A", "megaseek MLASelfAttention (plugins.mla)", times["A"]),
        Config("B", "Megatron-Core MLASelfAttention + minimal fix "
                    "(KVChannelsDotProductAttention)", times["B"]),
        Config("C", "Megatron-Core MLASelfAttention + SDPA core attention", times["C"]),
    ], [
        f"Attention module only, DeepSeek-V3 / 16 ({describe(SCALED)}), seq {TIME_SEQ}, batch "
        f"{TIME_BATCH}, fp32, plain RoPE, causal, dropout 0, TP = 1; step = zero_grad + "
        f"forward + backward; {warmup} warm-up rounds, then {reps} interleaved rounds.",
        "Megatron-Core 0.19.2's MLASelfAttention does not build with its local spec: "
        "MultiLatentAttention.__init__ passes k_channels and v_channels to the core attention "
        "and the local DotProductAttention.__init__ takes neither (TypeError). B's minimal "
        "fix, a subclass in the spec's core_attention slot, accepts them and sets "
        "hidden_size_per_partition = v_channels x heads (the context's final view); its "
        "forward is unchanged. C puts F.scaled_dot_product_attention in that slot instead. "
        "Megatron's module also needs qk_layernorm=True and megaseek's CPU fixes.",
        "Same random weights for all; A's RoPE rows are permuted by plugins.mla.convert."
        "from_interleaved_rope, and B's and C's weight grads alike before comparing.",
        *checks,
        f"Softmax/attention autograd nodes in each forward: {kernels}.",
    ])
