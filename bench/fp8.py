"""fp8_saved_bytes: activation bytes kept for backward by FP8 layers vs BF16 ones.

Counted with saved-tensor hooks (unique storages, weights excluded) around one forward at
DeepSeek-V3 shapes with a short token count (the counts are linear in tokens: every saved
tensor is [tokens, width]). BF16 rows are Megatron's layer math in torch (F.linear, the
unfused SwiGLU of megatron/core/transformer/mlp.py); FP8 rows are plugins.fp8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.result import Result, Table
from plugins.fp8.linear import fp8_linear
from plugins.fp8.swiglu import FP8CachedSwiGLU

TOKENS = 256
LINEARS = [(7168, 2048), (2048, 7168), (7168, 16384), (1536, 24576), (7168, 18432)]  # (in, out)
EXPERT = (7168, 2048)  # DeepSeek-V3's routed expert: hidden 7168, intermediate 2048
SMOKE_LINEARS, SMOKE_EXPERT = [(256, 384)], (256, 128)  # multiples of the 128-wide tiles


def saved_bytes(fn, *inputs, weights=()) -> int:
    skip = {w.untyped_storage().data_ptr() for w in weights}
    kept: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(kept.values())


def bf16_swiglu_mlp(x, w1, w2):
    gate, linear = F.linear(x, w1).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * linear, w2)


def fp8_swiglu_mlp(x, w1, w2):
    return fp8_linear(FP8CachedSwiGLU.apply(fp8_linear(x, w1)), w2)


def run(smoke: bool = False) -> Result:
    def tensor(*shape):
        return torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True)

    linears, expert = (SMOKE_LINEARS, SMOKE_EXPERT) if smoke else (LINEARS, EXPERT)
    rows = []
    for k, n in linears:
        x, w = tensor(TOKENS, k), tensor(n, k)
        bf16 = saved_bytes(F.linear, x, w, weights=[w])
        fp8 = saved_bytes(fp8_linear, x, w, weights=[w])
        rows.append([f"linear {k} -> {n}", f"{bf16 / TOKENS:.0f}", f"{fp8 / TOKENS:.0f}",
                     f"{fp8 / bf16:.3f}"])
    hidden, ffn = expert
    x, w1, w2 = tensor(TOKENS, hidden), tensor(2 * ffn, hidden), tensor(hidden, ffn)
    bf16 = saved_bytes(bf16_swiglu_mlp, x, w1, w2, weights=[w1, w2])
    fp8 = saved_bytes(fp8_swiglu_mlp, x, w1, w2, weights=[w1, w2])
    rows.append([f"SwiGLU MLP {hidden} -> 2x{ffn} -> {hidden}", f"{bf16 / TOKENS:.0f}",
                 f"{fp8 / TOKENS:.0f}", f"{fp8 / bf16:.3f}"])
    table = Table("Bytes kept for backward per token", ["layer", "BF16", "FP8", "FP8 / BF16"],
                  rows, right=frozenset({1, 2, 3}))
    return Result("fp8_saved_bytes", [], [
        f"{TOKENS} tokens, bf16 inputs and weights; FP8 keeps E4M3 bytes plus one float32 "
        "scale per 1x128 tile (1.03 bytes per element).",
        "SwiGLU MLP: Megatron's unfused SwiGLU keeps the gate, its SiLU and the linear half "
        "in BF16, and fc2 its BF16 input; the FP8 MLP keeps fc1's and the SwiGLU's inputs "
        "and fc2's input in FP8, recomputing the SwiGLU output in backward.",
    ], [table])
