"""The README's demo: pretrain a tiny dense GPT on CPU through Megatron's own training
loop, on 2 gloo ranks with tensor parallelism, on the built-in byte-level corpus.

It runs `integration.pretrain` under torchrun; extra arguments go to Megatron (e.g.
`--pipeline-model-parallel-size 2 --tensor-model-parallel-size 1`, or `--plugins ...`).
`--mla` switches the attention to the MLA plugin (DeepSeek-V3's ratios, scaled down) with
selective recomputation of the RMSNorms and up-projections; `--moe` makes every layer but
the first a DeepSeek-V3 MoE layer (16 experts in 4 groups, top-4 from 2 groups, a shared
expert) with expert parallelism over the 2 ranks and FP8 dispatch; `--fp8` runs every
linear's GEMMs (experts' and MLA's down-projections included) in block-scaled FP8 on the
emulated backend, each weight quantized once per step, with 128-wide dimensions and no TP. `--mla --moe --fp8` is the whole
DeepSeek-V3 recipe at toy size.
"""

from __future__ import annotations

import os
import subprocess
import sys

RANKS = 2
MODEL = [
    "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
    "--seq-length", "128", "--max-position-embeddings", "128",
    "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear",
    "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
]
TRAINING = [
    "--tensor-model-parallel-size", "2",
    "--micro-batch-size", "4", "--global-batch-size", "16", "--train-iters", "300",
    "--lr", "2e-3", "--min-lr", "2e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "20",
    "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", "1234",
    "--log-interval", "25", "--eval-interval", "100", "--eval-iters", "4",
]


MLA = [
    "--plugins", "mla", "--multi-latent-attention", "--q-lora-rank", "48",
    "--kv-lora-rank", "16", "--qk-head-dim", "32", "--qk-pos-emb-head-dim", "16",
    "--v-head-dim", "32", "--rope-type", "yarn", "--rotary-scaling-factor", "4",
    "--yarn-original-max-position-embeddings", "32", "--mscale", "1.0", "--mscale-all-dim", "1.0",
    "--recompute-granularity", "selective", "--recompute-modules", "layernorm", "mla_up_proj",
]


MOE = [
    "--plugins", "moe", "--num-experts", "16", "--moe-router-topk", "4",
    "--moe-router-num-groups", "4", "--moe-router-group-topk", "2",
    "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
    "--moe-router-bias-update-rate", "1e-2", "--moe-router-topk-scaling-factor", "2.5",
    "--moe-ffn-hidden-size", "128", "--moe-shared-expert-intermediate-size", "128",
    "--moe-router-load-balancing-type", "none", "--moe-layer-freq", "([0]+[1]*3)",
    "--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "1",
    "--moe-fp8-dispatch",
]


FP8 = [
    "--plugins", "fp8", "--fp8-format", "e4m3", "--fp8-recipe", "blockwise",
    "--fp8-backend", "emulated", "--tensor-model-parallel-size", "1",
    "--fp8-cache-weights",  # each weight quantized once per step, not per micro-batch
    # Every FP8 GEMM reduces over whole 128-wide tiles: 128-multiples where the presets
    # above are smaller (the kv down-projection's 128 + 16 output rows may stay ragged).
    "--ffn-hidden-size", "256",
]
FP8_WITH_MLA = ["--q-lora-rank", "128", "--kv-lora-rank", "128"]


def command(extra: list[str]) -> list[str]:
    presets = {"--mla": MLA, "--moe": MOE, "--fp8": FP8}
    chosen = [a for a in extra if a in presets]
    extra = [a for a in extra if a not in presets]
    for name in chosen:
        extra += presets[name]
    if "--fp8" in chosen and "--mla" in chosen:
        extra += FP8_WITH_MLA
    if extra.count("--plugins") > 1:  # one --plugins flag naming all
        names = [a for i, a in enumerate(extra) if i and extra[i - 1] == "--plugins"]
        extra = [a for i, a in enumerate(extra)
                 if a != "--plugins" and (i == 0 or extra[i - 1] != "--plugins")]
        extra += ["--plugins", *names]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(RANKS), "-m", "integration.pretrain",
            *MODEL, *TRAINING, *extra]


def main(argv: list[str] | None = None) -> None:
    extra = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ, TORCHDYNAMO_DISABLE=os.environ.get("TORCHDYNAMO_DISABLE", "1"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore"))
    raise SystemExit(subprocess.run(command(extra), env=env).returncode)


if __name__ == "__main__":
    main()
