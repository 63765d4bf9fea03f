"""`megaseek describe --preset NAME [FLAGS]`: what a model costs, by arithmetic over its
flags; nothing is built.

    megaseek describe --preset deepseek-v3 --pipeline-model-parallel-size 16 \\
        --expert-model-parallel-size 64 --data-parallel-size 128 --micro-batch-size 1 \\
        --bf16 --use-distributed-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16

prints
- the parameters of the main model and of the MTP modules, total and activated per token;
- per pipeline rank: parameter, gradient and optimizer-state bytes at the layout, and the
  activations kept for backward (per micro-batch, and times the micro-batches the schedule
  keeps in flight: 1F1B P - rank, DualPipe and DualPipeV P + 1);
- training FLOPs per token (forward + backward, for MFU), attention and the routed experts
  a token actually uses included.
`--json` prints every figure as an exact integer instead.

Counting conventions (each checked in tests/integration/test_describe.py against a count made
another way):
- Parameters are those autograd trains (the built model's `numel`): the expert-bias buffer
  (256 numbers a MoE layer at DeepSeek-V3's shape) is not one. The vocabulary is
  `--vocab-size` as given for the model totals, padded as Megatron pads it
  (`--make-vocab-size-divisible-by` x TP) for the per-rank bytes.
- Activated parameters: everything a token's computation reads, that is all but the
  routed experts it is not sent to, with one row of the input embedding (a lookup reads no
  other). DeepSeek-V3: 36.6B, the report's 37B; its README_WEIGHTS counts the main model's
  activated parameters as 36.7B including the 0.9B embedding, which would be 37.6B.
- MTP modules: their own parameters (norms, projection, transformer layer, final norm);
  they share the embedding and the output head with the main model. DeepSeek-V3: 11.6B,
  of which its transformer layer is the 11.5B README_WEIGHTS gives.
- Activation bytes: what autograd keeps for backward in a megaseek layer (unique storages,
  parameters excluded), term by term (`layer_activation_terms`), as the plugins' layers
  save it on a GPU: attention keeps q, k, v, its output and the softmax statistics
  (no s x s matrix); with `--plugins fp8` linear inputs are kept in E4M3 with a float32
  scale per 1x128 tile and the SwiGLU output is recomputed; `--recompute-modules`
  drops what each module recomputes. Dropout is assumed off (as in the presets).
- FLOPs per token: 6 per activated matmul weight (2 forward, 4 backward) plus causal
  attention, q.k and p.v over (s + 1) / 2 keys on average, and the gate-weighted sum of the
  experts' outputs, each 3x its forward for forward + backward. The input embedding is a
  lookup (no FLOPs); recomputation is not counted (MFU counts the model's FLOPs, not the
  run's).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

from integration import presets
from integration.refusals import Parser, refuse

GB = 1e9


class DescribeError(SystemExit):
    """A refusal: printed as every megaseek refusal, `megaseek: error: MESSAGE`, exit
    status 2 (`integration.refusals`)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


# --- the flags -------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    """Just the flags describe reads (every preset's flags among them); any other flag is
    refused by name, never ignored."""
    p = Parser(prog="megaseek describe", add_help=True, allow_abbrev=False)
    a = p.add_argument
    # model
    a("--num-layers", type=int)
    a("--hidden-size", type=int)
    a("--ffn-hidden-size", type=int)
    a("--num-attention-heads", type=int)
    a("--kv-channels", type=int)
    a("--group-query-attention", action="store_true")
    a("--num-query-groups", type=int)
    a("--seq-length", type=int)
    a("--max-position-embeddings", type=int)
    a("--vocab-size", type=int, default=257,
      help="default: the built-in byte corpus's 257 (megaseek pretrain's fallback)")
    a("--make-vocab-size-divisible-by", type=int, default=128)
    a("--swiglu", action="store_true")
    a("--normalization", choices=["RMSNorm", "LayerNorm"], default="LayerNorm")
    a("--disable-bias-linear", action="store_true")
    a("--untie-embeddings-and-output-weights", action="store_true")
    a("--mtp-num-layers", type=int, default=0)
    a("--mtp-loss-scaling-factor", type=float,
      help="read and checked (megaseek pretrain's checks), but changes no figure")
    a("--spec", nargs=2, metavar=("MODULE", "FUNCTION"),
      help="only the DeepSeek-V3 decoder (integration.deepseek_v3 decoder_spec), which the "
           "MLA and MoE flags describe")
    a("--attention-dropout", type=float, default=0.1)
    a("--hidden-dropout", type=float, default=0.1)
    # MLA
    a("--multi-latent-attention", action="store_true")
    a("--q-lora-rank", type=int)
    a("--kv-lora-rank", type=int, default=32)
    a("--qk-head-dim", type=int, default=128)
    a("--qk-pos-emb-head-dim", type=int, default=64)
    a("--v-head-dim", type=int, default=128)
    # MoE
    a("--num-experts", type=int)
    a("--moe-ffn-hidden-size", type=int)
    a("--moe-shared-expert-intermediate-size", type=int)
    a("--moe-shared-expert-gate", action="store_true")
    a("--moe-layer-freq", default="1")
    a("--moe-router-topk", type=int, default=2)
    # plugins and precision
    a("--plugins", nargs="+", default=[])
    a("--bf16", action="store_true")
    a("--fp8-format", choices=["e4m3"])
    a("--fp8-recipe", choices=["blockwise"])
    a("--fp8-cache-weights", action="store_true")
    a("--fp8-exclude-modules", nargs="+", default=[])
    a("--moe-fp8-dispatch", action="store_true")
    # layout and schedule
    a("--tensor-model-parallel-size", type=int, default=1)
    a("--pipeline-model-parallel-size", type=int, default=1)
    a("--expert-model-parallel-size", type=int, default=1)
    a("--data-parallel-size", type=int, default=1,
      help="describe's own: the data-parallel ranks (Megatron derives them from the world "
           "size); they divide the distributed optimizer's state")
    a("--decoder-first-pipeline-num-layers", type=int)
    a("--decoder-last-pipeline-num-layers", type=int)
    a("--pipeline-schedule", choices=["1f1b", "dualpipe", "dualpipev"], default="1f1b")
    a("--micro-batch-size", type=int, default=1)
    # recomputation and optimizer state
    a("--recompute-granularity", choices=["full", "selective"])
    a("--recompute-modules", nargs="*")
    a("--recompute-method", choices=["uniform"])
    a("--recompute-num-layers", type=int, default=1)
    a("--use-distributed-optimizer", action="store_true")
    a("--main-grads-dtype", choices=["fp32", "bf16"], default="fp32")
    a("--exp-avg-dtype", choices=["fp32", "bf16"], default="fp32")
    a("--exp-avg-sq-dtype", choices=["fp32", "bf16"], default="fp32")
    a("--json", action="store_true", help="every figure as an exact integer, in JSON")
    # Read, but they change no figure here: the positional encoding's settings and the
    # router's and balance loss's settings.
    for flag in ("--position-embedding-type", "--rope-type", "--rotary-base",
                 "--rotary-scaling-factor",
                 "--yarn-original-max-position-embeddings", "--yarn-beta-fast",
                 "--yarn-beta-slow", "--mscale", "--mscale-all-dim", "--norm-epsilon",
                 "--moe-router-num-groups", "--moe-router-group-topk",
                 "--moe-router-score-function", "--moe-router-bias-update-rate",
                 "--moe-router-topk-scaling-factor", "--moe-router-dtype",
                 "--moe-router-load-balancing-type", "--moe-aux-loss-coeff",
                 "--fp8-backend"):
        a(flag)
    for flag in ("--moe-router-enable-expert-bias", "--no-rope-fusion"):
        a(flag, action="store_true")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    argv = presets.expand(list(argv), announce=False)
    args, unknown = parser().parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        raise DescribeError(f"{flag} is not a flag describe understands "
                            "(it reads the model's flags, the parallel layout, the micro-batch, "
                            "recomputation, FP8 and optimizer-state options; see --help)")
    missing = [flag for flag in ("--num-layers", "--hidden-size", "--num-attention-heads",
                                 "--seq-length")
               if getattr(args, flag[2:].replace("-", "_")) is None]
    if missing:
        raise DescribeError(f"give {', '.join(missing)} (or a --preset)")
    return check(args)


RECOMPUTE_NAMES = ("layernorm", "mla_up_proj", "mlp", "moe", "moe_act", "shared_experts")


def check(args: argparse.Namespace) -> argparse.Namespace:
    from integration import argument_checks
    from plugins import PluginError

    try:  # the flags describe shares with a run get a run's start-up checks
        argument_checks.check_values(args)
    except PluginError as error:
        raise DescribeError(f"{error}") from None
    for flag in ("--hidden-size", "--num-attention-heads"):
        if getattr(args, flag[2:].replace("-", "_")) < 1:
            raise DescribeError(f"{flag} "
                                f"{getattr(args, flag[2:].replace('-', '_'))} must be 1 or more")
    if args.spec is not None and args.spec != ["integration.deepseek_v3", "decoder_spec"]:
        raise DescribeError(f"--spec {' '.join(args.spec)}: describe counts "
                            "only the DeepSeek-V3 decoder (--spec integration.deepseek_v3 "
                            "decoder_spec) or Megatron's GPT layers the flags give")
    if not args.disable_bias_linear:
        raise DescribeError("describe counts models without linear biases (as "
                            "DeepSeek's); give --disable-bias-linear")
    if args.attention_dropout or args.hidden_dropout:
        raise DescribeError("describe counts activations without dropout (as "
                            "DeepSeek's); give --attention-dropout 0 --hidden-dropout 0")
    if args.recompute_granularity == "selective":
        unknown = sorted(set(args.recompute_modules or ["core_attn"]) - set(RECOMPUTE_NAMES))
        if unknown:
            raise DescribeError(f"--recompute-modules {' '.join(unknown)}: "
                                f"describe knows {', '.join(RECOMPUTE_NAMES)}")
    if args.fp8_exclude_modules:
        raise DescribeError("--fp8-exclude-modules is not modelled yet: "
                            "its activation bytes count every linear's input in FP8 under "
                            "--plugins fp8; describe without it")
    if args.multi_latent_attention and "mla" not in args.plugins:
        raise DescribeError("--multi-latent-attention counts the mla "
                            "plugin's attention: give --plugins mla")
    if args.num_experts and "moe" not in args.plugins:
        raise DescribeError("--num-experts counts the moe plugin's layer: "
                            "give --plugins moe")
    for flag, size in (("--tensor-model-parallel-size", args.tensor_model_parallel_size),
                       ("--pipeline-model-parallel-size", args.pipeline_model_parallel_size),
                       ("--expert-model-parallel-size", args.expert_model_parallel_size),
                       ("--data-parallel-size", args.data_parallel_size),
                       ("--micro-batch-size", args.micro_batch_size)):
        if size < 1:
            raise DescribeError(f"{flag} {size} must be 1 or more")
    if args.num_attention_heads % args.tensor_model_parallel_size:
        raise DescribeError(f"--num-attention-heads "
                            f"{args.num_attention_heads} is not divisible by "
                            f"--tensor-model-parallel-size {args.tensor_model_parallel_size}")
    if args.num_experts and args.num_experts % args.expert_model_parallel_size:
        raise DescribeError(f"--num-experts {args.num_experts} is not "
                            f"divisible by --expert-model-parallel-size "
                            f"{args.expert_model_parallel_size}")
    ep = args.expert_model_parallel_size
    if (args.tensor_model_parallel_size * args.data_parallel_size) % ep:
        raise DescribeError(f"--expert-model-parallel-size {ep} must divide "
                            "--tensor-model-parallel-size x --data-parallel-size (Megatron "
                            "folds expert parallelism into those ranks)")
    return args


# --- the model -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Model:
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    untied: bool
    swiglu: bool
    norm: int                 # numbers per normalization: 1 (RMSNorm) or 2 (LayerNorm)
    mla: bool
    q_lora: int | None
    kv_lora: int
    qk: int                   # MLA: per-head q/k width without RoPE; else kv_channels
    rope: int                 # MLA: the decoupled RoPE width (0 for standard attention)
    v: int
    query_groups: int
    experts: int
    moe_ffn: int
    shared_ffn: int
    shared_gate: bool
    topk: int
    moe_pattern: tuple[int, ...]
    mtp_layers: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Model":
        layers, hidden, heads = args.num_layers, args.hidden_size, args.num_attention_heads
        kv_channels = args.kv_channels or hidden // heads
        pattern = _moe_pattern(args.moe_layer_freq, layers) if args.num_experts else (0,) * layers
        return cls(
            layers=layers, hidden=hidden, heads=heads, ffn=args.ffn_hidden_size or 4 * hidden,
            vocab=args.vocab_size, untied=args.untie_embeddings_and_output_weights,
            swiglu=args.swiglu, norm=1 if args.normalization == "RMSNorm" else 2,
            mla=args.multi_latent_attention, q_lora=args.q_lora_rank, kv_lora=args.kv_lora_rank,
            qk=args.qk_head_dim if args.multi_latent_attention else kv_channels,
            rope=args.qk_pos_emb_head_dim if args.multi_latent_attention else 0,
            v=args.v_head_dim if args.multi_latent_attention else kv_channels,
            query_groups=(args.num_query_groups or heads) if args.group_query_attention else heads,
            experts=args.num_experts or 0,
            moe_ffn=args.moe_ffn_hidden_size or args.ffn_hidden_size or 4 * hidden,
            shared_ffn=args.moe_shared_expert_intermediate_size or 0,
            shared_gate=args.moe_shared_expert_gate, topk=args.moe_router_topk,
            moe_pattern=pattern, mtp_layers=args.mtp_num_layers or 0)

    def fp8_linears(self) -> list[str]:
        """The linears `--plugins fp8` runs in FP8, by their place in a layer (all of a
        layer's; embedding, head, router, norms and attention core stay in the training
        dtype)."""
        if self.mla:
            attention = (["linear_q_down_proj", "linear_q_up_proj"] if self.q_lora
                         else ["linear_q_proj"]) + ["linear_kv_down_proj", "linear_kv_up_proj"]
        else:
            attention = ["linear_qkv"]
        linears = [f"self_attention.{name}" for name in attention + ["linear_proj"]]
        moe = [self.is_moe(layer) for layer in range(self.layers)]
        if not all(moe):
            linears += ["mlp.linear_fc1", "mlp.linear_fc2"]
        if any(moe):
            linears.append("mlp.experts")
            if self.shared_ffn:
                linears += ["mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2"]
        return linears

    def is_moe(self, layer: int) -> bool:
        """Layer 0-based; MTP layers are built like the decoder's last layer."""
        return bool(self.moe_pattern[min(layer, self.layers - 1)])


def _moe_pattern(freq: str, layers: int) -> tuple[int, ...]:
    """Megatron's --moe-layer-freq: a list expression, or N (every N-th layer is MoE)."""
    if "[" in str(freq):
        pattern = tuple(int(x) for x in eval(str(freq), {"__builtins__": {}}, {}))  # noqa: S307
        if len(pattern) != layers:
            raise DescribeError(f"--moe-layer-freq {freq} lists "
                                f"{len(pattern)} layers, not --num-layers {layers}")
        return pattern
    n = int(freq)
    return tuple(int(i % n == 0) for i in range(layers))


@dataclass
class Count:
    """Parameters of a part, by how the layout splits them."""

    replicated: int = 0    # every TP rank holds them whole (norms, MLA down-projections, router)
    tensor: int = 0        # split over the TP ranks
    expert: int = 0        # split over the EP ranks (the routed experts)
    activated: int = 0     # read by one token's computation

    @property
    def total(self) -> int:
        return self.replicated + self.tensor + self.expert

    def __add__(self, other: "Count") -> "Count":
        return Count(self.replicated + other.replicated, self.tensor + other.tensor,
                     self.expert + other.expert, self.activated + other.activated)

    def __mul__(self, n: int) -> "Count":
        return Count(self.replicated * n, self.tensor * n, self.expert * n, self.activated * n)


def dense(replicated: int = 0, tensor: int = 0) -> Count:
    return Count(replicated=replicated, tensor=tensor, activated=replicated + tensor)


def attention_params(m: Model) -> Count:
    h, n = m.hidden, m.heads
    if m.mla:
        qk = m.qk + m.rope
        if m.q_lora:
            q = dense(replicated=h * m.q_lora + m.q_lora, tensor=m.q_lora * n * qk)
        else:
            q = dense(tensor=h * n * qk)
        kv = dense(replicated=h * (m.kv_lora + m.rope) + m.kv_lora,
                   tensor=m.kv_lora * n * (m.qk + m.v))
        return q + kv + dense(tensor=n * m.v * h)
    return dense(tensor=h * (n + 2 * m.query_groups) * m.qk + n * m.qk * h)


def mlp_params(m: Model, ffn: int) -> int:
    return m.hidden * ffn * (2 if m.swiglu else 1) + ffn * m.hidden


def layer_params(m: Model, layer: int) -> Count:
    """One transformer layer (0-based; MTP's inner layer is built like the last one)."""
    count = dense(replicated=2 * m.norm * m.hidden) + attention_params(m)
    if not m.is_moe(layer):
        return count + dense(tensor=mlp_params(m, m.ffn))
    expert = m.hidden * m.moe_ffn * 2 + m.moe_ffn * m.hidden  # the plugin's experts: SwiGLU
    count += dense(replicated=m.experts * m.hidden)  # router
    count += Count(expert=m.experts * expert, activated=m.topk * expert)
    if m.shared_ffn:
        count += dense(tensor=mlp_params(m, m.shared_ffn))
        if m.shared_gate:
            count += dense(replicated=m.hidden)
    return count


def mtp_layer_params(m: Model) -> Count:
    """enorm, hnorm, eh_proj ([2h -> h]), the inner layer, the final norm."""
    return (dense(replicated=3 * m.norm * m.hidden, tensor=2 * m.hidden * m.hidden)
            + layer_params(m, m.layers))


def embedding_params(m: Model, vocab: int) -> Count:
    return Count(tensor=vocab * m.hidden, activated=m.hidden)


def head_params(m: Model, vocab: int) -> Count:
    """Final norm and (untied) output layer."""
    return dense(replicated=m.norm * m.hidden) + (dense(tensor=vocab * m.hidden) if m.untied
                                                   else Count())


def model_params(m: Model) -> dict[str, Count]:
    main = embedding_params(m, m.vocab) + head_params(m, m.vocab)
    for layer in range(m.layers):
        main += layer_params(m, layer)
    mtp = Count()
    for _ in range(m.mtp_layers):
        mtp += mtp_layer_params(m)
    return {"main": main, "mtp": mtp}


# --- FLOPs -----------------------------------------------------------------------------------

def attention_flops_per_token(m: Model, seq: int) -> int:
    """Forward FLOPs of q.k and p.v for one token of a causal sequence, averaged over the
    sequence ((s + 1) / 2 keys a query), all heads."""
    width_qk, width_v = m.qk + m.rope, m.v
    return 2 * m.heads * (width_qk + width_v) * (seq + 1) // 2


def training_flops_per_token(m: Model, seq: int) -> dict[str, int]:
    """Forward + backward FLOPs per token: 6 per activated matmul weight, 3x the attention's
    forward. Main model and MTP modules (which also run the shared output head)."""
    def matmul_weights(count: Count, norms: int) -> int:
        return count.activated - norms

    def combine(layer: int) -> int:  # the experts' outputs weighed by the gates, summed
        return 3 * 2 * m.topk * m.hidden if m.is_moe(layer) else 0

    main_weights = 0
    for layer in range(m.layers):
        main_weights += matmul_weights(layer_params(m, layer), _norm_numbers(m, layer))
    head = m.vocab * m.hidden
    main = (6 * (main_weights + head) + 3 * m.layers * attention_flops_per_token(m, seq)
            + sum(combine(layer) for layer in range(m.layers)))
    mtp = 0
    for _ in range(m.mtp_layers):
        weights = matmul_weights(mtp_layer_params(m),
                                 _norm_numbers(m, m.layers) + 3 * m.norm * m.hidden)
        mtp += 6 * (weights + head) + 3 * attention_flops_per_token(m, seq) + combine(m.layers)
    return {"main": main, "mtp": mtp, "total": main + mtp}


def _norm_numbers(m: Model, layer: int) -> int:
    """The activated parameters of a layer that no matmul reads: its norms' weights
    (the router's is a matmul weight)."""
    latent = (m.q_lora or 0) + m.kv_lora if m.mla else 0
    return m.norm * (2 * m.hidden + latent)


# --- activations -----------------------------------------------------------------------------

FP8_BYTES = 1 + 4 / 128  # an E4M3 byte plus a float32 scale per 1x128 tile


@dataclass(frozen=True)
class Precision:
    element: int = 2          # bytes of an activation in the training dtype
    fp8: bool = False         # --plugins fp8: linear inputs kept in FP8
    cpu_attention: bool = False  # CPU flash kernel: v padded to the q/k width


def layer_activation_terms(m: Model, layer: int, tokens: int, sequence: int,
                           recompute: frozenset[str] = frozenset(), tp: int = 1,
                           precision: Precision = Precision()) -> dict[str, float]:
    """Bytes autograd keeps for backward in one layer for one micro-batch of `tokens`
    tokens (`sequence` positions each), by what keeps them. Heads and FFN widths are this
    TP rank's; `recompute` holds Megatron's --recompute-modules names."""
    e, h, t = precision.element, m.hidden, tokens
    f32, fp8 = 4, precision.fp8

    def lin(width: int) -> float:
        """A linear's input as it keeps it: the tensor, or with --plugins fp8 x^T in FP8 as
        Wgrad takes it, 1x128 tiles along tokens, the token count padded to whole tiles."""
        return (t + -t % 128) * width * FP8_BYTES if fp8 else t * width * e

    def norm_out(width: int, linears: int = 1) -> float:
        """A norm's output, kept as its linears' input: recomputed with `layernorm`; under
        FP8 every linear keeps its own FP8 copy (which nothing recomputes)."""
        if fp8:
            return linears * lin(width)
        return 0 if "layernorm" in recompute else lin(width)

    terms: dict[str, float] = {}
    # Attention: the input norm keeps its input and statistics; its output is the
    # down-projections' input (one storage; two FP8 copies under fp8).
    terms["input norm"] = t * h * e + t * f32
    n = m.heads // tp
    if not m.mla:
        raise DescribeError("activation bytes are counted for MLA layers "
                            "(--multi-latent-attention) only")
    terms["down-projections' input"] = norm_out(h, 2)  # q (down or whole) and kv down
    if m.q_lora:
        terms["q latent norm"] = t * m.q_lora * e + t * f32
        terms["q up-projection input"] = norm_out(m.q_lora)
    # The kv down-projection's whole output (latent and RoPE key) is one storage (the FP8
    # down-projection computes whole 128-row weight blocks, 576 -> 640 at DeepSeek-V3's,
    # and returns the 576 as a copy of their own)
    kv_out = m.kv_lora + m.rope
    terms["kv latent norm"] = t * kv_out * e + t * f32
    terms["kv up-projection input"] = norm_out(m.kv_lora)
    terms["RoPE tables"] = 4 * sequence * (m.rope // 2) * e  # cos, sin for q and k rows
    qk = m.qk + m.rope
    # PyTorch's CPU flash kernel takes one head width: v is padded to q's (and back).
    qk_w = max(qk, m.v) if precision.cpu_attention else qk
    v_w = max(qk, m.v) if precision.cpu_attention else m.v
    up = "mla_up_proj" not in recompute
    terms["attention q, k"] = 2 * t * n * qk_w * e if up else 0
    terms["attention v"] = t * n * v_w * e if up else 0
    terms["attention output, softmax statistics"] = t * n * v_w * e + t * n * f32
    terms["output projection input"] = lin(n * m.v)
    terms["pre-MLP norm"] = t * h * e + t * f32
    if not m.is_moe(layer):
        if "mlp" in recompute:
            terms["MLP input"] = norm_out(h) if "layernorm" not in recompute else 0
            return terms
        terms["MLP input"] = norm_out(h)
        terms.update(_swiglu(m, m.ffn // tp, t, e, fp8, "MLP"))
        return terms
    if "moe" in recompute:  # the whole MoE layer reruns from its input
        terms["MoE input"] = norm_out(h)
        return terms
    k, x = m.topk, m.experts
    lowp = e != f32  # the router's fp32 copies are new tensors (in fp32 they are the input)
    norm_recomputed = "layernorm" in recompute
    # The router runs in fp32 on an fp32 copy of its input (the norm's output itself when
    # training in fp32, then recomputed with `layernorm`): scores (and, below fp32, the
    # logits), the chosen indices (int64), their gates and normaliser.
    terms["router input (fp32)"] = 0 if norm_recomputed and not lowp else t * h * f32
    terms["router"] = (2 if lowp else 1) * t * x * f32 + t * k * 8 + t * k * f32 + t * f32
    # The shared experts' input: the norm's output (a storage of its own below fp32); under
    # FP8 their fc1 keeps its own FP8 copy.
    if m.shared_ffn and "shared_experts" not in recompute:
        if fp8:
            terms["shared experts' fc1 input"] = lin(h)
        elif lowp:
            terms["shared experts' fc1 input"] = 0 if norm_recomputed else t * h * e
    # Dispatch and combine bookkeeping: fp32 token rows (one, or two below fp32) and two
    # fp32 numbers a token; tokens per expert (int32) twice a micro-batch (not kept by the
    # FP8 experts).
    terms["dispatch"] = ((2 if lowp else 1) * t * h * f32 + 2 * t * f32
                         + (0 if fp8 else 2 * x * 4))
    terms["experts' input"] = t * k * h * (FP8_BYTES if fp8 else e)
    act = "moe_act" in recompute
    if fp8:
        terms["experts' SwiGLU input"] = t * k * 2 * m.moe_ffn * FP8_BYTES
        # As measured on the emulated backend: quantizing the SwiGLU output for fc2 keeps
        # three fp32 tensors of its size and 17 bytes per 1x128 tile (its scales among
        # them), besides the E4M3 bytes fc2 reads.
        tiles = -(-m.moe_ffn // 128)
        terms["experts' fc2 input (quantization)"] = (3 * t * k * m.moe_ffn * f32
                                                      + 17 * t * k * tiles)
        terms["experts' fc2 input"] = t * k * m.moe_ffn
    else:
        terms["experts' SwiGLU input"] = t * k * 2 * m.moe_ffn * e
        # SiLU of the gate and the product; `moe_act` recomputes both from fc1's output.
        terms["experts' SwiGLU"] = 0 if act else 2 * t * k * m.moe_ffn * e
    # The experts' outputs, weighed by the gates in fp32.
    terms["experts' output, gates (fp32)"] = t * k * h * f32 + t * k * f32
    if m.shared_ffn:
        if "shared_experts" in recompute:
            terms["shared experts"] = 0
        else:
            terms.update(_swiglu(m, m.shared_ffn // tp, t, e, fp8, "shared experts"))
    return terms


def _swiglu(m: Model, ffn: int, t: int, e: int, fp8: bool, label: str) -> dict[str, float]:
    """What an MLP keeps past its input: Megatron's unfused SwiGLU keeps fc1's output, the
    SiLU of the gate and the product; fc2 its input. The FP8 MLP keeps fc1's output (the
    SwiGLU input) and fc2's input in FP8, recomputing the SwiGLU output."""
    width = ffn * (2 if m.swiglu else 1)
    if fp8:
        return {f"{label} SwiGLU input": t * width * FP8_BYTES,
                f"{label} fc2 input": (t + -t % 128) * ffn * FP8_BYTES}  # x^T, as `lin`
    return {f"{label} fc1 output": t * width * e,
            f"{label} SwiGLU": (2 * t * ffn * e) if m.swiglu else t * ffn * e,
            f"{label} fc2 input": t * ffn * e}


def layer_activation_bytes(*args, **kwargs) -> int:
    return math.ceil(sum(layer_activation_terms(*args, **kwargs).values()))


# --- the layout ------------------------------------------------------------------------------

@dataclass
class Stage:
    layers: list[int]
    embedding: bool = False
    head: bool = False        # final norm, output layer, MTP modules (and their embedding)


def stages(args: argparse.Namespace) -> list[list[Stage]]:
    """Each pipeline rank's model chunks: 1F1B one stage a rank; DualPipeV 2P stages, rank r
    holding r and 2P-1-r (both ends on rank 0); DualPipe P stages in each of two
    directions, rank r holding stage r of one and P-1-r of the other."""
    p, layers, schedule = args.pipeline_model_parallel_size, args.num_layers, args.pipeline_schedule
    count = 2 * p if schedule == "dualpipev" else p
    if schedule != "1f1b":
        if args.decoder_first_pipeline_num_layers or args.decoder_last_pipeline_num_layers:
            raise DescribeError(f"--pipeline-schedule {schedule} places its "
                                "own stages: drop --decoder-first/last-pipeline-num-layers")
        if p < 2:
            raise DescribeError(f"--pipeline-schedule {schedule} needs "
                                "--pipeline-model-parallel-size 2 or more")
    sizes = _stage_sizes(layers, count, args.decoder_first_pipeline_num_layers,
                         args.decoder_last_pipeline_num_layers, schedule)
    starts = [sum(sizes[:i]) for i in range(count)]
    cut = [Stage(list(range(starts[i], starts[i] + sizes[i])), embedding=i == 0,
                 head=i == count - 1) for i in range(count)]
    if schedule == "dualpipev":
        return [[cut[r], cut[2 * p - 1 - r]] for r in range(p)]
    if schedule == "dualpipe":  # both directions: every stage twice, rank r holds r and P-1-r
        return [[cut[r], cut[p - 1 - r]] for r in range(p)]
    return [[cut[r]] for r in range(p)]


def _stage_sizes(layers: int, count: int, first: int | None, last: int | None,
                 schedule: str = "1f1b") -> list[int]:
    fixed = [first, last] if count > 1 else [first]
    middle = count - sum(1 for x in fixed if x is not None)
    rest = layers - sum(x for x in fixed if x is not None)
    if middle == 0:
        if rest:
            raise DescribeError(f"the first/last stage layers do not add up "
                                f"to --num-layers {layers}")
        return [first, last][:count]
    if rest % middle or rest < 0:
        # Only 1F1B takes uneven first/last stages; the DualPipe schedules refuse them.
        hint = ("give --decoder-first-pipeline-num-layers and/or "
                "--decoder-last-pipeline-num-layers" if schedule == "1f1b" else
                f"--pipeline-schedule {schedule} cuts equal stages: give a --num-layers that "
                f"{count} divides, or another --pipeline-model-parallel-size")
        raise DescribeError(f"--num-layers {layers} cannot be cut into "
                            f"{count} pipeline stages of equal size ({hint})")
    each = rest // middle
    return [first if first is not None else each] + [each] * (count - 2) + (
        [last if last is not None else each] if count > 1 else [])


def padded_vocab(args) -> int:
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return -(-args.vocab_size // multiple) * multiple


def rank_params(m: Model, args, chunks: list[Stage]) -> tuple[int, int, int]:
    """(dense, expert, fp8-linear) parameters a rank holds (this TP/EP rank's shares)."""
    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    vocab = padded_vocab(args)
    total = Count()
    for stage in chunks:
        for layer in stage.layers:
            total += layer_params(m, layer)
        if stage.embedding:
            total += embedding_params(m, vocab)
        if stage.head:
            total += head_params(m, vocab) + mtp_layer_params(m) * m.mtp_layers
            if m.mtp_layers and not stage.embedding:  # MTP embeds on the last stage too
                total += embedding_params(m, vocab)
    fp8 = 0
    if "fp8" in args.plugins:
        for stage in chunks:
            for layer in stage.layers + ([m.layers] * m.mtp_layers if stage.head else []):
                c = layer_params(m, layer)
                router = m.experts * m.hidden if m.is_moe(layer) else 0
                fp8 += (c.tensor // tp + c.expert // ep
                        + c.replicated - _norm_numbers(m, layer) - router)
    return total.replicated + total.tensor // tp, total.expert // ep, fp8


def recompute_set(args) -> tuple[frozenset[str], bool]:
    if args.recompute_granularity == "full":
        return frozenset(), True
    if args.recompute_granularity == "selective":
        return frozenset(args.recompute_modules or ["core_attn"]), False
    return frozenset(), False


def chunk_activation(m: Model, args, stage: Stage, precision: Precision) -> int:
    """Bytes kept for backward by one micro-batch through one chunk."""
    tokens = args.micro_batch_size * args.seq_length
    tp = args.tensor_model_parallel_size
    modules, full = recompute_set(args)

    def layer(number: int) -> int:
        if full:  # each layer keeps only its input
            return tokens * m.hidden * precision.element
        return layer_activation_bytes(m, number, tokens, args.seq_length, modules, tp, precision)

    total = sum(layer(number) for number in stage.layers)
    if stage.embedding:
        total += tokens * 8  # the token ids the embedding lookup keeps (int64)
    if stage.head:
        total += head_activation_bytes(m, tokens, tp, precision)
        total += m.mtp_layers * (layer(m.layers) + mtp_extra_activation_bytes(m, tokens, precision))
    return total


def mtp_extra_activation_bytes(m: Model, tokens: int, precision: Precision) -> int:
    """An MTP module besides its transformer layer: its three RMSNorms (enorm, hnorm and
    the final norm, Megatron's: input and output in fp32, and statistics), eh_proj's [2h]
    input, and the shifted token ids its embedding lookup keeps (int64)."""
    return tokens * (3 * (2 * m.hidden * 4 + 4) + 2 * m.hidden * precision.element + 8)


def head_activation_bytes(m: Model, tokens: int, tp: int, precision: Precision) -> int:
    """The final norm (Megatron's, as the MTP modules' norms: input and output in fp32,
    statistics), then per prediction (the main model's and each MTP module's) the output
    layer's input and the loss's fp32 softmax over this TP rank's vocabulary."""
    e, predictions = precision.element, 1 + m.mtp_layers
    return tokens * (2 * m.hidden * 4 + 4
                     + predictions * (m.hidden * e + 4 * (-(-m.vocab // tp))))


def in_flight(args, rank: int) -> int:
    p = args.pipeline_model_parallel_size
    return p - rank if args.pipeline_schedule == "1f1b" else p + 1


# --- the report ------------------------------------------------------------------------------

def describe(args: argparse.Namespace) -> dict:
    m = Model.from_args(args)
    params = model_params(m)
    flops = training_flops_per_token(m, args.seq_length)
    precision = Precision(element=2 if args.bf16 else 4, fp8="fp8" in args.plugins)
    weight = 2 if args.bf16 else 4
    grad = 2 if args.main_grads_dtype == "bf16" else 4
    moments = ((2 if args.exp_avg_dtype == "bf16" else 4)
               + (2 if args.exp_avg_sq_dtype == "bf16" else 4))
    master = 4 if args.bf16 else 0
    tp, ep, dp = (args.tensor_model_parallel_size, args.expert_model_parallel_size,
                  args.data_parallel_size)
    expert_dp = tp * dp // ep
    per_rank = []
    ranks = stages(args)
    for rank, chunks in enumerate(ranks):
        dense_n, expert_n, fp8_n = rank_params(m, args, chunks)
        n = dense_n + expert_n
        state = (master + moments)
        optimizer = (state * dense_n // dp + state * expert_n // expert_dp
                     if args.use_distributed_optimizer else state * n)
        per_microbatch = [chunk_activation(m, args, stage, precision) for stage in chunks]
        flight = in_flight(args, rank)
        activations = (flight * max(per_microbatch) if args.pipeline_schedule == "1f1b"
                       else flight * sum(per_microbatch) // len(per_microbatch))
        # --fp8-cache-weights holds W and W^T in E4M3, each with a float32 scale a block
        cache = 2 * math.ceil(fp8_n * (1 + 4 / (128 * 128))) if args.fp8_cache_weights else 0
        per_rank.append({
            "rank": rank, "layers": [s.layers for s in chunks],
            "embedding": any(s.embedding for s in chunks), "head": any(s.head for s in chunks),
            "parameters": n, "parameter_bytes": weight * n, "gradient_bytes": grad * n,
            "optimizer_bytes": optimizer, "fp8_weight_cache_bytes": cache,
            "activation_bytes_per_microbatch": per_microbatch,
            "microbatches_in_flight": flight, "activation_bytes": activations,
            "total_bytes": weight * n + grad * n + optimizer + cache + activations,
        })
    return {
        "model": {"main": asdict(params["main"]) | {"total": params["main"].total},
                  "mtp": asdict(params["mtp"]) | {"total": params["mtp"].total}},
        "flops_per_token": flops,
        "layout": {"tp": tp, "pp": args.pipeline_model_parallel_size, "ep": ep, "dp": dp,
                   "expert_dp": expert_dp, "schedule": args.pipeline_schedule,
                   "micro_batch": args.micro_batch_size, "seq_length": args.seq_length,
                   "recompute": args.recompute_granularity,
                   "recompute_modules": args.recompute_modules,
                   "bytes": {"weight": weight, "grad": grad, "master": master,
                             "moments": moments, "activation": precision.element,
                             "fp8_activations": precision.fp8},
                   "distributed_optimizer": args.use_distributed_optimizer},
        "fp8_linears": m.fp8_linears() if precision.fp8 else [],
        "per_rank": per_rank,
    }


def _b(n: float) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def _flop(n: float) -> str:
    """A FLOP count in the largest unit that leaves a figure of 1 or more (a tiny model's
    25 MFLOP is not 0.0 GFLOP)."""
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} FLOP"


def render(report: dict) -> str:
    main, mtp = report["model"]["main"], report["model"]["mtp"]
    layout, flops = report["layout"], report["flops_per_token"]
    lines = [
        f"parameters    main model {_b(main['total'])} total, {_b(main['activated'])} activated "
        f"per token",
        (f"              MTP modules {_b(mtp['total'])} total, {_b(mtp['activated'])} activated "
         "(sharing the main model's embedding and output head)" if mtp["total"]
         else "              no MTP modules"),
        f"FLOPs/token   {_flop(flops['total'])} training (forward + backward): main "
        f"{_flop(flops['main'])}, MTP {_flop(flops['mtp'])}",
        f"layout        TP {layout['tp']} x PP {layout['pp']} ({layout['schedule']}) x EP "
        f"{layout['ep']}, DP {layout['dp']} (expert DP {layout['expert_dp']}); micro-batch "
        f"{layout['micro_batch']} x {layout['seq_length']} tokens; recompute "
        f"{layout['recompute'] or 'none'}"
        + (f" {' '.join(layout['recompute_modules'] or [])}"
           if layout["recompute"] == "selective" else "")
        + f"; bytes/param: weight {layout['bytes']['weight']}, grad {layout['bytes']['grad']}, "
        f"optimizer {layout['bytes']['master'] + layout['bytes']['moments']}"
        + (" (distributed)" if layout["distributed_optimizer"] else ""),
    ]
    if report["fp8_linears"]:
        lines.append(f"FP8           {', '.join(report['fp8_linears'])} (embedding, head, router, "
                     "norms and attention core in the training dtype)")
    lines += [
        "",
        f"{'rank':>4}  {'layers':<18} {'params':>7} {'weights':>9} {'grads':>9} {'optim':>9} "
        f"{'act/mb':>9} {'x':>2} {'activ.':>9} {'total':>9}",
    ]
    for r in report["per_rank"]:
        where = ",".join(f"{s[0]}-{s[-1]}" if s else "-" for s in r["layers"])
        where += ("+E" if r["embedding"] else "") + ("+H" if r["head"] else "")
        lines.append(
            f"{r['rank']:>4}  {where:<18} {_b(r['parameters']):>7} "
            f"{_gb(r['parameter_bytes']):>9} {_gb(r['gradient_bytes']):>9} "
            f"{_gb(r['optimizer_bytes']):>9} "
            f"{_gb(max(r['activation_bytes_per_microbatch'])):>9} {r['microbatches_in_flight']:>2} "
            f"{_gb(r['activation_bytes']):>9} {_gb(r['total_bytes']):>9}")
    lines.append("(layers 0-based; +E embedding, +H final norm, output head and MTP modules; "
                 "act/mb: one micro-batch through the rank's largest chunk; x: micro-batches "
                 "in flight)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(argv)
        report = describe(args)
    except DescribeError as error:
        refuse(error.message)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    name, _ = presets.split(argv)
    if name:
        print(f"--preset {name}: {presets.PRESETS[name].summary}")
    print(render(report))


if __name__ == "__main__":
    main()
