"""`--preset NAME`: a model's Megatron flags (architecture and plugins) under one name.

    megaseek pretrain --preset deepseek-v3 --tensor-model-parallel-size 1 ...

`expand(argv)` replaces `--preset NAME` with the preset's flags and prints them once at
start-up (rank 0): `megaseek: --preset NAME: <flags>`. What the user expects of a preset is
a default, not a cage:
- every flag the user also gives wins: the preset's flag of that name is dropped, whatever
  the user's value (options are compared by name, `--flag=value` included);
- `--plugins` given by the user is the whole list: the preset's plugin list is dropped, and
  so are the preset's flags that belong to a plugin the user left out (with `--preset
  deepseek-v3 --plugins mla moe`, no FP8 flag is left behind to be refused as orphaned;
  leaving `mla` out drops the MLA flags, so the model gets Megatron's standard attention);
- a user value that contradicts the preset (more layers than the preset's
  `--moe-layer-freq` lists, experts not divisible into the preset's groups, ...) fails at
  once, naming both flags and the preset, instead of failing later inside Megatron.
Presets hold the model, not the run: no parallel layout, batch sizes or learning rates. A
preset's `--vocab-size` is the model's; without `--data-path` or `--mock-data`,
`megaseek pretrain` trains on the built-in byte corpus with its own tokenizer, whose
`--vocab-size 257` comes after the preset's flags and so replaces it (give a tokenizer to
keep the model's vocabulary).

Where each figure comes from (`SOURCES` holds the same, per preset):
- `deepseek-v3`: deepseek-ai/DeepSeek-V3 config.json on Hugging Face (the same figures as
  DeepSeek-R1's and transformers' `DeepseekV3Config` defaults) and the technical report
  (arXiv 2412.19437). They agree on the architecture. The report's training settings that
  the config does not hold: the balance loss (sequence-wise, alpha 1e-4; the config's
  `aux_loss_alpha` is absent/unused for noaux_tc), the bias update speed 1e-3, the MTP loss
  weight (0.3 for the first 10T tokens, then 0.1; the preset takes 0.3, where pretraining
  starts), the 4096-token pretraining length. YaRN (factor 40 over 4096, mscale 1.0 and
  mscale_all_dim 1.0) is the config's; the report applied it only for the context
  extension after pretraining, so pretraining at 4K runs with YaRN's scaling already on
  (`--rope-type rope --no-rope-fusion` and no YaRN flags gives the report's pretraining
  RoPE). FP8 (the report's recipe) is on: `--plugins fp8` with block-scaled E4M3 and FP8
  dispatch.
- `deepseek-v2-lite`: deepseek-ai/DeepSeek-V2-Lite config.json. Disagreement with the
  plugins: its router is softmax, greedy top-6, unnormalised gates (`norm_topk_prob:
  false`), scaling 1.0, with an auxiliary loss; the moe plugin implements DeepSeek-V3's gate
  only (sigmoid, expert bias, normalised gates), so the preset keeps V2-Lite's shapes and
  routes as V3 does, with the config's scaling 1.0 and its sequence-wise loss (alpha 1e-3).
  No query compression (`q_lora_rank: null`). YaRN factor 40 over 4096 with mscale and
  mscale_all_dim 0.707 as in the config.
- `moonlight-16b-a3b`: moonshotai/Moonlight-16B-A3B config.json (DeepseekV3 architecture):
  sigmoid router with bias (noaux_tc), one group (no group limit: no group flags),
  scaling 2.446, 2 shared experts, no MTP layer, no YaRN (`rope_scaling: null`, theta 50000,
  8192 positions), RMSNorm epsilon 1e-5. The config's `aux_loss_alpha` 1e-3 with
  `seq_aux: true` is taken as the sequence-wise loss.
- `tiny`: the CPU demo's model (`integration.demo`: MODEL, MLA, MOE, FP8 and FP8_WITH_MLA,
  without its parallel layout, training settings and recomputation) plus one MTP layer.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field

PRESET_FLAG = "--preset"


@dataclass(frozen=True)
class Preset:
    """A model as Megatron flags: `model` for the architecture, `plugins[name]` for the
    flags that only mean something with that plugin on (dropped with it)."""

    name: str
    summary: str
    model: tuple[str, ...]
    plugins: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sources: str = ""

    def flags(self, plugins: list[str] | None = None) -> list[str]:
        """The preset's argv; with `plugins` (the user's `--plugins` list), only the flags of
        those plugins and no `--plugins` flag of its own."""
        chosen = [p for p in self.plugins if plugins is None or p in plugins]
        argv = list(self.model)
        if plugins is None and chosen:
            argv += ["--plugins", *chosen]
        for name in chosen:
            argv += self.plugins[name]
        if {"mla", "moe"} <= set(chosen):  # the decoder as one spec (integration.deepseek_v3)
            argv += DEEPSEEK_V3_SPEC
        return argv


def _yarn(factor: int, original: int, mscale: float, mscale_all_dim: float) -> tuple[str, ...]:
    return ("--rope-type", "yarn", "--rotary-scaling-factor", str(factor),
            "--yarn-original-max-position-embeddings", str(original),
            "--yarn-beta-fast", "32", "--yarn-beta-slow", "1",
            "--mscale", str(mscale), "--mscale-all-dim", str(mscale_all_dim))


# Megatron's --spec: DeepSeek-V3's decoder, read by megaseek pretrain and by Megatron's GPT
# builder (launch scripts without a model provider).
DEEPSEEK_V3_SPEC = ("--spec", "integration.deepseek_v3", "decoder_spec")
COMMON = ("--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear",
          "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights")
# DeepSeek trains without dropout (config.json: attention_dropout 0.0)
NO_DROPOUT = ("--attention-dropout", "0.0", "--hidden-dropout", "0.0")

DEEPSEEK_V3 = Preset(
    name="deepseek-v3",
    summary="DeepSeek-V3 (671B total, 37B activated; 1 MTP layer), FP8 recipe",
    model=(
        "--num-layers", "61", "--hidden-size", "7168", "--ffn-hidden-size", "18432",
        "--num-attention-heads", "128", "--seq-length", "4096",
        "--max-position-embeddings", "163840", *COMMON, "--norm-epsilon", "1e-6",
        "--rotary-base", "10000", "--vocab-size", "129280", *NO_DROPOUT,
        "--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "0.3",
    ),
    plugins={
        "mla": ("--multi-latent-attention", "--q-lora-rank", "1536", "--kv-lora-rank", "512",
                "--qk-head-dim", "128", "--qk-pos-emb-head-dim", "64", "--v-head-dim", "128",
                *_yarn(40, 4096, 1.0, 1.0)),
        "moe": ("--num-experts", "256", "--moe-ffn-hidden-size", "2048",
                "--moe-shared-expert-intermediate-size", "2048",
                "--moe-layer-freq", "([0]*3+[1]*58)", "--moe-router-topk", "8",
                "--moe-router-num-groups", "8", "--moe-router-group-topk", "4",
                "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                "--moe-router-bias-update-rate", "1e-3",
                "--moe-router-topk-scaling-factor", "2.5", "--moe-router-dtype", "fp32",
                "--moe-router-load-balancing-type", "seq_aux_loss",
                "--moe-aux-loss-coeff", "1e-4", "--moe-fp8-dispatch"),
        "fp8": ("--fp8-format", "e4m3", "--fp8-recipe", "blockwise"),
    },
    sources="""\
HF deepseek-ai/DeepSeek-V3 config.json -> num_hidden_layers 61, hidden_size 7168,
  intermediate_size 18432, num_attention_heads 128, q_lora_rank 1536, kv_lora_rank 512,
  qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128, first_k_dense_replace 3,
  n_routed_experts 256, moe_intermediate_size 2048, n_shared_experts 1,
  num_experts_per_tok 8, n_group 8, topk_group 4, routed_scaling_factor 2.5,
  scoring_func sigmoid, topk_method noaux_tc (expert bias), norm_topk_prob true,
  vocab_size 129280, tie_word_embeddings false, rms_norm_eps 1e-6, rope_theta 10000,
  rope_scaling yarn factor 40 / original 4096 / beta 32,1 / mscale 1.0 / mscale_all_dim
  1.0, max_position_embeddings 163840, num_nextn_predict_layers 1.
  transformers' DeepseekV3Config defaults: the same figures.
Report (arXiv 2412.19437) -> the same architecture; sequence-wise balance loss alpha 1e-4,
  bias update speed 0.001, MTP loss weight 0.3 (first 10T tokens; 0.1 after: the preset
  takes 0.3), pretraining sequence 4096, FP8 training (fp8 plugin, FP8 dispatch),
  gating in FP32 (--moe-router-dtype fp32).
Disagreement: the config carries YaRN; the report's pretraining ran at 4K before the YaRN
  context extension. The preset keeps the config's YaRN.""",
)

DEEPSEEK_V2_LITE = Preset(
    name="deepseek-v2-lite",
    summary="DeepSeek-V2-Lite's shapes (15.7B total, 2.4B activated) with DeepSeek-V3's router",
    model=(
        "--num-layers", "27", "--hidden-size", "2048", "--ffn-hidden-size", "10944",
        "--num-attention-heads", "16", "--seq-length", "4096",
        "--max-position-embeddings", "163840", *COMMON, "--norm-epsilon", "1e-6",
        "--rotary-base", "10000", "--vocab-size", "102400", *NO_DROPOUT,
    ),
    plugins={
        "mla": ("--multi-latent-attention", "--kv-lora-rank", "512",
                "--qk-head-dim", "128", "--qk-pos-emb-head-dim", "64", "--v-head-dim", "128",
                *_yarn(40, 4096, 0.707, 0.707)),
        "moe": ("--num-experts", "64", "--moe-ffn-hidden-size", "1408",
                "--moe-shared-expert-intermediate-size", "2816",
                "--moe-layer-freq", "([0]*1+[1]*26)", "--moe-router-topk", "6",
                "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                "--moe-router-bias-update-rate", "1e-3",
                "--moe-router-topk-scaling-factor", "1.0", "--moe-router-dtype", "fp32",
                "--moe-router-load-balancing-type", "seq_aux_loss",
                "--moe-aux-loss-coeff", "1e-3"),
    },
    sources="""\
HF deepseek-ai/DeepSeek-V2-Lite config.json -> num_hidden_layers 27, hidden_size 2048,
  intermediate_size 10944, num_attention_heads 16, q_lora_rank null (no query
  compression), kv_lora_rank 512, qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim
  128, first_k_dense_replace 1, n_routed_experts 64, moe_intermediate_size 1408,
  n_shared_experts 2 (one shared MLP of 2816), num_experts_per_tok 6, n_group 1 /
  topk_group 1 (no group limit), routed_scaling_factor 1.0, aux_loss_alpha 0.001 with
  seq_aux true, vocab_size 102400, rms_norm_eps 1e-6, rope_theta 10000, rope_scaling yarn
  factor 40 / original 4096 / mscale 0.707 / mscale_all_dim 0.707,
  max_position_embeddings 163840, no MTP.
Disagreement: the config's router is scoring_func softmax, topk_method greedy,
  norm_topk_prob false; the moe plugin has DeepSeek-V3's gate only (sigmoid affinities,
  expert bias for choosing, normalised gates), so the preset routes as V3 with the
  config's scaling 1.0.""",
)

MOONLIGHT = Preset(
    name="moonlight-16b-a3b",
    summary="Moonshot's Moonlight-16B-A3B (DeepSeek-V3 architecture, 16B total, 3B activated)",
    model=(
        "--num-layers", "27", "--hidden-size", "2048", "--ffn-hidden-size", "11264",
        "--num-attention-heads", "16", "--seq-length", "8192",
        "--max-position-embeddings", "8192", *COMMON, "--norm-epsilon", "1e-5",
        "--rotary-base", "50000", "--vocab-size", "163840", *NO_DROPOUT,
    ),
    plugins={
        "mla": ("--multi-latent-attention", "--kv-lora-rank", "512",
                "--qk-head-dim", "128", "--qk-pos-emb-head-dim", "64", "--v-head-dim", "128",
                "--rope-type", "rope", "--no-rope-fusion"),
        "moe": ("--num-experts", "64", "--moe-ffn-hidden-size", "1408",
                "--moe-shared-expert-intermediate-size", "2816",
                "--moe-layer-freq", "([0]*1+[1]*26)", "--moe-router-topk", "6",
                "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                "--moe-router-bias-update-rate", "1e-3",
                "--moe-router-topk-scaling-factor", "2.446", "--moe-router-dtype", "fp32",
                "--moe-router-load-balancing-type", "seq_aux_loss",
                "--moe-aux-loss-coeff", "1e-3"),
    },
    sources="""\
HF moonshotai/Moonlight-16B-A3B config.json (model_type deepseek_v3) -> num_hidden_layers
  27, hidden_size 2048, intermediate_size 11264, num_attention_heads 16, q_lora_rank null,
  kv_lora_rank 512, qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128,
  first_k_dense_replace 1, n_routed_experts 64, moe_intermediate_size 1408,
  n_shared_experts 2 (one shared MLP of 2816), num_experts_per_tok 6, n_group 1 /
  topk_group 1 (no group limit), routed_scaling_factor 2.446, scoring_func sigmoid,
  topk_method noaux_tc, norm_topk_prob true, aux_loss_alpha 0.001 with seq_aux true,
  vocab_size 163840, rms_norm_eps 1e-5, rope_theta 50000, rope_scaling null,
  max_position_embeddings 8192, num_nextn_predict_layers 0.
Not in the config: the bias update rate (DeepSeek-V3's 1e-3 taken) and the training
  sequence length (max_position_embeddings 8192 taken). Moonlight was trained with Muon,
  which megaseek does not provide (Megatron's Adam is used).""",
)

TINY = Preset(
    name="tiny",
    summary="the CPU demo's DeepSeek-V3 at toy size (MLA + MoE + FP8, 1 MTP layer)",
    model=(
        "--num-layers", "4", "--hidden-size", "128", "--ffn-hidden-size", "256",
        "--num-attention-heads", "4", "--seq-length", "128",
        "--max-position-embeddings", "128", *COMMON, *NO_DROPOUT,
        "--mtp-num-layers", "1",
    ),
    plugins={
        "mla": ("--multi-latent-attention", "--q-lora-rank", "128", "--kv-lora-rank", "128",
                "--qk-head-dim", "32", "--qk-pos-emb-head-dim", "16", "--v-head-dim", "32",
                "--rope-type", "yarn", "--rotary-scaling-factor", "4",
                "--yarn-original-max-position-embeddings", "32",
                "--mscale", "1.0", "--mscale-all-dim", "1.0"),
        "moe": ("--num-experts", "16", "--moe-ffn-hidden-size", "128",
                "--moe-shared-expert-intermediate-size", "128",
                "--moe-layer-freq", "([0]+[1]*3)", "--moe-router-topk", "4",
                "--moe-router-num-groups", "4", "--moe-router-group-topk", "2",
                "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                "--moe-router-bias-update-rate", "1e-2",
                "--moe-router-topk-scaling-factor", "2.5",
                "--moe-router-load-balancing-type", "none", "--moe-fp8-dispatch"),
        "fp8": ("--fp8-format", "e4m3", "--fp8-recipe", "blockwise", "--fp8-cache-weights"),
    },
    sources="""\
integration/demo.py -> MODEL (4 layers, hidden 128, 4 heads, sequence and positions 128,
  SwiGLU, RMSNorm, no biases, RoPE, untied head), MLA (qk 32 + rope 16, v 32, YaRN
  factor 4 over 32), MOE (16 experts of 128 in 4 groups, top-4 from 2 groups, scaling
  2.5, one shared expert of 128, first layer dense, bias rate 1e-2, no balance loss, FP8
  dispatch), FP8 (block-scaled E4M3, weights cached, dense FFN 256) and FP8_WITH_MLA
  (q_lora and kv_lora 128). Left out: the demo's TP/EP layout, batch and optimizer
  settings, --fp8-backend (auto picks the emulated backend on CPU) and its selective
  recomputation (give --recompute-granularity selective --recompute-modules layernorm
  mla_up_proj for the demo's). Added: --mtp-num-layers 1, and no dropout (as DeepSeek-V3
  and the other presets; the demo trained with Megatron's default 0.1 before).""",
)

PRESETS: dict[str, Preset] = {p.name: p for p in (TINY, DEEPSEEK_V2_LITE, MOONLIGHT, DEEPSEEK_V3)}
SOURCES = {name: preset.sources for name, preset in PRESETS.items()}


class PresetError(SystemExit):
    """A bad `--preset` command line: the message is printed as `megaseek: error: ...` and
    the process exits with 2 (as argparse does)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def options(argv: list[str]) -> dict[str, list[str]]:
    """{option: its values} of an argv (the last occurrence wins, as argparse's store
    actions do); `--flag=value` counts as `--flag value`."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            current = found[name] = [value] if eq else []
        elif current is not None:
            current.append(arg)
    return found


def split(argv: list[str]) -> tuple[str | None, list[str]]:
    """(preset name or None, argv without `--preset NAME`)."""
    name, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == PRESET_FLAG or arg.startswith(PRESET_FLAG + "="):
            if name is not None:
                again = (arg.split("=", 1)[1] if "=" in arg else
                         argv[i + 1] if i + 1 < len(argv) else "")
                raise PresetError(f"{PRESET_FLAG} given twice ({name} and {again}); give one")
            if "=" in arg:
                name = arg.split("=", 1)[1]
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                name = argv[i + 1]
                i += 1
            else:
                raise PresetError(f"{PRESET_FLAG} needs a name; the presets are "
                                  f"{', '.join(PRESETS)}")
        else:
            rest.append(arg)
        i += 1
    return name, rest


def _drop(argv: list[str], names: set[str]) -> list[str]:
    """argv less each option in `names` and its values."""
    kept, skipping = [], False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg.partition("=")[0] in names
        if not skipping:
            kept.append(arg)
    return kept


# A preset flag that means something only while another is not 0: dropped with it when the
# user sets that one to 0, as a plugin's flags are dropped with the plugin (the MTP loss
# weight without MTP layers is refused at start-up).
_ONLY_WITH = {"--mtp-loss-scaling-factor": "--mtp-num-layers"}


def preset_flags(name: str, user_argv: list[str] = ()) -> list[str]:
    """The flags `--preset NAME` adds before `user_argv`: the preset's, less those the user
    gives (by option name), less the flags of plugins the user's `--plugins` leaves out,
    less those that mean nothing with a flag the user sets to 0 (`_ONLY_WITH`)."""
    if name not in PRESETS:
        raise PresetError(f"{PRESET_FLAG} {name}: unknown; the presets are {', '.join(PRESETS)}")
    user = options(list(user_argv))
    plugins = user.get("--plugins")
    zeroed = {flag for flag, needed in _ONLY_WITH.items() if user.get(needed) == ["0"]}
    return _drop(PRESETS[name].flags(plugins), set(user) | zeroed)


def expand(argv: list[str], announce: bool = True, file=None) -> list[str]:
    """argv with `--preset NAME` replaced by the preset's flags (put first, so that the
    user's flags, which follow, also win where Megatron reads the last occurrence), after
    checking that the user's flags do not contradict the preset's. Prints the flags added
    once, on rank 0 (env RANK), as `megaseek: --preset NAME: <flags>`. An argv without
    `--preset` comes back unchanged. A bad preset or a contradiction prints `megaseek:
    error: ...` and exits with 2."""
    try:
        name, rest = split(list(argv))
        if name is None:
            return list(argv)
        added = preset_flags(name, rest)
        check_consistency(name, added, rest)
    except PresetError as error:
        from integration.hooks import exit_refused

        exit_refused(error)  # once, on rank 0, as every refusal
    if announce and os.environ.get("RANK", "0") == "0":
        print(f"megaseek: {PRESET_FLAG} {name}: {shlex.join(added)}",
              file=file or sys.stdout, flush=True)
    return added + rest


# --- consistency of the merged flags ---------------------------------------------------------

def _layer_pattern(text: str) -> list[int] | None:
    """--moe-layer-freq as Megatron parses it (`moe_freq_type`) when it is a list of 0/1,
    else None (an integer frequency, or a value Megatron's parser refuses itself)."""
    import warnings

    with warnings.catch_warnings():  # megatron's import-time notes about TE and Apex
        warnings.simplefilter("ignore")
        from megatron.training.arguments import moe_freq_type
    try:
        pattern = moe_freq_type(text)
    except Exception:  # noqa: BLE001  (Megatron's parser reports it)
        return None
    return list(pattern) if isinstance(pattern, (list, tuple)) else None


def check_consistency(name: str, preset_argv: list[str], user_argv: list[str]) -> None:
    """Refuses a user flag that contradicts one the preset keeps, naming both. Pairs where
    both values are the user's are left to the plugins' and Megatron's own checks."""
    preset, user = options(preset_argv), options(user_argv)

    def value(flag: str) -> tuple[str, str] | None:
        """(value, how to name it) of a flag after merging, or None where neither gives it."""
        if flag in user:
            return " ".join(user[flag]), f"{flag} {' '.join(user[flag])}"
        if flag in preset:
            return " ".join(preset[flag]), f"the preset's {flag} {' '.join(preset[flag])}"
        return None

    def mixed(*flags: str) -> bool:
        return any(f in user for f in flags) and any(f in preset for f in flags)

    def fail(message: str) -> None:
        raise PresetError(f"{message} ({PRESET_FLAG} {name})")

    def number(flag: str) -> int | None:
        got = value(flag)
        try:
            return int(got[0]) if got else None
        except ValueError:
            return None

    def described(flag: str) -> str:
        return value(flag)[1]

    experts, groups = number("--num-experts"), number("--moe-router-num-groups")
    group_topk, topk = number("--moe-router-group-topk"), number("--moe-router-topk")
    if experts and groups and mixed("--num-experts", "--moe-router-num-groups") \
            and experts % groups:
        fail(f"{described('--num-experts')} is not divisible by "
             f"{described('--moe-router-num-groups')}")
    if groups and group_topk and mixed("--moe-router-num-groups", "--moe-router-group-topk") \
            and group_topk > groups:
        fail(f"{described('--moe-router-group-topk')} is more than "
             f"{described('--moe-router-num-groups')}")
    if experts and topk and mixed("--num-experts", "--moe-router-topk") and topk > experts:
        fail(f"{described('--moe-router-topk')} is more than {described('--num-experts')}")
    if experts and groups and group_topk and topk and not experts % groups and mixed(
            "--num-experts", "--moe-router-num-groups", "--moe-router-group-topk",
            "--moe-router-topk") and topk > group_topk * (experts // groups):
        fail(f"{described('--moe-router-topk')} is more than the "
             f"{group_topk * (experts // groups)} experts that "
             f"{described('--moe-router-group-topk')} of {described('--moe-router-num-groups')} "
             f"over {described('--num-experts')} allow")

    layers, freq = number("--num-layers"), value("--moe-layer-freq")
    if layers and freq and mixed("--num-layers", "--moe-layer-freq"):
        pattern = _layer_pattern(freq[0])
        if pattern is not None and len(pattern) != layers:
            fail(f"{described('--num-layers')} does not match {described('--moe-layer-freq')} "
                 f"({len(pattern)} layers); give --moe-layer-freq too")

    heads, hidden = number("--num-attention-heads"), number("--hidden-size")
    mla = "--multi-latent-attention" in user or "--multi-latent-attention" in preset
    if heads and hidden and not mla and mixed("--num-attention-heads", "--hidden-size") \
            and hidden % heads:
        fail(f"{described('--hidden-size')} is not divisible by "
             f"{described('--num-attention-heads')}")
    tp = number("--tensor-model-parallel-size")
    if heads and tp and mixed("--num-attention-heads", "--tensor-model-parallel-size") \
            and heads % tp:
        fail(f"{described('--num-attention-heads')} is not divisible by "
             f"{described('--tensor-model-parallel-size')}")
    ep = number("--expert-model-parallel-size")
    if experts and ep and mixed("--num-experts", "--expert-model-parallel-size") and experts % ep:
        fail(f"{described('--num-experts')} is not divisible by "
             f"{described('--expert-model-parallel-size')}")
