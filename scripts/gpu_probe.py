"""GPU probe (run on a lent GPU: `python3 scripts/gpu_probe.py` with megatron-core on the path):
torch._scaled_mm's block-scale layouts at ragged scale counts, and whether the steps of the
Triton quantize kernel keep the sign of FP8 negative zero. Output of 2026-11-26 in
bench/gpu-runs.md."""
import torch
import triton
import triton.language as tl

from plugins.common.quantize import quantize, dequantize

torch.manual_seed(0)
def emulated(aq, asc, ab, bq, bsc, bb):
    return dequantize(aq, asc, ab) @ dequantize(bq, bsc, bb).t()

def rel(g, w):
    return ((g - w).norm() / w.norm()).item()

def layouts_128(bs):  # bs [nb, kb] ours -> candidates for scale_b
    nb, kb = bs.shape
    out = {"view": bs.t()}
    pad = (kb + 3) // 4 * 4
    buf = torch.zeros(nb, pad, device=bs.device); buf[:, :kb] = bs
    out["padded4"] = buf[:, :kb].t()
    out["contig"] = bs.t().contiguous()
    return out

def layouts_a(asc):  # [m, kb] -> candidates
    m, kb = asc.shape
    out = {"colmajor": asc.t().contiguous().t()}
    pm = (m + 3) // 4 * 4
    buf = torch.zeros(kb, pm, device=asc.device); buf[:, :m] = asc.t()
    out["colmajor_padM4"] = buf[:, :m].t()
    return out

for m, n, k in [(256, 384, 384), (256, 384, 256), (256, 256, 640), (200, 384, 512),
                (256, 7168, 576), (256, 512, 512), (130, 256, 512)]:
    x = torch.randn(m, k, device="cuda"); w = torch.randn(n, k, device="cuda") * 0.02
    aq, asc = quantize(x, (1, 128)) if k % 128 == 0 else (None, None)
    if aq is None:
        print(m, n, k, "ragged k: skipped"); continue
    bq, bsc = quantize(w, (128, 128)) if n % 128 == 0 else (None, None)
    if bq is None:
        print(m, n, k, "ragged n: skipped"); continue
    want = emulated(aq, asc, (1, 128), bq, bsc, (128, 128))
    for an, sa in layouts_a(asc).items():
        for bn, sb in layouts_128(bsc).items():
            try:
                got = torch._scaled_mm(aq, bq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
                torch.cuda.synchronize()
                r = f"{rel(got, want):.2e}"
            except Exception as e:
                r = "ERR " + str(e).splitlines()[0][:120]
            print(f"scaled_mm {m}x{n}x{k} A:{an} B128:{bn}: {r}")
    # B 1x128 (Wgrad-style): scale_b [kb, n] contiguous
    bq1, bsc1 = quantize(w, (1, 128))
    want1 = emulated(aq, asc, (1, 128), bq1, bsc1, (1, 128))
    for an, sa in layouts_a(asc).items():
        try:
            got = torch._scaled_mm(aq, bq1.t(), scale_a=sa, scale_b=bsc1.t().contiguous(), out_dtype=torch.float32)
            torch.cuda.synchronize(); r = f"{rel(got, want1):.2e}"
        except Exception as e:
            r = "ERR " + str(e).splitlines()[0][:120]
        print(f"scaled_mm {m}x{n}x{k} A:{an} B1x128: {r}")

@triton.jit
def steps(codes_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    c = tl.load(codes_ptr + i)
    v = c.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    tl.store(out_ptr + i, v)                          # 0: fp8 -> f32
    s = v * 2.0
    tl.store(out_ptr + N + i, s)                      # 1: times a scale
    y = tl.math.div_rn(s, 3.0)
    tl.store(out_ptr + 2 * N + i, y)                  # 2: div_rn
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    tl.store(out_ptr + 3 * N + i, y)                  # 3: clamp
    q = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    tl.store(out_ptr + 4 * N + i, q.to(tl.float32))   # 4: code back
    z = tl.where(i < 1000, y, 0.0)
    tl.store(out_ptr + 5 * N + i, z)                  # 5: where

codes = torch.tensor([0x80, 0x00, 0x81, 0x01] * 4, dtype=torch.uint8, device="cuda")
out = torch.empty(6 * 16, device="cuda")
steps[(1,)](codes, out, 16)
o = out.view(6, 16)[:, :4].cpu()
for name, row in zip(["fp8->f32", "*scale", "div_rn", "clamp", "code", "where"], o):
    print("triton", name, [f"{v:+g}" if name != "code" else int(v) for v in row.tolist()],
          "signbits", torch.signbit(row).tolist())
