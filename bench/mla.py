"""MLA benchmarks: activation memory of selective recompute, and CPU time against Megatron.

mla_saved_bytes  Bytes autograd keeps for backward in one megaseek MLA transformer layer
                 (MLA attention + dense SwiGLU MLP, RMSNorms), per `--recompute-modules`
                 choice, counted as in tests/test_mla.py: the unique storages of the tensors
                 autograd saves inside the layer (SelectiveRecompute's ledger sees each
                 one), parameters excluded. Two shapes: DeepSeek-V3 scaled down by 16
                 (fp32) and DeepSeek-V3's own layer (bf16) at short sequences, where each
                 saved storage's growth with the sequence length is measured (linear, or
                 s x s: SDPA's CPU math path keeps the probabilities) and extrapolated.
mla_cpu_time     Forward + backward of megaseek's MLASelfAttention against Megatron-Core's
                 own (megatron.core.transformer.multi_latent_attention.MLASelfAttention) on
                 the same weights, which needs a core-attention module that accepts MLA's
                 k_channels/v_channels (the local DotProductAttention does not); see
                 `KVChannelsDotProductAttention`.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import integration  # noqa: F401  (first: makes megatron.training importable on 3.11)
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

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


# DeepSeek-V3 (hidden 7168, 128 heads, ...; dense SwiGLU of 18432 in its first 3 layers)
DEEPSEEK_V3 = Shape(hidden=7168, heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_head_dim=128,
                    qk_pos_emb_head_dim=64, v_head_dim=128, ffn=18432)
# ... with every one of those dimensions divided by 16
SCALED = Shape(hidden=448, heads=8, q_lora_rank=96, kv_lora_rank=32, qk_head_dim=8,
               qk_pos_emb_head_dim=4, v_head_dim=8, ffn=18432 // 16)

RECOMPUTE = {"none": [], "layernorm": ["layernorm"], "mla_up_proj": ["mla_up_proj"],
             "layernorm+mla_up_proj": ["layernorm", "mla_up_proj"]}

SCALED_SEQ, SCALED_BATCH = 256, 1
FULL_SEQS, FULL_BATCH = (64, 128, 256), 1  # each twice the last; the last is extrapolated
EXTRAPOLATE_TO = 4096
SAVED_BYTES_THREADS = 2  # not a timing benchmark: use both cores

TIME_SEQ, TIME_BATCH = 256, 2
WARMUP, REPS = 5, 60


# ----------------------------------------------------------------------------- setup

@contextlib.contextmanager
def megatron_single_rank(seed: int = 1234):
    """One gloo rank on a HashStore, Megatron's model-parallel state (TP = PP = 1) and
    megaseek's CPU fixes, all undone on exit."""
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

    fields = dict(
        num_layers=1, hidden_size=shape.hidden, num_attention_heads=shape.heads,
        ffn_hidden_size=shape.ffn, q_lora_rank=shape.q_lora_rank,
        kv_lora_rank=shape.kv_lora_rank, qk_head_dim=shape.qk_head_dim,
        qk_pos_emb_head_dim=shape.qk_pos_emb_head_dim, v_head_dim=shape.v_head_dim,
        normalization="RMSNorm", layernorm_epsilon=1e-6, rope_type="rope", rotary_base=10000,
        attention_dropout=0.0, hidden_dropout=0.0, add_bias_linear=False,
        gated_linear_unit=True, activation_func=F.silu, use_cpu_initialization=True,
        params_dtype=dtype, bf16=dtype == torch.bfloat16,
    )
    fields.update(overrides)
    return MLATransformerConfig(**fields)


def build_layer(config):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from plugins.mla.spec import with_mla

    spec = with_mla(get_gpt_layer_local_spec(normalization="RMSNorm"))
    return build_module(spec, config=config, layer_number=1)


# ------------------------------------------------------------------- mla_saved_bytes

@dataclass(frozen=True)
class Saved:
    where: str       # "module / torch call" running when autograd saved it
    shape: tuple     # of the first saved view of this storage
    dtype: torch.dtype
    nbytes: int      # of the whole storage


class _CurrentCall(TorchFunctionMode):
    """Names the torch call (F.scaled_dot_product_attention, F.rms_norm, ...) that is
    running; a mode is off inside its own handler, so that is the outermost one."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "-"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        outer, self.name = self.name, getattr(func, "__name__", str(func))
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.name = outer


def saved_for_backward(layer, x: torch.Tensor, grad: torch.Tensor):
    """Forward + backward of `layer` on x; the storages autograd kept (in saving order)
    and the input gradient."""
    from plugins.mla.recompute import SelectiveRecompute

    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    kept: dict[int, Saved] = {}
    modules = ["layer"]
    call = _CurrentCall()

    def enter(name):
        def hook(module, args) -> None:
            modules.append(name)
        return hook

    def leave(module, args, output) -> None:  # returns None: the output stays as it is
        modules.pop()

    hooks = []
    for name, module in layer.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(enter(name)))
            hooks.append(module.register_forward_hook(leave))

    def ledger(t: torch.Tensor, recomputed: bool) -> None:
        ptr = t.untyped_storage().data_ptr()
        if not recomputed and ptr not in params and ptr not in kept:
            # No torch call running: saved by a custom autograd.Function (Megatron's linears)
            where = modules[-1] if call.name == "-" else f"{modules[-1]} / {call.name}"
            kept[ptr] = Saved(where, tuple(t.shape), t.dtype, t.untyped_storage().nbytes())

    # The layer enters its own SelectiveRecompute; without recompute one with nothing
    # tracked is entered here only for its ledger (as tests/test_mla.py does).
    counting = layer.selective_recompute or SelectiveRecompute()
    counting.ledger = ledger
    inp = x.clone().requires_grad_()
    try:
        with (counting if layer.selective_recompute is None else contextlib.nullcontext()):
            with call:
                out, _ = layer(inp, attention_mask=None)
        out.backward(grad)
    finally:
        counting.ledger = None
        for hook in hooks:
            hook.remove()
    layer.zero_grad(set_to_none=True)
    return list(kept.values()), inp.grad


def _total(saved: list[Saved]) -> int:
    return sum(s.nbytes for s in saved)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe(s: Saved, tokens: int | None = None, total: int | None = None) -> str:
    text = f"{s.where} {list(s.shape)} {_dtype(s.dtype)} {s.nbytes / MiB:.2f} MiB"
    if total:
        text += f" ({100 * s.nbytes / total:.0f}%)"
    return text


def _top(saved: list[Saved], k: int) -> str:
    total = _total(saved)
    return "; ".join(_describe(s, total=total)
                     for s in sorted(saved, key=lambda s: -s.nbytes)[:k])


def _dropped(base: list[Saved], other: list[Saved]) -> list[Saved]:
    """What `base` saves and `other` does not (matched by label, shape, dtype, size)."""
    rest = Counter((s.where, s.shape, s.dtype, s.nbytes) for s in other)
    out = []
    for s in base:
        key = (s.where, s.shape, s.dtype, s.nbytes)
        if rest[key]:
            rest[key] -= 1
        else:
            out.append(s)
    return out


def _inputs(shape: Shape, seq: int, batch: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(seq, batch, shape.hidden, generator=g).to(dtype)
    grad = torch.randn(seq, batch, shape.hidden, generator=g).to(dtype)
    return x, grad


def _layers(shape: Shape, dtype: torch.dtype):
    """(option, layer) per recompute option, all on the weights of the first; each is
    built after the previous one was let go (callers drop their reference)."""
    reference = None
    for option, names in RECOMPUTE.items():
        overrides = dict(recompute_granularity="selective", recompute_modules=names) \
            if names else {}
        if reference is None:
            layer = build_layer(mla_config(shape, dtype, **overrides))
            reference = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                         for k, v in layer.state_dict().items()}
        else:
            layer = build_layer(mla_config(shape, dtype, perform_initialization=False,
                                           **overrides))
            layer.load_state_dict(reference)
        assert (layer.selective_recompute is None) == (not names), option
        yield option, layer
        del layer
        gc.collect()


@dataclass
class Scaling:
    """Per saved storage, how its size grows from seq s0 to 2 s0 (2: linear, 4: s x s);
    checked by predicting every storage at 4 s0 exactly."""

    linear: int = 0      # bytes at the largest measured seq
    quadratic: int = 0
    problems: list[str] = field(default_factory=list)


def _scaling(by_seq: dict[int, list[Saved]]) -> Scaling:
    s0, s1, s2 = sorted(by_seq)
    assert s1 == 2 * s0 and s2 == 2 * s1
    result = Scaling()
    a, b, c = by_seq[s0], by_seq[s1], by_seq[s2]
    if not len(a) == len(b) == len(c):
        result.problems.append(f"{len(a)}, {len(b)}, {len(c)} saved storages")
        return result
    for x, y, z in zip(a, b, c):
        growth = y.nbytes / x.nbytes if x.nbytes else 0
        if x.where != y.where or y.where != z.where or growth not in (2, 4):
            result.problems.append(f"{x.where} {list(x.shape)}: x{growth:.3g}")
        elif z.nbytes != growth * y.nbytes:
            result.problems.append(f"{x.where} {list(x.shape)}: predicted "
                                   f"{growth * y.nbytes}, measured {z.nbytes} at seq {s2}")
        elif growth == 2:
            result.linear += z.nbytes
        else:
            result.quadratic += z.nbytes
    return result


def sdpa_backward_node(qk_dim: int, v_dim: int, dtype: torch.dtype) -> str:
    """The autograd node F.scaled_dot_product_attention records on CPU for these head dims
    (causal, the [b, n, s, d] views MLA passes): its flash kernel's, or its math path's."""
    q = torch.randn(1, 16, 2, qk_dim, dtype=dtype).transpose(1, 2).requires_grad_()
    v = torch.randn(1, 16, 2, v_dim, dtype=dtype).transpose(1, 2).requires_grad_()
    node = F.scaled_dot_product_attention(q, q, v, is_causal=True).grad_fn
    while node is not None and not any(k in type(node).__name__ for k in ("Attention", "Bmm")):
        node = node.next_functions[0][0]
    return type(node).__name__ if node is not None else "?"


def run_saved_bytes() -> Result:
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(SAVED_BYTES_THREADS)
    scaled: dict[str, tuple[list[Saved], bool]] = {}
    full: dict[str, tuple[dict[int, list[Saved]], bool]] = {}
    try:
        with megatron_single_rank():
            # (a) scaled down by 16, fp32
            x, grad = _inputs(SCALED, SCALED_SEQ, SCALED_BATCH, torch.float32, seed=1)
            base_dx = None
            for option, layer in _layers(SCALED, torch.float32):
                saved, dx = saved_for_backward(layer, x, grad)
                base_dx = dx if base_dx is None else base_dx
                scaled[option] = (saved, torch.equal(dx, base_dx))
                del layer
            scaled_s = time.perf_counter() - start

            # (b) DeepSeek-V3's layer, bf16, at three sequence lengths
            inputs = {s: _inputs(DEEPSEEK_V3, s, FULL_BATCH, torch.bfloat16, seed=2)
                      for s in FULL_SEQS}
            base_dx = None
            for option, layer in _layers(DEEPSEEK_V3, torch.bfloat16):
                by_seq, dx = {}, None
                for s in FULL_SEQS:
                    by_seq[s], dx = saved_for_backward(layer, *inputs[s])
                base_dx = dx if base_dx is None else base_dx
                full[option] = (by_seq, torch.equal(dx, base_dx))
                del layer, dx
            del base_dx, inputs
            gc.collect()
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - start

    base = _total(scaled["none"][0])
    scaled_table = Table(
        f"(a) DeepSeek-V3 scaled down by 16 ({SCALED.describe()}), seq {SCALED_SEQ}, "
        f"batch {SCALED_BATCH}, fp32",
        ["recompute", "saved MiB", "ratio to none", "input grad bit-equal to none's"],
        [[o, f"{_total(v) / MiB:.3f}", f"{_total(v) / base:.3f}", "yes" if eq else "NO"]
         for o, (v, eq) in scaled.items()],
        right=frozenset({1, 2}))

    s_max = FULL_SEQS[-1]
    tokens = s_max * FULL_BATCH
    k = EXTRAPOLATE_TO // s_max
    scalings = {o: _scaling(by_seq) for o, (by_seq, _) in full.items()}
    base_max = _total(full["none"][0][s_max])
    base_4k = scalings["none"].linear * k + scalings["none"].quadratic * k * k
    rows = []
    for option, (by_seq, dx_equal) in full.items():
        sc = scalings[option]
        at_4k = sc.linear * k + sc.quadratic * k * k
        bad = " (!)" if sc.problems else ""
        rows.append([option, *(f"{_total(by_seq[s]) / MiB:.2f}" for s in FULL_SEQS),
                     f"{sc.quadratic / MiB:.2f}{bad}",
                     f"{sc.linear / tokens / 1024:.1f}{bad}",
                     f"{sc.linear / tokens * EXTRAPOLATE_TO / 2 ** 30:.3f}{bad}",
                     f"{at_4k / 2 ** 30:.3f}{bad}",
                     f"{_total(by_seq[s_max]) / base_max:.3f}", f"{at_4k / base_4k:.3f}",
                     "yes" if dx_equal else "NO"])
    full_table = Table(
        f"(b) DeepSeek-V3 layer ({DEEPSEEK_V3.describe()}), batch {FULL_BATCH}, bf16",
        ["recompute", *(f"MiB @ seq {s}" for s in FULL_SEQS),
         f"of which s×s MiB @ {s_max}", f"linear part KiB/token",
         f"GiB @ {EXTRAPOLATE_TO}: linear part only (KiB/token × {EXTRAPOLATE_TO})",
         f"GiB @ {EXTRAPOLATE_TO}: linear × {k} + s×s × {k * k}",
         f"ratio to none @ {s_max}", f"ratio to none @ {EXTRAPOLATE_TO}",
         "input grad bit-equal to none's"],
        rows, right=frozenset(range(1, 10)))

    none_max = full["none"][0][s_max]
    both_max = full["layernorm+mla_up_proj"][0][s_max]
    problems = [f"{o}: " + "; ".join(sc.problems) for o, sc in scalings.items() if sc.problems]
    quadratic = [s for s in none_max if s.where.endswith("scaled_dot_product_attention")
                 and len(s.shape) == 4 and s.shape[-1] == s.shape[-2] == s_max]
    s0, s1, s2 = FULL_SEQS
    qk_dim = DEEPSEEK_V3.qk_head_dim + DEEPSEEK_V3.qk_pos_emb_head_dim
    scaling_note = (
        f"Sequence-length scaling, measured per saved storage: from seq {s0} to {s1} every "
        f"storage grows exactly 2x (linear) or 4x (s×s), and that predicts every storage at "
        f"seq {s2} exactly, for all four options. So the claim 'every saved tensor is linear "
        f"in the sequence length on the CPU attention path' is FALSE for this layer: "
        f"F.scaled_dot_product_attention cannot use its CPU flash kernel when v_head_dim "
        f"({DEEPSEEK_V3.v_head_dim}) differs from the query/key head dim "
        f"({qk_dim}) (checked here in bf16: with equal head dims its backward node is "
        f"{sdpa_backward_node(qk_dim, qk_dim, torch.bfloat16)}, with these "
        f"{sdpa_backward_node(qk_dim, DEEPSEEK_V3.v_head_dim, torch.bfloat16)}, the math "
        f"path's), and the math path saves the softmax "
        f"probabilities [b, n, s, s] in fp32 "
        + ("(" + "; ".join(_describe(s) for s in quadratic) + f" at seq {s_max})" if quadratic
           else "")
        + f". The GiB @ {EXTRAPOLATE_TO} columns therefore give both bytes/token × "
        f"{EXTRAPOLATE_TO} of the linear part alone (what a kernel that keeps no s×s "
        f"tensor would add to it is not modelled) and the measured model: linear part at "
        f"seq {s_max} × {k} + s×s part × {k * k}. A GPU run whose attention kernel keeps "
        f"no s×s tensor (TE's fused attention, say) is not measured here."
        if not problems else
        "Sequence-length scaling check FAILED (the extrapolation is not valid) for: "
        + " | ".join(problems))

    def dropped(option: str, shape_rows: dict) -> str:
        gone = _dropped(shape_rows["none"], shape_rows[option])
        if not gone:
            return f"{option}: nothing"
        return (f"{option}: {_total(gone) / MiB:.2f} MiB = "
                + "; ".join(_describe(s) for s in gone))

    full_max = {o: by_seq[s_max] for o, (by_seq, _) in full.items()}
    scaled_rows = {o: v for o, (v, _) in scaled.items()}
    notes = [
        "Saved bytes = unique storages of the tensors autograd saves for backward inside "
        "one layer (SelectiveRecompute's ledger is called on each), parameters excluded, "
        "the layer's input counted when autograd saves it (counted as in tests/test_mla.py)."
        " Each option ran "
        "forward and backward at every shape and sequence length; its input gradient is "
        "compared bit for bit with that of 'none' on the same weights. A storage's label "
        "is 'innermost module / outermost torch call' running when it was saved (found by "
        "module hooks and a TorchFunctionMode; the module alone where a custom "
        "autograd.Function such as Megatron's linear saved it), its shape that of its "
        "first saved view.",
        "Layer: plugins.mla.spec.with_mla(get_gpt_layer_local_spec(normalization="
        "'RMSNorm')), i.e. MLATransformerLayer with megaseek's MLASelfAttention (core "
        "attention: F.scaled_dot_product_attention) and Megatron's local dense MLP (SwiGLU:"
        " gated_linear_unit, silu), no biases, dropout 0 (as DeepSeek-V3), plain RoPE (YaRN "
        "would change only the values of the cos/sin tables and the softmax scale), TP = 1.",
        f"(b) runs DeepSeek-V3's full layer shape (583M parameters, params_dtype=bf16, "
        f"bf16=True) at seq {', '.join(map(str, FULL_SEQS))} only (not {EXTRAPOLATE_TO}), "
        f"to stay within a few minutes on 2 CPU cores.",
        scaling_note,
        f"(b) largest saved storages without recompute, seq {s_max} (of {len(none_max)}): "
        + _top(none_max, 8) + ".",
        f"(b) largest saved storages with layernorm+mla_up_proj, seq {s_max} "
        f"(of {len(both_max)}): " + _top(both_max, 6) + ".",
        f"(b) what each option stops saving, seq {s_max}: "
        + " | ".join(dropped(o, full_max) for o in list(RECOMPUTE)[1:]) + ".",
        f"(a) what each option stops saving, seq {SCALED_SEQ}: "
        + " | ".join(dropped(o, scaled_rows) for o in list(RECOMPUTE)[1:]) + ".",
        "Why the reductions are small on this path: 'layernorm' drops only the norm "
        "outputs that the following linears save as their inputs; F.rms_norm on CPU also "
        "saves its own fp32 intermediates (for bf16 an fp32 copy of its input and the fp32 "
        "normalized value, 4 bytes per element each), which stay. 'mla_up_proj' drops the "
        "query/key/value the up-projection returns only where attention saves those very "
        "tensors; SDPA's CPU math path saves derived tensors instead (q and k scaled by "
        "sqrt(scale), and in bf16 fp32 copies of q, k and v), so it drops "
        f"{_total(_dropped(full_max['none'], full_max['mla_up_proj'])) / MiB:.2f} MiB at "
        f"the bf16 full shape and "
        f"{_total(_dropped(scaled_rows['none'], scaled_rows['mla_up_proj'])) / MiB:.2f} MiB "
        "in fp32 (the value there is a view of the kv up-projection output). What remains "
        "is dominated by the fp32 attention intermediates (s×s probabilities, "
        "q/k/v copies), the RMSNorm intermediates and the MLP (SwiGLU's fc1 output and "
        "activation).",
        f"Wall time of this benchmark: {elapsed:.0f} s ((a): {scaled_s:.0f} s), "
        f"torch threads {SAVED_BYTES_THREADS}.",
    ]
    return Result("mla_saved_bytes", [], notes, [scaled_table, full_table])


# ---------------------------------------------------------------------- mla_cpu_time

def _core_attention_classes():
    """Two core-attention modules that let Megatron's MLASelfAttention build on CPU
    (defined lazily: Megatron is imported only after integration's fixes)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule

    class KVChannelsDotProductAttention(DotProductAttention):
        """Megatron's local DotProductAttention, also taking MLA's k_channels/v_channels.

        MultiLatentAttention.__init__ (multi_latent_attention.py:207-217) builds its core
        attention with k_channels=qk_head_dim + qk_pos_emb_head_dim and
        v_channels=v_head_dim, which DotProductAttention.__init__ (dot_product_attention.py
        :42) does not accept. Its forward already handles a value head width other than
        the query/key one (baddbmm over q.k, bmm with v); only the final view uses
        hidden_size_per_partition = kv_channels x heads, so that is set to v_channels x
        heads (hidden_size_per_attention_head only feeds a default softmax scale, which MLA
        always passes). The base Attention.__init__ first builds it without the two
        arguments (attention.py:382), hence the defaults.
        """

        def __init__(self, *args, k_channels: int | None = None,
                     v_channels: int | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            if k_channels is not None:
                self.hidden_size_per_attention_head = k_channels
            if v_channels is not None:
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    class SDPACoreAttention(MegatronModule):
        """Causal softmax(q k^T * scale) v by F.scaled_dot_product_attention, through the
        spec's core_attention slot: [s, b, n, d] in, [s, b, n * v] out (as megaseek's)."""

        def __init__(self, config, layer_number, attn_mask_type, attention_type,
                     softmax_scale=None, **unused):
            super().__init__(config=config)
            self.causal = attn_mask_type == AttnMaskType.causal
            self.softmax_scale = softmax_scale

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None):
            assert attention_bias is None and packed_seq_params is None
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
            mask = None if attention_mask is None else ~attention_mask
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
                dropout_p=self.config.attention_dropout if self.training else 0.0,
                scale=self.softmax_scale)
            return context.permute(2, 0, 1, 3).flatten(2)

    return KVChannelsDotProductAttention, SDPACoreAttention


def build_megatron_mla(config, core_attention):
    """Megatron-Core's MLASelfAttention from its own local layer spec, with the core
    attention replaced."""
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


def random_mla_weights(module, seed: int) -> dict[str, torch.Tensor]:
    """N(0, 1/fan_in) linears and 1 + 0.1 N(0, 1) norms, so activations are O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in module.named_parameters():
        if p.dim() == 1:
            out[name] = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            out[name] = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
    return out


def _load(module, weights: dict[str, torch.Tensor]) -> None:
    missing, unexpected = module.load_state_dict(weights, strict=False)
    # Megatron's linears carry an `_extra_state` entry (None without TE), nothing else.
    assert not unexpected and all(k.endswith("._extra_state") for k in missing), \
        (missing, unexpected)


def _fwd_bwd(module, x, grad):
    inp = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out, bias = module(inp, attention_mask=None)
    assert bias is None
    out.backward(grad)
    return out.detach(), inp.grad, {n: p.grad for n, p in module.named_parameters()}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Largest |a - b| and the largest |b| it compares with."""
    return (a - b).abs().max().item(), b.abs().max().item()


def run_cpu_time() -> Result:
    from plugins.mla.convert import from_interleaved_rope

    shape = SCALED
    qk_dim = shape.qk_head_dim + shape.qk_pos_emb_head_dim
    x, grad = _inputs(shape, TIME_SEQ, TIME_BATCH, torch.float32, seed=3)
    notes: list[str] = []
    configs: dict[str, Callable[[], None]] = {}
    with megatron_single_rank():
        kv_dpa, sdpa = _core_attention_classes()
        # One config for all three; qk_layernorm=True makes Megatron's local spec build real
        # q/kv latent RMSNorms (IdentityOp otherwise); megaseek always has them.
        config = mla_config(shape, qk_layernorm=True)
        ours = build_megaseek_mla(config)
        megatron = {name: build_megatron_mla(config, core)
                    for name, core in (("B", kv_dpa), ("C", sdpa))}

        # Megatron's MLA rotates RoPE pairs (x_2i, x_2i+1) (apply_rotary_pos_emb with
        # mla_rotary_interleaved=True: DeepSeek's checkpoint layout); megaseek rotates
        # (x_i, x_i+d/2) and converts checkpoints with from_interleaved_rope.
        weights = random_mla_weights(megatron["B"], seed=7)
        for module in megatron.values():
            _load(module, weights)
        convert = dict(heads=shape.heads, qk_head_dim=shape.qk_head_dim,
                       rope_dim=shape.qk_pos_emb_head_dim)
        _load(ours, from_interleaved_rope(weights, **convert))

        ref_out, ref_dx, ref_grads = _fwd_bwd(ours, x, grad)
        for name, module in megatron.items():
            out, dx, grads = _fwd_bwd(module, x, grad)
            grads = from_interleaved_rope(grads, **convert)  # into megaseek's row order
            d_out, m_out = _max_diff(out, ref_out)
            d_dx, m_dx = _max_diff(dx, ref_dx)
            worst = max(((k, *_max_diff(g, ref_grads[k])) for k, g in grads.items()),
                        key=lambda t: t[1] / t[2])
            relative = max(d_out / m_out, d_dx / m_dx, worst[1] / worst[2])
            verdict = (f"equal up to fp32 summation-order rounding (largest difference "
                       f"{relative:.1e} of the values compared)" if relative < 1e-5 else
                       f"NOT equal: largest difference {relative:.1e} of the values compared")
            notes.append(
                f"{name} vs A on the same weights (fp32): max |output diff| {d_out:.1e} "
                f"(outputs up to {m_out:.2f}), max |input-grad diff| {d_dx:.1e} (up to "
                f"{m_dx:.2f}), weight grads worst {worst[0]} {worst[1]:.1e} (up to "
                f"{worst[2]:.2f}): {verdict}.")

        steps = {"A": ours, **megatron}
        current: list[Callable[[], None]] = []

        def select(module):
            @contextlib.contextmanager
            def use():
                current.append(lambda: _fwd_bwd(module, x, grad))
                try:
                    yield
                finally:
                    current.pop()
            return use

        configs = {name: select(module) for name, module in steps.items()}
        times = interleaved(lambda: current[-1](), configs, reps=REPS, warmup=WARMUP)

    notes = [
        f"Attention module only (no layer), {shape.describe()} (DeepSeek-V3 / 16), seq "
        f"{TIME_SEQ}, batch {TIME_BATCH}, fp32, plain RoPE, causal, dropout 0, TP = 1; "
        f"step = zero_grad + forward + backward with a fixed output gradient; {WARMUP} "
        f"warm-up rounds, then {REPS} interleaved rounds.",
        "Megatron-Core 0.19.2's MLASelfAttention does not build with its local spec "
        "(get_gpt_layer_local_spec(multi_latent_attention=True)): "
        "MultiLatentAttention.__init__ (multi_latent_attention.py:207-217) passes "
        "k_channels=qk_head_dim+qk_pos_emb_head_dim and v_channels=v_head_dim to the core "
        "attention, and the local DotProductAttention.__init__ (dot_product_attention.py:42)"
        " takes neither: TypeError. Fix used for B (bench/mla.py, "
        "KVChannelsDotProductAttention, put in the spec's core_attention slot): a "
        "DotProductAttention subclass that accepts k_channels/v_channels (default None, "
        "because Attention.__init__ at attention.py:382 first builds it without them), "
        "and sets hidden_size_per_partition = v_channels x heads per partition (used only "
        "for the final view of the context, which is [s, b, heads x v_head_dim], not "
        "kv_channels x heads = hidden/heads x heads) and hidden_size_per_attention_head = "
        "k_channels; the forward is unchanged (baddbmm q.k^T with MLA's softmax_scale, "
        "FusedScaleMaskSoftmax's torch fallback with the default causal mask, bmm with v "
        "of its own width). C instead puts a small F.scaled_dot_product_attention module "
        "(SDPACoreAttention) in that slot, the core attention megaseek uses, so A vs C "
        "compares everything but the core attention.",
        "Also needed for Megatron's module: config.qk_layernorm=True (otherwise its local "
        "spec uses IdentityOp for q_layernorm/kv_layernorm), rope_type='rope' "
        "(apply_rope_fusion stays False), and megaseek's CPU fixes (integration.cpu."
        "install: RotaryEmbedding and the causal mask allocate on 'cuda').",
        "Weights: the same random state dict under the same names (linear_q_down_proj, "
        "q_layernorm, linear_q_up_proj, linear_kv_down_proj, kv_layernorm, "
        "linear_kv_up_proj, linear_proj; Megatron's down-projections are "
        "ColumnParallelLinear with an extra `_extra_state` entry, megaseek's "
        "ReplicatedLinear has none). The one layout difference: Megatron's MLA rotates "
        "RoPE pairs (x_2i, x_2i+1) (mla_rotary_interleaved=True, DeepSeek's checkpoint "
        "layout), megaseek pairs (x_i, x_i+d/2), so megaseek gets "
        "plugins.mla.convert.from_interleaved_rope(weights) (the RoPE rows of "
        "linear_q_up_proj and linear_kv_down_proj permuted evens-then-odds) and Megatron's "
        "weight gradients are permuted the same way before comparing.",
        *notes,
        "Where the time goes: all three materialise the [b, n, s, s] scores: "
        "F.scaled_dot_product_attention (A, C) cannot use its CPU flash kernel here "
        f"because v_head_dim ({shape.v_head_dim}) differs from the query/key head dim "
        f"({qk_dim}) (its backward node here: "
        f"{sdpa_backward_node(qk_dim, shape.v_head_dim, torch.float32)}; with equal dims: "
        f"{sdpa_backward_node(qk_dim, qk_dim, torch.float32)}), so it runs its math path "
        "(bmm, softmax, bmm). A torch.profiler run taken while writing this "
        "benchmark put B's extra time in its local core attention's copies, fill_ and "
        "masked_fill_ over [b, n, s, s] tensors (FusedScaleMaskSoftmax's torch fallback, "
        "attention dropout at p = 0) on top of the same softmax and bmm work. A vs C isolates everything but the core "
        "attention (projections, norms, RoPE, layout copies).",
    ]
    return Result("mla_cpu_time", [
        Config("A", "megaseek MLASelfAttention (plugins.mla)", times["A"]),
        Config("B", "Megatron-Core MLASelfAttention + KVChannelsDotProductAttention "
                    "(minimal fix)", times["B"]),
        Config("C", "Megatron-Core MLASelfAttention + SDPA core attention", times["C"]),
    ], notes)
