"""Hugging Face DeepSeek-V3 `config.json` <-> Megatron's MLA/MoE config and flags.

Both ways go through `HFModel`, the architecture as this converter understands it.
`from_hf_config` reads `config.json` as DeepSeek publishes it (`rope_scaling`,
`num_nextn_predict_layers`, `quantization_config`) and as transformers writes it (4.x:
`rope_scaling`; newer releases: `rope_parameters`, with `rope_theta` inside). A config of
another model is named as such first. Every field is then either mapped, checked against
the only value this converter builds, or one of the fields, listed below by class, that
cannot change what the weights compute; any other field is an error naming it, and so is a
value the moe plugin's router or Megatron's config would refuse, in config.json's names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any


class HFConversionError(ValueError):
    """A checkpoint or config this converter does not support, naming the field or tensor."""


class _FieldError(HFConversionError):
    """A config.json field refused; `from_hf_config` says which file it is in."""

    def __init__(self, what: str):
        super().__init__(f"config.json: {what}")
        self.what = what


# Fields that cannot change what the weights compute, by class: a config.json may hold any
# of them, with any value, and the converter reads none of them (`dtype` only as the
# default dtype of the Megatron weights). Together they are every field of transformers'
# PretrainedConfig (4.x and 5.x) that does not shape the model, plus the DeepSeek code's
# own training settings; the fields of PretrainedConfig that do shape a model are in FIXED.
NON_MATHEMATICAL = {
    # where the file comes from, and the dtype it was saved in (the tensors carry theirs)
    "provenance": {"transformers_version", "_name_or_path", "name_or_path", "_commit_hash",
                   "auto_map", "dtype", "torch_dtype", "use_bfloat16"},
    # what a forward returns or keeps, not what it computes
    "outputs": {"output_hidden_states", "output_attentions", "output_router_logits",
                "return_dict", "use_cache", "torchscript", "tie_last_hidden_states"},
    # the tokenizer's special tokens and class
    "tokens": {"bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
               "decoder_start_token_id", "tokenizer_class", "prefix"},
    # heads of other tasks (classification labels); a causal LM has none
    "task heads": {"id2label", "label2id", "num_labels", "problem_type", "finetuning_task",
                   "task_specific_params"},
    # decoding defaults, which transformers keeps in generation_config.json since 4.x
    "generation": {
        "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
        "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
        "epsilon_cutoff", "eta_cutoff", "repetition_penalty", "encoder_repetition_penalty",
        "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
        "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
        "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
        "num_assistant_tokens", "num_assistant_tokens_schedule",
        "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind"},
    # how the same maths is run (kernels, chunking, recompute, DeepSeek's expert parallelism)
    "implementation": {"attn_implementation", "_attn_implementation",
                       "_attn_implementation_internal", "experts_implementation",
                       "_experts_implementation", "chunk_size_feed_forward",
                       "gradient_checkpointing", "ep_size"},
    # training losses and initialisation of transformers' or DeepSeek's own code (megaseek's
    # are its flags)
    "training": {"initializer_range", "aux_loss_alpha", "seq_aux", "router_aux_loss_coef",
                 "tf_legacy_loss"},
}
METADATA = frozenset().union(*NON_MATHEMATICAL.values())
# What a config.json must say it is (checked first: another model is named as such).
IDENTITY = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]}
# Fields with the values this converter builds: (field, accepted values, why). The first
# group are PretrainedConfig's fields that would change a model, accepted at their defaults.
FIXED = {
    "is_encoder_decoder": ([False], "DeepSeek-V3 is a decoder"),
    "is_decoder": ([False], "DeepSeek-V3 is no decoder of an encoder-decoder"),
    "add_cross_attention": ([False], "DeepSeek-V3 has no cross-attention"),
    "cross_attention_hidden_size": ([None], "DeepSeek-V3 has no cross-attention"),
    "tie_encoder_decoder": ([False], "DeepSeek-V3 is a decoder"),
    "pruned_heads": ([None, {}], "every attention head is kept"),
    "per_layer_config": ([None, {}], "every layer is built alike"),
    "hidden_act": (["silu"], "SwiGLU MLPs"),
    "attention_bias": ([False], "Megatron's MLA linears have no bias"),
    "scoring_func": (["sigmoid"], "the moe plugin's sigmoid router"),
    "topk_method": (["noaux_tc"], "DeepSeek-V3's group-limited router with expert bias"),
    "norm_topk_prob": ([True], "the moe plugin always normalises the top-k gates"),
    "pretraining_tp": ([None, 1], "no TP-sliced MLP in the reference forward"),
    "moe_layer_freq": ([1], "every layer after first_k_dense_replace is MoE"),
    "tie_word_embeddings": ([False], "DeepSeek-V3's head is separate from its embedding"),
}
# Other names transformers' DeepseekV3Config reads for a field (its attribute_map).
ALIASES = {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"}
MAPPED = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "n_shared_experts",
    "n_routed_experts", "routed_scaling_factor", "kv_lora_rank", "q_lora_rank",
    "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "qk_head_dim", "head_dim", "n_group",
    "topk_group", "num_experts_per_tok", "first_k_dense_replace", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "rope_interleave",
    "attention_dropout", "num_nextn_predict_layers", "quantization_config",
})
YARN_KEYS = frozenset({"factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                       "mscale", "mscale_all_dim"})


@dataclasses.dataclass(frozen=True)
class Yarn:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclasses.dataclass(frozen=True)
class HFModel:
    """A DeepSeek-V3 architecture (HF's names, one line per field)."""
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int            # dense layers' FFN
    q_lora_rank: int | None           # None: one query projection (q_proj)
    kv_lora_rank: int
    qk_nope_head_dim: int             # Megatron qk_head_dim
    qk_rope_head_dim: int             # Megatron qk_pos_emb_head_dim
    v_head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    yarn: Yarn | None = None          # None: plain RoPE
    rope_interleave: bool = True      # checkpoint rotates neighbouring pairs (DeepSeek)
    n_routed_experts: int | None = None   # None: every layer dense
    moe_intermediate_size: int | None = None
    n_shared_experts: int = 0
    num_experts_per_tok: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    num_nextn_predict_layers: int = 0     # MTP depth
    attention_dropout: float = 0.0
    fp8_block: tuple[int, int] | None = None  # quantization_config's weight_block_size
    dtype: str | None = None              # torch_dtype / dtype as written

    def moe_layer(self, i: int) -> bool:
        """Whether decoder layer i (0-based; MTP layers are i >= num_hidden_layers, built
        like the last one) has routed experts."""
        if not self.n_routed_experts:
            return False
        return min(i, self.num_hidden_layers - 1) >= self.first_k_dense_replace


def _fail(field: str, why: str):
    raise _FieldError(f"{field}: {why}")


def read_json(path: str | Path, what: str = "a JSON object") -> dict[str, Any]:
    """The JSON object in `path`; HFConversionError names the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise HFConversionError(f"{path}: no such file")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFConversionError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column "
                                f"{e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HFConversionError(f"{path}: cannot be read as text ({e})") from None
    if not isinstance(value, dict):
        raise HFConversionError(f"{path}: not {what} (a JSON {type(value).__name__})")
    return value


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if Path(folder).is_file():
        raise HFConversionError(f"{folder} is a file: give the Hugging Face model's folder "
                                "(the one that holds config.json)")
    if not path.is_file():
        raise HFConversionError(f"{path}: no config.json")
    return read_json(path, "a model config (a JSON object of fields)")


def read_hf_model(folder: str | Path) -> HFModel:
    """The architecture of the Hugging Face folder `folder`; errors name its config.json."""
    return from_hf_config(read_hf_config(folder), Path(folder) / "config.json")


def _int(cfg: dict, key: str, minimum: int = 1, field: str = "") -> int:
    """`cfg[key]`, an integer >= `minimum`; a refusal names `field` + `key`."""
    value = cfg.get(key)
    if value is None:
        _fail(field + key, f"missing (an integer >= {minimum})")
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(field + key, f"needs an integer >= {minimum}, got {value!r}")
    return value


def _float(cfg: dict, key: str, default: float | None, *, above: float | None = None,
           below: float | None = None, minimum: float | None = None,
           field: str | None = None) -> float:
    """`cfg[key]` (or `default`), a finite number in its domain: > `above`, >= `minimum`,
    < `below` (each where given). A refusal names `field` (default: `key`)."""
    value, field = cfg.get(key, default), field or key
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        _fail(field, f"needs a number, got {value!r}")
    if not math.isfinite(value):
        _fail(field, f"needs a finite number, got {value!r}")
    for bound, holds, said in ((above, lambda b: value > b, "above"),
                               (minimum, lambda b: value >= b, "at least"),
                               (below, lambda b: value < b, "below")):
        if bound is not None and not holds(bound):
            _fail(field, f"must be {said} {bound:g}, got {value!r}")
    return float(value)


def _object(cfg: dict, key: str) -> dict:
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        _fail(key, f"needs a JSON object, got {value!r}")
    return dict(value)


def _rope(cfg: dict) -> tuple[float, Yarn | None]:
    """(rope_theta, YaRN or None) from `rope_scaling` + `rope_theta` (DeepSeek, transformers
    4.x) or `rope_parameters` (newer transformers)."""
    if "rope_parameters" in cfg and cfg.get("rope_scaling") is not None:
        _fail("rope_parameters", "given together with rope_scaling")
    if "rope_parameters" in cfg:
        where = "rope_parameters"
        params = _object(cfg, "rope_parameters")
        if params.get("rope_theta", cfg.get("rope_theta")) != cfg.get("rope_theta",
                                                                     params.get("rope_theta")):
            _fail("rope_parameters.rope_theta", f"{params['rope_theta']} differs from rope_theta "
                  f"{cfg['rope_theta']}")
        theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    else:
        where = "rope_scaling"
        params = _object(cfg, "rope_scaling")
        theta = cfg.get("rope_theta", 10000.0)
    theta = _float({"rope_theta": theta}, "rope_theta", None, above=0)
    kinds = {params.pop(k) for k in ("type", "rope_type") if k in params}
    if len(kinds) > 1:
        _fail(f"{where}.rope_type", f"type and rope_type disagree: {sorted(kinds)}")
    kind = kinds.pop() if kinds else ("default" if not params else None)
    if kind == "default":
        if params:
            _fail(f"{where}.{sorted(params)[0]}", "not understood with plain RoPE")
        return float(theta), None
    if kind != "yarn":
        _fail(f"{where}.rope_type", f"{kind!r} not supported (plain RoPE or yarn)")
    unknown = sorted(set(params) - YARN_KEYS)
    if unknown:
        _fail(f"{where}.{unknown[0]}", "not understood (YaRN takes "
              + ", ".join(sorted(YARN_KEYS)) + ")")
    for key in ("factor", "original_max_position_embeddings"):
        if params.get(key) is None:
            _fail(f"{where}.{key}", "YaRN needs it")
    for key, value in params.items():
        if value is not None:
            _float(params, key, None, field=f"{where}.{key}", **_YARN_DOMAINS.get(key, {}))
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    # transformers takes mscale / mscale_all_dim only when both are non-zero; otherwise it
    # uses 0.1*ln(factor)+1 for cos/sin, which Megatron's (DeepSeek's) formula gives only
    # with mscale 1 and mscale_all_dim 0.
    if not (mscale and mscale_all_dim) and (mscale not in (None, 1, 1.0) or mscale_all_dim):
        _fail(f"{where}.mscale", f"mscale {mscale!r} with mscale_all_dim {mscale_all_dim!r}: "
              "transformers and DeepSeek's formula disagree unless both are set (or neither)")
    yarn = Yarn(factor=float(params["factor"]),
                original_max_position_embeddings=_int(
                    params, "original_max_position_embeddings", field=where + "."),
                beta_fast=float(params.get("beta_fast") or 32.0),
                beta_slow=float(params.get("beta_slow") or 1.0),
                mscale=float(mscale) if mscale and mscale_all_dim else 1.0,
                mscale_all_dim=float(mscale_all_dim or 0.0))
    return float(theta), yarn


# YaRN's numbers, where they have a domain (the others need only be finite).
_YARN_DOMAINS = {"factor": dict(minimum=1), "beta_fast": dict(above=0),
                 "beta_slow": dict(above=0), "original_max_position_embeddings": dict(minimum=1)}


def _fp8_block(cfg: dict) -> tuple[int, int] | None:
    if cfg.get("quantization_config") is None:
        return None
    q = _object(cfg, "quantization_config")
    known = {"quant_method", "fmt", "activation_scheme", "weight_block_size"}
    unknown = sorted(set(q) - known)
    if unknown:
        _fail(f"quantization_config.{unknown[0]}", "not understood")
    if q.get("quant_method") != "fp8":
        _fail("quantization_config.quant_method", f"{q.get('quant_method')!r} not supported (fp8)")
    if q.get("fmt", "e4m3") != "e4m3":
        _fail("quantization_config.fmt", f"{q['fmt']!r} not supported (e4m3)")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        _fail("quantization_config.activation_scheme",
              f"{q['activation_scheme']!r} not supported (dynamic)")
    block = q.get("weight_block_size")
    if list(block or []) != [128, 128]:
        _fail("quantization_config.weight_block_size", f"{block!r} not supported ([128, 128], "
              "the fp8 plugin's weight blocks)")
    return 128, 128


def from_hf_config(cfg: dict[str, Any], file: str | Path = "config.json") -> HFModel:
    """The architecture of a DeepSeek-V3 `config.json` (as a dict); HFConversionError names
    `file` and the first field this converter does not support: a model of another type
    first, then any field outside `METADATA` (cannot change the model), `FIXED` and
    `MAPPED`, then values this converter or the moe plugin's router cannot build."""
    try:
        return _parse(cfg)
    except _FieldError as e:
        raise HFConversionError(f"{file}: {e.what}") from None


def _check_identity(cfg: dict[str, Any]) -> None:
    for key, expected in IDENTITY.items():
        value = cfg.get(key)
        if value is not None and value != expected:
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            _fail(f"{key} {shown}", f"not a DeepSeek-V3 checkpoint ({key} "
                  f"{' '.join(expected) if isinstance(expected, list) else expected})")
    if cfg.get("model_type") is None and cfg.get("architectures") is None:
        _fail("model_type", "missing (expected deepseek_v3)")


def _resolve_aliases(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(cfg)
    for alias, name in ALIASES.items():
        if alias in cfg:
            value = cfg.pop(alias)
            if name in cfg and cfg[name] != value:
                _fail(alias, f"{value!r} differs from {name} {cfg[name]!r} (the same field)")
            cfg[name] = value
    return cfg


# Megatron's names for what config.json gives: (config field, flag, config.json field or
# the expression it is made of). A refusal by Megatron's config or a plugin, which names
# Megatron's fields or flags, is reported in these terms (`in_config_terms`).
MEGATRON_NAMES = [
    ("num_layers", "--num-layers", "num_hidden_layers"),
    ("ffn_hidden_size", "--ffn-hidden-size", "intermediate_size"),
    ("num_query_groups", "--num-query-groups", "num_key_value_heads"),
    ("qk_head_dim", "--qk-head-dim", "qk_nope_head_dim"),
    ("qk_pos_emb_head_dim", "--qk-pos-emb-head-dim", "qk_rope_head_dim"),
    ("layernorm_epsilon", "--norm-epsilon", "rms_norm_eps"),
    ("rotary_base", "--rotary-base", "rope_theta"),
    ("rotary_scaling_factor", "--rotary-scaling-factor", "rope_scaling.factor"),
    ("original_max_position_embeddings", "--yarn-original-max-position-embeddings",
     "rope_scaling.original_max_position_embeddings"),
    ("beta_fast", "--yarn-beta-fast", "rope_scaling.beta_fast"),
    ("beta_slow", "--yarn-beta-slow", "rope_scaling.beta_slow"),
    ("mscale", "--mscale", "rope_scaling.mscale"),
    ("mscale_all_dim", "--mscale-all-dim", "rope_scaling.mscale_all_dim"),
    ("num_moe_experts", "--num-experts", "n_routed_experts"),
    ("moe_ffn_hidden_size", "--moe-ffn-hidden-size", "moe_intermediate_size"),
    ("moe_shared_expert_intermediate_size", "--moe-shared-expert-intermediate-size",
     "n_shared_experts * moe_intermediate_size"),
    ("moe_layer_freq", "--moe-layer-freq", "first_k_dense_replace"),
    ("moe_router_topk", "--moe-router-topk", "num_experts_per_tok"),
    ("moe_router_num_groups", "--moe-router-num-groups", "n_group"),
    ("moe_router_group_topk", "--moe-router-group-topk", "topk_group"),
    ("moe_router_topk_scaling_factor", "--moe-router-topk-scaling-factor",
     "routed_scaling_factor"),
    ("mtp_num_layers", "--mtp-num-layers", "num_nextn_predict_layers"),
    ("num_attention_heads", "--num-attention-heads", "num_attention_heads"),
    ("hidden_size", "--hidden-size", "hidden_size"),
    ("kv_lora_rank", "--kv-lora-rank", "kv_lora_rank"),
    ("q_lora_rank", "--q-lora-rank", "q_lora_rank"),
    ("v_head_dim", "--v-head-dim", "v_head_dim"),
    ("attention_dropout", "--attention-dropout", "attention_dropout"),
]
_TO_CONFIG = {name: field for megatron, flag, field in MEGATRON_NAMES
              for name in (megatron, flag)}
_MEGATRON_NAME = re.compile(r"(?<![\w-])(" + "|".join(
    re.escape(name) for name in sorted(_TO_CONFIG, key=len, reverse=True)) + r")(?![\w-])")


def in_config_terms(message: str) -> str:
    """`message`, a refusal naming Megatron's config fields or flags, with each that comes
    from config.json replaced by the config.json field it comes from."""
    return _MEGATRON_NAME.sub(lambda m: _TO_CONFIG[m.group(1)], message)


def _check_routing(moe: dict[str, Any]) -> None:
    """The moe plugin's router checks (the ones `megaseek pretrain` applies to the flags),
    on the config.json fields."""
    from plugins.moe.router import RouterConfig

    if moe["num_experts_per_tok"] > moe["n_routed_experts"]:
        _fail("num_experts_per_tok", f"{moe['num_experts_per_tok']} is more than the "
              f"{moe['n_routed_experts']} routed experts (n_routed_experts)")
    try:
        RouterConfig(num_experts=moe["n_routed_experts"], top_k=moe["num_experts_per_tok"],
                     num_groups=moe["n_group"], group_top_k=moe["topk_group"],
                     scaling_factor=moe["routed_scaling_factor"]).validate()
    except ValueError as e:
        raise _FieldError(in_config_terms(str(e))) from None


def _parse(cfg: dict[str, Any]) -> HFModel:
    _check_identity(cfg)
    cfg = _resolve_aliases(cfg)
    for key in sorted(cfg):
        if key not in METADATA and key not in FIXED and key not in MAPPED \
                and key not in IDENTITY:
            _fail(key, "not understood by this converter")
    for key, (accepted, why) in FIXED.items():
        if key in cfg and cfg[key] not in accepted:
            _fail(key, f"{cfg[key]!r} not supported: {why}")
    heads = _int(cfg, "num_attention_heads")
    if cfg.get("num_key_value_heads", heads) != heads:
        _fail("num_key_value_heads", f"{cfg['num_key_value_heads']} != num_attention_heads "
              f"{heads} (MLA's keys and values have every head)")
    nope, rope = _int(cfg, "qk_nope_head_dim"), _int(cfg, "qk_rope_head_dim")
    if rope % 2:
        _fail("qk_rope_head_dim", f"must be even, got {rope}")
    if cfg.get("head_dim", rope) != rope:
        _fail("head_dim", f"{cfg['head_dim']} != qk_rope_head_dim {rope}")
    if cfg.get("qk_head_dim", nope + rope) != nope + rope:
        _fail("qk_head_dim", f"{cfg['qk_head_dim']} != qk_nope_head_dim + qk_rope_head_dim")
    theta, yarn = _rope(cfg)
    layers = _int(cfg, "num_hidden_layers")
    experts = cfg.get("n_routed_experts")
    moe = {}
    if experts is not None:
        experts = _int(cfg, "n_routed_experts")
        moe = dict(n_routed_experts=experts,
                   moe_intermediate_size=_int(cfg, "moe_intermediate_size"),
                   n_shared_experts=_int(cfg, "n_shared_experts", 0),
                   num_experts_per_tok=_int(cfg, "num_experts_per_tok"),
                   n_group=_int(cfg, "n_group") if cfg.get("n_group") is not None else 1,
                   topk_group=_int(cfg, "topk_group") if cfg.get("topk_group") is not None else 1,
                   routed_scaling_factor=_float(cfg, "routed_scaling_factor", 1.0, above=0),
                   first_k_dense_replace=_int(cfg, "first_k_dense_replace", 0)
                   if "first_k_dense_replace" in cfg else 0)
        if moe["first_k_dense_replace"] >= layers:
            _fail("first_k_dense_replace", f"{moe['first_k_dense_replace']} leaves no MoE layer "
                  f"of {layers}; set n_routed_experts null for a dense model")
        _check_routing(moe)
    q_lora = cfg.get("q_lora_rank")
    return HFModel(
        vocab_size=_int(cfg, "vocab_size"), hidden_size=_int(cfg, "hidden_size"),
        num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=_int(cfg, "intermediate_size"),
        q_lora_rank=None if q_lora is None else _int(cfg, "q_lora_rank"),
        kv_lora_rank=_int(cfg, "kv_lora_rank"), qk_nope_head_dim=nope, qk_rope_head_dim=rope,
        v_head_dim=_int(cfg, "v_head_dim"),
        rms_norm_eps=_float(cfg, "rms_norm_eps", 1e-6, above=0),
        rope_theta=theta, max_position_embeddings=_int(cfg, "max_position_embeddings"),
        yarn=yarn, rope_interleave=bool(cfg.get("rope_interleave", True)),
        num_nextn_predict_layers=_int(cfg, "num_nextn_predict_layers", 0)
        if "num_nextn_predict_layers" in cfg else 0,
        attention_dropout=_float(cfg, "attention_dropout", 0.0, minimum=0, below=1),
        fp8_block=_fp8_block(cfg), dtype=cfg.get("torch_dtype", cfg.get("dtype")), **moe)


# --- Megatron ------------------------------------------------------------------------------

def megatron_fields(model: HFModel) -> dict[str, Any]:
    """Keyword arguments of Megatron's `MLATransformerConfig` for this architecture (model
    fields only: the caller adds dtype, parallel sizes and overrides)."""
    import torch.nn.functional as F

    fields = dict(
        num_layers=model.num_hidden_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads, ffn_hidden_size=model.intermediate_size,
        multi_latent_attention=True,
        q_lora_rank=model.q_lora_rank, kv_lora_rank=model.kv_lora_rank,
        qk_head_dim=model.qk_nope_head_dim, qk_pos_emb_head_dim=model.qk_rope_head_dim,
        v_head_dim=model.v_head_dim, normalization="RMSNorm", layernorm_epsilon=model.rms_norm_eps,
        rotary_base=model.rope_theta, rope_type="yarn" if model.yarn else "rope",
        apply_rope_fusion=False, add_bias_linear=False, gated_linear_unit=True,
        activation_func=F.silu, attention_dropout=model.attention_dropout, hidden_dropout=0.0,
        mtp_num_layers=model.num_nextn_predict_layers or None,
    )
    if model.yarn:
        y = model.yarn
        fields.update(rotary_scaling_factor=y.factor,
                      original_max_position_embeddings=y.original_max_position_embeddings,
                      beta_fast=y.beta_fast, beta_slow=y.beta_slow, mscale=y.mscale,
                      mscale_all_dim=y.mscale_all_dim)
    if model.n_routed_experts:
        k, n = model.first_k_dense_replace, model.num_hidden_layers
        fields.update(
            num_moe_experts=model.n_routed_experts, moe_ffn_hidden_size=model.moe_intermediate_size,
            moe_shared_expert_intermediate_size=(
                model.n_shared_experts * model.moe_intermediate_size or None),
            moe_layer_freq=[0] * k + [1] * (n - k), moe_router_topk=model.num_experts_per_tok,
            moe_router_num_groups=model.n_group if model.n_group > 1 else None,
            moe_router_group_topk=model.topk_group if model.n_group > 1 else None,
            moe_router_topk_scaling_factor=model.routed_scaling_factor,
            moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
            moe_router_load_balancing_type="none")
    return fields


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def megatron_flags(hf_config: dict[str, Any] | HFModel) -> list[str]:
    """Megatron command-line flags (with `--plugins mla moe` semantics) that build this
    checkpoint's architecture; sequence length, parallel layout and training settings are
    the caller's."""
    model = hf_config if isinstance(hf_config, HFModel) else from_hf_config(hf_config)
    if not float(model.rope_theta).is_integer():
        _fail("rope_theta", f"{model.rope_theta}: Megatron's --rotary-base takes an integer")
    flags = [
        "--num-layers", str(model.num_hidden_layers), "--hidden-size", str(model.hidden_size),
        "--ffn-hidden-size", str(model.intermediate_size),
        "--num-attention-heads", str(model.num_attention_heads),
        "--max-position-embeddings", str(model.max_position_embeddings),
        "--vocab-size", str(model.vocab_size), "--make-vocab-size-divisible-by", "1",
        "--swiglu", "--normalization", "RMSNorm", "--norm-epsilon", repr(model.rms_norm_eps),
        "--disable-bias-linear", "--position-embedding-type", "rope",
        "--untie-embeddings-and-output-weights", "--rotary-base", _number(model.rope_theta),
        "--attention-dropout", repr(model.attention_dropout), "--hidden-dropout", "0.0",
        "--multi-latent-attention", "--kv-lora-rank", str(model.kv_lora_rank),
        "--qk-head-dim", str(model.qk_nope_head_dim),
        "--qk-pos-emb-head-dim", str(model.qk_rope_head_dim),
        "--v-head-dim", str(model.v_head_dim),
    ]
    if model.q_lora_rank is not None:
        flags += ["--q-lora-rank", str(model.q_lora_rank)]
    if model.yarn:
        y = model.yarn
        flags += ["--rope-type", "yarn", "--rotary-scaling-factor", _number(y.factor),
                  "--yarn-original-max-position-embeddings",
                  str(y.original_max_position_embeddings),
                  "--yarn-beta-fast", _number(y.beta_fast),
                  "--yarn-beta-slow", _number(y.beta_slow),
                  "--mscale", repr(y.mscale), "--mscale-all-dim", repr(y.mscale_all_dim)]
    else:
        flags += ["--rope-type", "rope", "--no-rope-fusion"]
    if model.n_routed_experts:
        k, n = model.first_k_dense_replace, model.num_hidden_layers
        flags += ["--num-experts", str(model.n_routed_experts),
                  "--moe-ffn-hidden-size", str(model.moe_intermediate_size),
                  "--moe-layer-freq", f"([0]*{k}+[1]*{n - k})",
                  "--moe-router-topk", str(model.num_experts_per_tok),
                  "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                  "--moe-router-topk-scaling-factor", repr(model.routed_scaling_factor),
                  "--moe-router-load-balancing-type", "none"]
        if model.n_shared_experts:
            flags += ["--moe-shared-expert-intermediate-size",
                      str(model.n_shared_experts * model.moe_intermediate_size)]
        if model.n_group > 1:
            flags += ["--moe-router-num-groups", str(model.n_group),
                      "--moe-router-group-topk", str(model.topk_group)]
    if model.num_nextn_predict_layers:
        flags += ["--mtp-num-layers", str(model.num_nextn_predict_layers)]
    return flags


def to_hf_config(config, vocab_size: int, max_position_embeddings: int,
                 dtype: str = "float32") -> dict[str, Any]:
    """DeepSeek's `config.json` (rope_scaling, num_nextn_predict_layers) for a Megatron
    MLA/MoE config built by this converter's mapping."""
    c = config
    if not getattr(c, "multi_latent_attention", False):
        _fail("multi_latent_attention", "the Megatron model has no MLA")
    if c.normalization != "RMSNorm" or not c.gated_linear_unit or c.add_bias_linear:
        _fail("normalization", "export needs RMSNorm, SwiGLU and no linear biases")
    heads = c.num_attention_heads
    out: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.ffn_hidden_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": heads, "num_key_value_heads": heads,
        "q_lora_rank": c.q_lora_rank, "kv_lora_rank": c.kv_lora_rank,
        "qk_nope_head_dim": c.qk_head_dim, "qk_rope_head_dim": c.qk_pos_emb_head_dim,
        "v_head_dim": c.v_head_dim, "hidden_act": "silu", "attention_bias": False,
        "attention_dropout": c.attention_dropout, "rms_norm_eps": c.layernorm_epsilon,
        "rope_theta": float(c.rotary_base), "rope_interleave": True,
        "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": False,
        "num_nextn_predict_layers": c.mtp_num_layers or 0, "torch_dtype": dtype,
        "rope_scaling": None,
    }
    if c.rope_type == "yarn":
        out["rope_scaling"] = {
            "type": "yarn", "factor": c.rotary_scaling_factor,
            "original_max_position_embeddings": c.original_max_position_embeddings,
            "beta_fast": c.beta_fast, "beta_slow": c.beta_slow,
            "mscale": c.mscale, "mscale_all_dim": c.mscale_all_dim}
        if not c.mscale_all_dim:  # see _rope: only DeepSeek's default is unambiguous
            if c.mscale != 1:
                _fail("mscale", f"{c.mscale} without mscale_all_dim: transformers would ignore it")
            del out["rope_scaling"]["mscale"], out["rope_scaling"]["mscale_all_dim"]
    if c.num_moe_experts:
        freq = c.moe_layer_freq
        pattern = ([1 if i % freq == 0 else 0 for i in range(c.num_layers)]
                   if isinstance(freq, int) else list(freq))
        k = pattern.index(1) if 1 in pattern else c.num_layers
        if pattern != [0] * k + [1] * (c.num_layers - k):
            _fail("moe_layer_freq", f"{freq}: HF DeepSeek-V3 has dense layers first, then MoE")
        ffn = c.moe_ffn_hidden_size
        shared = c.moe_shared_expert_intermediate_size or 0
        if shared % ffn:
            _fail("moe_shared_expert_intermediate_size",
                  f"{shared} is not a multiple of moe_ffn_hidden_size {ffn}")
        out.update({
            "n_routed_experts": c.num_moe_experts, "moe_intermediate_size": ffn,
            "n_shared_experts": shared // ffn, "num_experts_per_tok": c.moe_router_topk,
            "n_group": c.moe_router_num_groups or 1, "topk_group": c.moe_router_group_topk or 1,
            "routed_scaling_factor": c.moe_router_topk_scaling_factor or 1.0,
            "first_k_dense_replace": k, "norm_topk_prob": True, "scoring_func": "sigmoid",
            "topk_method": "noaux_tc"})
    else:  # transformers makes layers from first_k_dense_replace on MoE: none here
        out.update({"n_routed_experts": None, "first_k_dense_replace": c.num_layers})
    return out
