"""MLA benchmarks: activation memory of selective recompute, and CPU time against Megatron.

mla_saved_bytes  Bytes autograd keeps for backward in one megaseek MLA layer (MLA attention,
                 dense SwiGLU MLP, RMSNorms) per `--recompute-modules` choice.
mla_cpu_time     Forward + backward of megaseek's MLASelfAttention against Megatron-Core's
                 on the same weights.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass

import integration  # noqa: F401  (first: makes megatron.training importable on 3.11)
import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench.report import Config, Result, Table
from bench.timing import interleaved
from integration import cpu

MiB = 2 ** 20


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_head_dim: int          # no-RoPE part per head
    qk_pos_emb_head_dim: int  # RoPE part per head
    v_head_dim: int
    ffn: int                  # dense SwiGLU MLP width

    def describe(self) -> str:
        return (f"hidden {self.hidden}, {self.heads} heads, q_lora {self.q_lora_rank}, "
                f"kv_lora {self.kv_lora_rank}, qk {self.qk_head_dim} + rope "
                f"{self.qk_pos_emb_head_dim}, v {self.v_head_dim}, ffn {self.ffn}")


# DeepSeek-V3's attention and dense (first three layers) MLP, and the same divided by 16
DEEPSEEK_V3 = Shape(7168, 128, 1536, 512, 128, 64, 128, 18432)
SCALED = Shape(448, 8, 96, 32, 8, 4, 8, 18432 // 16)

RECOMPUTE = {"none": [], "layernorm": ["layernorm"], "mla_up_proj": ["mla_up_proj"],
             "layernorm+mla_up_proj": ["layernorm", "mla_up_proj"]}
SCALED_SEQ = 256
FULL_SEQS = (64, 128, 256)  # short: the full layer is slow on CPU; extrapolated below
EXTRAPOLATE_TO = 4096
SAVED_BYTES_THREADS = 2     # a memory count, not a timing: use both cores
TIME_SEQ, TIME_BATCH, WARMUP, REPS = 256, 2, 5, 60


@contextlib.contextmanager
def megatron_single_rank(seed: int = 1234):
    """One gloo rank, Megatron's model-parallel state (TP = PP = 1) and megaseek's CPU
    fixes, all undone on exit."""
    from megatron.core import parallel_state, tensor_parallel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    fixes = None
    try:
        fixes = cpu.install(force=True)
        parallel_state.initialize_model_parallel(1, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        with warnings.catch_warnings():  # "TE/Apex not installed" and deprecations
            warnings.simplefilter("ignore")
            yield
    finally:
        parallel_state.destroy_model_parallel()
        if fixes is not None:
            fixes.undo()
        dist.destroy_process_group()


def mla_config(shape: Shape, dtype: torch.dtype = torch.float32, **overrides):
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    return MLATransformerConfig(**{**dict(
        num_layers=1, hidden_size=shape.hidden, num_attention_heads=shape.heads,
        ffn_hidden_size=shape.ffn, q_lora_rank=shape.q_lora_rank,
        kv_lora_rank=shape.kv_lora_rank, qk_head_dim=shape.qk_head_dim,
        qk_pos_emb_head_dim=shape.qk_pos_emb_head_dim, v_head_dim=shape.v_head_dim,
        normalization="RMSNorm", layernorm_epsilon=1e-6, rope_type="rope", rotary_base=10000,
        attention_dropout=0.0, hidden_dropout=0.0, add_bias_linear=False,
        gated_linear_unit=True, activation_func=F.silu, use_cpu_initialization=True,
        params_dtype=dtype, bf16=dtype == torch.bfloat16), **overrides})


def build_layer(config):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from plugins.mla.spec import with_mla

    return build_module(with_mla(get_gpt_layer_local_spec(normalization="RMSNorm")),
                        config=config, layer_number=1)


def inputs(shape: Shape, seq: int, batch: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(seq, batch, shape.hidden, generator=g).to(dtype) for _ in "xg")


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
    """Hooks that keep `stack[-1]` the name of the innermost module running."""
    hooks = []
    for name, module in layer.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: stack.append(n)))
            hooks.append(module.register_forward_hook(lambda m, a, o: stack.pop() and None))
    return hooks


def saved_for_backward(layer, x, grad) -> tuple[list[Saved], torch.Tensor]:
    """Forward + backward of the layer; the storages autograd kept (in saving order, as
    SelectiveRecompute's ledger sees them, parameters and recomputed outputs excluded) and
    the input gradient."""
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
    layer.zero_grad(set_to_none=True)
    return list(kept.values()), inp.grad


def layers(shape: Shape, dtype: torch.dtype):
    """(option, layer) per recompute option, all with the first one's weights; one alive
    at a time."""
    weights = None
    for option, names in RECOMPUTE.items():
        recompute = dict(recompute_granularity="selective", recompute_modules=names)
        layer = build_layer(mla_config(shape, dtype, perform_initialization=weights is None,
                                       **(recompute if names else {})))
        if weights is None:
            weights = {k: v.clone() for k, v in layer.state_dict().items()
                       if isinstance(v, torch.Tensor)}
        layer.load_state_dict(weights, strict=False)  # strict: the `_extra_state` entries
        yield option, layer
        del layer
        gc.collect()


def measure(shape: Shape, dtype: torch.dtype, seqs, seed: int):
    """Per option: {seq: saved storages}, and whether every input grad equals none's."""
    data = {s: inputs(shape, s, 1, dtype, seed) for s in seqs}
    results, reference = {}, {}
    for option, layer in layers(shape, dtype):
        by_seq, equal = {}, True
        for s in seqs:
            by_seq[s], dx = saved_for_backward(layer, *data[s])
            equal &= torch.equal(dx, reference.setdefault(s, dx))
        results[option] = (by_seq, equal)
    return results


def total(saved: list[Saved]) -> int:
    return sum(s.nbytes for s in saved)


def dropped(base: list[Saved], other: list[Saved]) -> list[Saved]:
    """What `base` saves and `other` does not, largest first."""
    left, gone = Counter(other), []
    for s in base:
        if left[s]:
            left[s] -= 1
        else:
            gone.append(s)
    return sorted(gone, key=lambda s: -s.nbytes)


def not_linear(by_seq: dict[int, list[Saved]]) -> list[str]:
    """Saved storages that did not grow in proportion to the sequence length between
    consecutive measured lengths (storages matched by saving order)."""
    seqs, problems = sorted(by_seq), []
    for s0, s1 in zip(seqs, seqs[1:]):
        a, b = by_seq[s0], by_seq[s1]
        if [x.module for x in a] != [y.module for y in b]:
            problems.append(f"seq {s0} to {s1}: {len(a)} vs {len(b)} storages, not matched")
            continue
        problems += [f"{x.describe()} grew x{y.nbytes / x.nbytes:.3g} from seq {s0} to {s1}"
                     for x, y in zip(a, b) if y.nbytes * s0 != x.nbytes * s1]
    return problems


def dropped_note(label: str, results: dict, seq: int) -> str:
    base = results["none"][0][seq]
    parts = []
    for option in list(RECOMPUTE)[1:]:
        gone = dropped(base, results[option][0][seq])
        parts.append(f"{option}: {total(gone) / MiB:.2f} MiB in {len(gone)} storages"
                     + "".join(f"; {s.describe()}" for s in gone[:4])
                     + ("; ..." if len(gone) > 4 else ""))
    return f"{label} what each option stops saving, largest first: " + " | ".join(parts) + "."


def run_saved_bytes() -> Result:
    start, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(SAVED_BYTES_THREADS)
    try:
        with megatron_single_rank():
            scaled = measure(SCALED, torch.float32, (SCALED_SEQ,), seed=1)
            full = measure(DEEPSEEK_V3, torch.bfloat16, FULL_SEQS, seed=2)
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - start

    none_a = total(scaled["none"][0][SCALED_SEQ])
    table_a = Table(
        f"(a) DeepSeek-V3 / 16 ({SCALED.describe()}), seq {SCALED_SEQ}, batch 1, fp32",
        ["recompute", "saved MiB", "ratio to none", "input grad bit-equal to none's"],
        [[o, f"{total(v[SCALED_SEQ]) / MiB:.3f}", f"{total(v[SCALED_SEQ]) / none_a:.3f}",
          "yes" if eq else "NO"] for o, (v, eq) in scaled.items()], right=frozenset({1, 2}))

    s_max, k = FULL_SEQS[-1], EXTRAPOLATE_TO / FULL_SEQS[-1]
    problems = {o: not_linear(by_seq) for o, (by_seq, _) in full.items()}
    none_b = total(full["none"][0][s_max])
    rows = []
    for option, (by_seq, equal) in full.items():
        at_max = total(by_seq[s_max])
        at_4k = "n/a: not linear" if problems[option] else f"{at_max * k / 2 ** 30:.3f}"
        rows.append([option, *(f"{total(by_seq[s]) / MiB:.2f}" for s in FULL_SEQS),
                     f"{at_max / s_max / 1024:.1f}", at_4k, f"{at_max / none_b:.3f}",
                     "yes" if equal else "NO"])
    table_b = Table(
        f"(b) DeepSeek-V3 layer ({DEEPSEEK_V3.describe()}), batch 1, bf16",
        ["recompute", *(f"MiB @ seq {s}" for s in FULL_SEQS), f"KiB/token @ {s_max}",
         f"GiB @ {EXTRAPOLATE_TO} (x{k:g})", f"ratio to none @ {s_max}",
         "input grad bit-equal to none's"], rows, right=frozenset(range(1, 7)))

    steps = " and ".join(f"{a} to {b}" for a, b in zip(FULL_SEQS, FULL_SEQS[1:]))
    bad = [f"{o}: " + "; ".join(p) for o, p in problems.items() if p]
    linearity = (f"(b) Linearity, measured: every saved storage of every option grew exactly "
                 f"2x from seq {steps}: linear in s, so the GiB @ {EXTRAPOLATE_TO} column is "
                 f"the seq-{s_max} bytes x {k:g}." if not bad else
                 "(b) Linearity, measured: NOT linear, so no extrapolation for: " + " | ".join(bad))
    remaining = sorted(full["layernorm+mla_up_proj"][0][s_max], key=lambda s: -s.nbytes)
    notes = [
        "Saved bytes: the unique storages of the tensors autograd saves inside the layer "
        "(SelectiveRecompute's ledger sees each; parameters and recomputed outputs excluded), "
        "as tests/test_mla.py counts them. Each option runs forward and backward on the same "
        "weights and inputs; its input gradient is compared bit for bit with none's. A "
        "storage is labelled by the innermost module running when it was saved.",
        "Layer: plugins.mla.spec.with_mla(get_gpt_layer_local_spec(normalization='RMSNorm'))"
        ": megaseek's MLASelfAttention and Megatron's local SwiGLU MLP, no biases, dropout 0, "
        "plain RoPE, TP = 1.",
        linearity,
        dropped_note(f"(b) seq {s_max}:", full, s_max),
        dropped_note(f"(a) seq {SCALED_SEQ}:", scaled, SCALED_SEQ),
        f"(b) seq {s_max}: largest storages still saved with layernorm+mla_up_proj (of "
        f"{len(remaining)}): " + "; ".join(s.describe() for s in remaining[:5]) + ".",
        f"Wall time {elapsed:.0f} s on {SAVED_BYTES_THREADS} torch threads.",
    ]
    return Result("mla_saved_bytes", [], notes, [table_a, table_b])


# ---------------------------------------------------------------------- mla_cpu_time

def core_attention_classes():
    """Core attentions for Megatron's MLASelfAttention on CPU (defined here, not at import:
    Megatron is imported only after integration's fixes)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule

    class KVChannelsDotProductAttention(DotProductAttention):
        """Megatron's local DotProductAttention, also taking MLA's k_channels/v_channels
        (None by default: Attention.__init__ first builds it without them)."""

        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)
            if k_channels is not None:  # only feeds a default softmax scale MLA overrides
                self.hidden_size_per_attention_head = k_channels
            if v_channels is not None:  # the final view of the context: [s, b, heads x v]
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    class SDPACoreAttention(MegatronModule):
        """Causal F.scaled_dot_product_attention: [s, b, n, d] in, [s, b, n * v] out."""

        def __init__(self, config, layer_number, attn_mask_type, attention_type,
                     softmax_scale=None, **unused):
            super().__init__(config=config)
            self.softmax_scale = softmax_scale
            assert attn_mask_type == AttnMaskType.causal

        def forward(self, query, key, value, attention_mask, **unused):
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
            context = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                     scale=self.softmax_scale)
            return context.permute(2, 0, 1, 3).flatten(2)

    return KVChannelsDotProductAttention, SDPACoreAttention


def build_megatron_mla(config, core_attention):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    spec = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True,
                                    normalization="RMSNorm").submodules.self_attention
    spec.submodules.core_attention = core_attention
    return build_module(spec, config=config, layer_number=1)


def build_megaseek_mla(config):
    from megatron.core.transformer.spec_utils import build_module

    from plugins.mla.spec import mla_attention_spec

    return build_module(mla_attention_spec(), config=config, layer_number=1)


def random_weights(module, seed: int) -> dict[str, torch.Tensor]:
    """N(0, 1/fan_in) linears and 1 + 0.1 N(0, 1) norms, so activations are O(1)."""
    g = torch.Generator().manual_seed(seed)
    return {name: (1 + 0.1 * torch.randn(p.shape, generator=g)) if p.dim() == 1
            else torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
            for name, p in module.named_parameters()}


def load(module, weights: dict[str, torch.Tensor]) -> None:
    missing, unexpected = module.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.endswith("._extra_state") for k in missing)


def fwd_bwd(module, x, grad):
    inp = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out, _ = module(inp, attention_mask=None)
    out.backward(grad)
    return out.detach(), inp.grad, {n: p.grad for n, p in module.named_parameters()}


def attention_nodes(module, x) -> str:
    """The softmax/attention nodes in the module's autograd graph: which kernel ran."""
    out, _ = module(x, attention_mask=None)
    names, seen, todo = set(), set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            if any(w in type(node).__name__ for w in ("Attention", "Softmax")):
                names.add(type(node).__name__)
            todo += [n for n, _ in node.next_functions]
    return ", ".join(sorted(names)) or "none"


def compare(name, got, ref) -> str:
    """Largest differences of output, input grad and weight grads, relative to the largest
    reference value."""
    diffs = [(what, (a - b).abs().max().item(), b.abs().max().item())
             for what, a, b in [("output", got[0], ref[0]), ("input grad", got[1], ref[1])]
             + [(k, g, ref[2][k]) for k, g in got[2].items()]]
    worst = max(diffs, key=lambda d: d[1] / d[2])
    return (f"{name} vs A (fp32): max |output diff| {diffs[0][1]:.1e} (of {diffs[0][2]:.2f}), "
            f"max |input-grad diff| {diffs[1][1]:.1e} (of {diffs[1][2]:.2f}); worst relative "
            f"{worst[0]} {worst[1] / worst[2]:.1e}: "
            + ("equal up to fp32 rounding." if worst[1] / worst[2] < 1e-5 else "NOT EQUAL."))


def run_cpu_time() -> Result:
    from plugins.mla.convert import from_interleaved_rope

    x, grad = inputs(SCALED, TIME_SEQ, TIME_BATCH, torch.float32, seed=3)
    with megatron_single_rank():
        kv_dpa, sdpa = core_attention_classes()
        config = mla_config(SCALED, qk_layernorm=True)  # else Megatron's spec has no latent norms
        modules = {"A": build_megaseek_mla(config), "B": build_megatron_mla(config, kv_dpa),
                   "C": build_megatron_mla(config, sdpa)}
        # Megatron rotates RoPE pairs (x_2i, x_2i+1), megaseek (x_i, x_i+d/2): convert.
        rope = dict(heads=SCALED.heads, qk_head_dim=SCALED.qk_head_dim,
                    rope_dim=SCALED.qk_pos_emb_head_dim)
        weights = random_weights(modules["B"], seed=7)
        load(modules["A"], from_interleaved_rope(weights, **rope))
        load(modules["B"], weights)
        load(modules["C"], weights)

        ref = fwd_bwd(modules["A"], x, grad)
        checks = []
        for name in "BC":
            out, dx, grads = fwd_bwd(modules[name], x, grad)
            checks.append(compare(name, (out, dx, from_interleaved_rope(grads, **rope)), ref))
        kernels = "; ".join(f"{n}: {attention_nodes(m, x)}" for n, m in modules.items())

        current = {}

        def use(name):
            @contextlib.contextmanager
            def enter():
                current["module"] = modules[name]
                yield
            return enter

        times = interleaved(lambda: fwd_bwd(current["module"], x, grad),
                            {n: use(n) for n in modules}, reps=REPS, warmup=WARMUP)

    notes = [
        f"Attention module only, {SCALED.describe()} (DeepSeek-V3 / 16), seq {TIME_SEQ}, "
        f"batch {TIME_BATCH}, fp32, plain RoPE, causal, dropout 0, TP = 1; step = zero_grad "
        f"+ forward + backward; {WARMUP} warm-up rounds, then {REPS} interleaved rounds.",
        "Megatron-Core 0.19.2's MLASelfAttention does not build with its local spec: "
        "MultiLatentAttention.__init__ passes k_channels and v_channels to the core attention "
        "and the local DotProductAttention.__init__ takes neither (TypeError). B's minimal "
        "fix (KVChannelsDotProductAttention in the spec's core_attention slot) accepts them "
        "and sets hidden_size_per_partition = v_channels x heads, so the context's final "
        "view is [s, b, heads x v_head_dim]; its forward is unchanged. C puts "
        "F.scaled_dot_product_attention (SDPACoreAttention) in that slot instead.",
        "Megatron's module also needs qk_layernorm=True (else IdentityOp latent norms) and "
        "megaseek's CPU fixes. Same random weights for all; megaseek's get the RoPE rows "
        "permuted by plugins.mla.convert.from_interleaved_rope, and Megatron's weight "
        "gradients are permuted alike before comparing.",
        *checks,
        f"Softmax/attention autograd nodes each ran (forward on the input above): {kernels}.",
    ]
    return Result("mla_cpu_time", [
        Config("A", "megaseek MLASelfAttention (plugins.mla)", times["A"]),
        Config("B", "Megatron-Core MLASelfAttention + KVChannelsDotProductAttention "
                    "(minimal fix)", times["B"]),
        Config("C", "Megatron-Core MLASelfAttention + SDPA core attention", times["C"]),
    ], notes)
