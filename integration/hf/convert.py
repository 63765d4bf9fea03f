"""`import_hf` / `export_hf`: Hugging Face DeepSeek-V3 folders <-> megaseek's Megatron model.

Import reads `config.json` and the shards' headers first and stops at the first field or
tensor it does not support (naming it) before any weight is read; then it makes the
model's parameters one at a time from the HF tensors (`HFParameters`) and copies them
into a model built on the CPU (Megatron's GPTModel from its local block spec, rewritten by
the mla and moe plugins' spec transforms, as `megaseek pretrain` builds it). Export
writes the model's tensors as they are converted, into shards of bounded size, in a
staged folder that appears only when complete.

The streamed forms hold no whole model: `save_megatron` builds it on the meta device and
saves a Megatron checkpoint whose parameters `HFParameters` makes as they are written
(`lazy_save`); `write_hf` exports from any mapping of tensors, such as a checkpoint read
layer by layer (`lazy_load`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch

from integration.hf import keys
from integration.hf.config import (HFConversionError, HFModel, from_hf_config, in_config_terms,
                                   megatron_fields, read_hf_model, to_hf_config)
from integration.hf.fp8 import (BLOCK, QUANTIZATION_CONFIG, SCALE_SUFFIX, dequantize_weight,
                                quantize_weight, scale_shape, stored_in_fp8)
from integration.hf.safetensors_io import Reader, ShardWriter, staged_folder

log = logging.getLogger("megaseek.hf")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# safetensors' dtype strings of the tensors a checkpoint may hold
_FLOAT = {"F32", "BF16", "F16"}
_FP8 = "F8_E4M3"


def _on_one_rank(seed: int = 1234) -> None:
    """Megatron's parallel state on this process alone (gloo, CPU fixes), unless a caller
    already set one up."""
    import integration  # noqa: F401  (Megatron importable on Python 3.11)
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from upstream import cpu

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        cpu.install(force=True)  # the model is on the CPU, whatever the machine has
        parallel_state.initialize_model_parallel(expert_tensor_parallel_size=1)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def build_model(config, vocab_size: int, max_position_embeddings: int,
                pre_process: bool = True, post_process: bool = True):
    """Megatron's GPTModel as megaseek builds it with `--plugins mla moe`: local block
    spec (dense first layers), MTP layers built like the last decoder layer, the plugins'
    spec transforms on both. Under pipeline parallelism the block spec and GPTModel take
    this stage's layers from Megatron's parallel state (as its own builder does), and
    `pre_process` / `post_process` say whether the stage holds the embedding / the head."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_decoder_block_spec,
                                                          get_gpt_decoder_layer_specs,
                                                          get_gpt_mtp_block_spec)

    import plugins
    from plugins.mla.plugin import MLA, MLAPluginConfig
    from plugins.moe.plugin import MOE, MoEPluginConfig

    mla = plugins.Enabled(MLA, MLAPluginConfig())
    enabled = [mla, plugins.Enabled(MOE, MoEPluginConfig())] if config.num_moe_experts else [mla]
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                       normalization="RMSNorm")
    mtp = None
    if config.mtp_num_layers:
        last = get_gpt_decoder_layer_specs(config, use_transformer_engine=False,
                                           normalization="RMSNorm")[-1]
        mtp = plugins.transform_spec(enabled, get_gpt_mtp_block_spec(
            config, last, use_transformer_engine=False))
    return GPTModel(config=config,
                    transformer_layer_spec=plugins.transform_spec(enabled, block),
                    vocab_size=vocab_size, max_sequence_length=max_position_embeddings,
                    position_embedding_type="rope", rotary_base=int(config.rotary_base),
                    share_embeddings_and_output_weights=False, mtp_block_spec=mtp,
                    pre_process=pre_process, post_process=post_process)


def _mtp_layer(name: str, hf: HFModel) -> int | None:
    """The MTP depth an HF tensor belongs to, or None for the main model."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        depth = int(parts[2]) - hf.num_hidden_layers
        return depth if depth >= 0 else None
    return None


def import_hf(path: str | Path, **megatron_overrides: Any):
    """A Megatron model (this project's MLA and MoE modules, on the CPU, one process) and its
    `MLATransformerConfig`, from a Hugging Face DeepSeek-V3 folder.

    `megatron_overrides` are config fields set over the mapped ones (`params_dtype`
    defaults to the checkpoint's dtype; `mtp_num_layers=0` leaves its MTP layers out).
    FP8 weights are dequantised with their 128x128 blocks' `weight_scale_inv`.

    Unless the caller has set them up, this process gets a one-rank gloo group, Megatron's
    parallel state (all sizes 1) and megaseek's CPU fixes (`upstream.cpu`), which the
    returned model needs to run; they stay in place.
    """
    path = Path(path)
    hf = read_hf_model(path)
    reader = Reader(path)
    try:
        plan = _plan(reader, hf, megatron_overrides)
        _on_one_rank()
        config = megatron_config(hf, plan, megatron_overrides)
        model = build_model(config, hf.vocab_size, hf.max_position_embeddings)
        _load(reader, hf, model, plan)
    finally:
        reader.close()
    return model, config


def megatron_config(hf: HFModel, plan: dict[str, Any], overrides: dict[str, Any],
                    **parallel_sizes: int):
    """The `MLATransformerConfig` of the import: the architecture's fields, the
    checkpoint's dtype, the MTP depth `_plan` decided, `overrides` over them, and
    `parallel_sizes` (Megatron's *_model_parallel_size fields; all 1 when left out)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    fields = megatron_fields(hf)
    fields.update(use_cpu_initialization=True, perform_initialization=False,
                  params_dtype=DTYPES.get(hf.dtype or "float32", torch.float32),
                  mtp_num_layers=plan["mtp_layers"] or None)
    fields.update({k: v for k, v in overrides.items() if k != "mtp_num_layers"})
    fields.update(parallel_sizes)
    if fields.get("pipeline_model_parallel_size", 1) > 1:  # stages pass activations in it
        fields["pipeline_dtype"] = fields["params_dtype"]
    fields["bf16"] = fields["params_dtype"] == torch.bfloat16
    fields["fp16"] = fields["params_dtype"] == torch.float16
    return megatron_checked(MLATransformerConfig, fields)


def megatron_checked(config_class, fields: dict[str, Any]):
    """`config_class(**fields)` (Megatron's transformer config), its refusal of fields that
    come from config.json reported by their config.json names (`config.in_config_terms`)."""
    try:
        return config_class(**fields)
    except (AssertionError, ValueError, NotImplementedError) as e:
        raise HFConversionError("config.json: Megatron refuses the model it describes: "
                                f"{in_config_terms(str(e))}") from None


def _plan(reader: Reader, hf: HFModel, overrides: dict[str, Any],
          say: Callable[..., None] = log.warning) -> dict[str, Any]:
    """Checks the checkpoint's tensor names, dtypes and FP8 scales against the config
    (headers only) and decides the MTP depth to import, telling the user through `say`
    when MTP layers are left out."""
    names = reader.names()
    scales = {n for n in names if n.endswith(SCALE_SUFFIX)}
    weights = names - scales
    depth = hf.num_nextn_predict_layers
    in_mtp = {n for n in weights if _mtp_layer(n, hf) is not None}
    requested = overrides.get("mtp_num_layers", depth)
    skipped: set[str] = set()
    mtp_layers = depth
    if depth and not in_mtp:
        say("import_hf: config.json has num_nextn_predict_layers %d but the checkpoint "
                    "has no MTP tensors (as transformers writes it): importing the main model",
                    depth)
        mtp_layers = 0
    elif not requested and depth:
        say("import_hf: mtp_num_layers=0: leaving out the checkpoint's %d MTP layer(s) "
                    "(model.layers.%d.*)", depth, hf.num_hidden_layers)
        mtp_layers = 0
        skipped = {n for n in in_mtp if _mtp_layer(n, hf) < depth}
    elif requested and requested != depth:
        raise HFConversionError(f"mtp_num_layers={requested}: the checkpoint has {depth} MTP "
                                f"layer(s) (num_nextn_predict_layers); 0 leaves them out")
    keys.check_names(weights - skipped, hf, mtp_layers)
    fp8: set[str] = set()
    for name in sorted(scales, key=keys.natural_order):
        weight = name[: -len(SCALE_SUFFIX)]
        if weight not in weights or weight in skipped:
            if weight in skipped:
                continue
            raise HFConversionError(f"unexpected tensor {name} (no {weight})")
        if hf.fp8_block is None:
            raise HFConversionError(f"{name}: FP8 scales without quantization_config in "
                                    "config.json")
        fp8.add(weight)
    for name in sorted(weights - skipped, key=keys.natural_order):
        shape, dtype = reader.header(name)
        if dtype == _FP8:
            if name not in fp8:
                raise HFConversionError(f"{name}: FP8 ({dtype}) without {name}{SCALE_SUFFIX}")
            s_shape, s_dtype = reader.header(name + SCALE_SUFFIX)
            if len(shape) != 2 or tuple(s_shape) != scale_shape(shape, hf.fp8_block):
                raise HFConversionError(
                    f"{name}{SCALE_SUFFIX}: shape {tuple(s_shape)}, expected "
                    f"{scale_shape(shape, hf.fp8_block) if len(shape) == 2 else '2-D weight'} "
                    f"for {name} {tuple(shape)} in {hf.fp8_block[0]}x{hf.fp8_block[1]} blocks")
            if s_dtype not in _FLOAT:
                raise HFConversionError(f"{name}{SCALE_SUFFIX}: dtype {s_dtype}, expected F32")
        elif name in fp8:
            raise HFConversionError(f"{name}: has {name}{SCALE_SUFFIX} but dtype {dtype}, not "
                                    f"{_FP8}")
        elif dtype not in _FLOAT:
            raise HFConversionError(f"{name}: dtype {dtype} not supported (F32, BF16, F16, or "
                                    f"{_FP8} with scales)")
    return {"mtp_layers": mtp_layers, "skipped": skipped, "fp8": fp8}


@dataclasses.dataclass(frozen=True)
class Part:
    """The part of the model one rank holds: tensor-parallel rank `tp_rank` of `tp_size`
    (Megatron's partition attributes say which parameters are split, and along which
    dim), the routed experts `experts` (global numbers; their local numbers count from
    its start) and, at pipeline parallel size > 1, its stage's decoder layers `layers`
    (global number -> local). `None`: all of them, numbered as in the whole model."""
    tp_rank: int = 0
    tp_size: int = 1
    experts: range | None = None
    layers: dict[int, int] | None = None

    @property
    def whole(self) -> bool:
        return self.tp_size == 1 and self.experts is None and self.layers is None


WHOLE = Part()
_DECODER_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def _local_target(target: keys.Target, part: Part, state: dict) -> keys.Target | None:
    """`target` as named in this rank's model (local layer and expert numbers), or None
    when another rank holds it."""
    if part.whole:
        return target
    name, expert = target.name, target.expert
    match = _DECODER_LAYER.fullmatch(name)
    if part.layers is not None and match:
        local = part.layers.get(int(match.group(1)))
        if local is None:
            return None
        name = f"decoder.layers.{local}.{match.group(2)}"
    elif part.layers is not None and name not in state:
        return None  # the embedding, head, final norm or MTP block of another stage
    if expert is not None and part.experts is not None:
        if expert not in part.experts:
            return None
        expert -= part.experts.start
    return dataclasses.replace(target, name=name, expert=expert)


def _split_dim(param: torch.Tensor, part: Part) -> int | None:
    """The dim of the HF tensor this rank holds a 1/tp_size slice of (None: all of it)."""
    if part.tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return None
    return param.partition_dim


def _local_shape(shape: tuple[int, ...], param: torch.Tensor, part: Part,
                 name: str) -> tuple[int, ...]:
    dim = _split_dim(param, part)
    if dim is None:
        return tuple(shape)
    if shape[dim] % part.tp_size:
        raise HFConversionError(f"{name}: dim {dim} ({shape[dim]}) does not split over "
                                f"{part.tp_size} tensor-parallel ranks")
    return tuple(shape[:dim]) + (shape[dim] // part.tp_size,) + tuple(shape[dim + 1:])


def _tp_slice(tensor: torch.Tensor, param: torch.Tensor, part: Part) -> torch.Tensor:
    """This rank's tensor-parallel slice of an HF tensor already in Megatron's row order
    (a fused fc1's gate and up are each split, as Megatron splits [gate | up])."""
    dim = _split_dim(param, part)
    if dim is None:
        return tensor
    size = tensor.shape[dim] // part.tp_size
    return tensor.narrow(dim, part.tp_rank * size, size)


def _load(reader: Reader, hf: HFModel, model, plan: dict[str, Any], part: Part = WHOLE) -> None:
    """Copies the HF tensors `part` holds into `model` (this rank's), one parameter made at
    a time, after checking every name and shape (headers only)."""
    parameters = HFParameters(reader, hf, plan, model, part)
    with torch.no_grad():
        for name in sorted(parameters.sources, key=parameters.order):
            parameters.state[name].copy_(parameters(name))


def _check_covered(state: dict, targets: dict[str, keys.Target]) -> None:
    covered = {t.name for t in targets.values()}
    for name, value in state.items():
        if torch.is_tensor(value) and name not in covered:
            raise HFConversionError(f"the Megatron model's {name} has no tensor in the checkpoint")


class HFParameters:
    """This rank's parameters of `model` made one at a time from the HF tensors: `self(name)`
    reads the tensors that go into parameter `name`, converts and places them into a new
    tensor. `model` only names the parameters and gives their shapes, dtypes and
    tensor-parallel attributes: it may be built on the meta device. Names and shapes are
    checked when this is made, before any tensor is read."""

    def __init__(self, reader: Reader, hf: HFModel, plan: dict[str, Any], model,
                 part: Part = WHOLE):
        self.reader, self.hf, self.plan, self.part = reader, hf, plan, part
        self.state = model.state_dict(keep_vars=True)
        self.targets = _targets(reader, hf, plan, part, self.state)
        _check_covered(self.state, self.targets)
        self.sources: dict[str, list[str]] = {}
        for hf_name, target in self.targets.items():
            self.sources.setdefault(target.name, []).append(hf_name)

    def __call__(self, name: str) -> torch.Tensor:
        meta = self.state[name]
        tensor = torch.empty(meta.shape, dtype=meta.dtype)
        sources = self.sources[name]
        for hf_name in sources:
            target = self.targets[hf_name]
            if target.kind != keys.SHARED:
                _place(self._local(hf_name, target, meta), target, tensor)
        more = f" and {len(sources) - 1} more" if len(sources) > 1 else ""
        check_finite(tensor, f"{name} (from {sources[0]}{more})", f"after the cast to "
                     f"{tensor.dtype} (beyond its range: choose another --dtype)")
        for hf_name in sources:  # DeepSeek's MTP copies of the embedding and head
            target = self.targets[hf_name]
            if target.kind == keys.SHARED and not torch.equal(self._local(hf_name, target, meta),
                                                              tensor):
                raise HFConversionError(f"{hf_name} differs from the main model's {name}, "
                                        "which Megatron's MTP layer shares")
        return tensor

    def _local(self, hf_name: str, target: keys.Target, meta: torch.Tensor) -> torch.Tensor:
        return _local_tensor(self.reader, hf_name, self.plan, self.hf, target, meta, self.part)

    def order(self, name: str) -> tuple:
        """Sorts parameters by the shard their first tensor is in (one shard mapped at a
        time while they are made)."""
        first = min(str(self.reader.files[n]) for n in self.sources[name])
        return first, keys.natural_order(name)


def _said_before(*message) -> None:
    """`_plan`'s notice where `megaseek convert` gave it once already, before any rank."""


def save_megatron(source: Path, release: Path, overrides: dict[str, Any], part_of=None,
                  **parallel_sizes: int) -> None:
    """Writes this rank's part of the HF checkpoint in `source` into the Megatron torch_dist
    checkpoint `release` (with the other ranks of Megatron's parallel state, already set
    up), streamed: the model is built on the meta device and each parameter is made from
    the HF tensors only as it is written (`lazy_save.LazySave`), so a rank holds one
    parameter and one mapped shard at a time; what it leaves out of the checkpoint (MTP
    layers) the caller has said (`_plan`). `part_of(model, hf)` gives the rank's `Part`
    (the whole model when left out); `parallel_sizes` are Megatron's *_model_parallel_size
    config fields."""
    from megatron.core import dist_checkpointing, parallel_state

    from integration.hf.lazy_save import LazySave

    hf = read_hf_model(source)
    reader = Reader(source)
    try:
        plan = _plan(reader, hf, overrides, say=_said_before)
        # init_model_with_meta_device: the last pipeline stage does not copy the embedding
        # from the first (language_module.py:305)
        config = megatron_config(hf, plan, overrides, init_model_with_meta_device=True,
                                 **parallel_sizes)
        # Megatron's use_cpu_initialization allocates with torch.empty and no device
        # (tensor_parallel/layers.py:278, :972), which the meta device context takes
        with torch.device("meta"):
            model = build_model(config, hf.vocab_size, hf.max_position_embeddings,
                                pre_process=parallel_state.is_pipeline_first_stage(),
                                post_process=parallel_state.is_pipeline_last_stage())
        parameters = HFParameters(reader, hf, plan, model,
                                  part_of(model, hf) if part_of else WHOLE)
        strategy = LazySave(parameters.state, parameters, order=parameters.order)
        dist_checkpointing.save({"model": model.sharded_state_dict(), "checkpoint_version": 3.0,
                                 "iteration": 0}, str(release), sharded_strategy=strategy)
    finally:
        reader.close()


def _targets(reader: Reader, hf: HFModel, plan: dict[str, Any], part: Part,
             state: dict) -> dict[str, keys.Target]:
    """HF name -> its target in this rank's model, for the tensors this rank holds (their
    shapes checked against the model's)."""
    targets = {}
    for name in sorted(reader.names() - plan["skipped"], key=keys.natural_order):
        if name.endswith(SCALE_SUFFIX):
            continue
        whole = keys.megatron_target(name, hf, plan["mtp_layers"])
        target = _local_target(whole, part, state)
        if target is None:
            continue
        param = state.get(target.name)
        if param is None:
            raise HFConversionError(f"{name}: the Megatron model has no {target.name}")
        want = keys.expected_shape(target, param)
        got, _ = reader.header(name)
        if _local_shape(got, param, part, name) != want:
            raise HFConversionError(f"{name}: shape {tuple(got)} does not match the config "
                                    f"({want}, for {whole.name})")
        targets[name] = target
    return targets


def _local_tensor(reader: Reader, name: str, plan, hf: HFModel, target: keys.Target,
                  param: torch.Tensor, part: Part) -> torch.Tensor:
    """The HF tensor in Megatron's row order, sliced to this rank's part."""
    tensor = _read(reader, name, plan, hf, param.dtype)
    fp8 = f" (dequantised with {name}{SCALE_SUFFIX})" if name in plan["fp8"] else ""
    check_finite(tensor, name, f"in {reader.files[name]}{fp8}")
    if target.kind in (keys.ROPE_Q, keys.ROPE_KV) and hf.rope_interleave:
        tensor = keys.reorder_rope(tensor, target.kind, hf, inverse=False)
    return _tp_slice(tensor, param, part)


def _read(reader: Reader, name: str, plan, hf: HFModel, dtype: torch.dtype) -> torch.Tensor:
    tensor = reader.get(name)
    if name in plan["fp8"]:
        return dequantize_weight(name, tensor, reader.get(name + SCALE_SUFFIX), hf.fp8_block, dtype)
    return tensor


def check_finite(tensor: torch.Tensor, name: str, where: str) -> None:
    """Raises naming tensor `name` when it holds NaN or inf: one reduction (NaN and inf
    reach its min or max), no copy of the tensor; counted only when it fails."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    low, high = torch.aminmax(tensor)
    if torch.isfinite(low) and torch.isfinite(high):
        return
    nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    raise HFConversionError(f"{name}: {nan} NaN and {inf} inf among its {tensor.numel()} "
                            f"values {where}; a checkpoint with non-finite weights is not "
                            "converted")


def _place(tensor: torch.Tensor, target: keys.Target, param: torch.Tensor) -> None:
    """Copies a (local) tensor into its place in `param`: whole, the gate or up half of a
    fused fc1, or one expert's slice of a stacked weight."""
    kind = target.kind
    if kind in (keys.COPY, keys.ROPE_Q, keys.ROPE_KV):
        param.copy_(tensor)
    elif kind in (keys.GATE, keys.UP):
        half = param.shape[0] // 2
        param[:half].copy_(tensor) if kind == keys.GATE else param[half:].copy_(tensor)
    elif kind in (keys.EXPERT_GATE, keys.EXPERT_UP):
        half = param.shape[1] // 2
        rows = slice(0, half) if kind == keys.EXPERT_GATE else slice(half, None)
        param[target.expert, rows].copy_(tensor)
    elif kind == keys.EXPERT_DOWN:
        param[target.expert].copy_(tensor)
    else:  # pragma: no cover
        raise AssertionError(kind)


def _hf_tensor(target: keys.Target, param: torch.Tensor, hf: HFModel) -> torch.Tensor:
    kind = target.kind
    if kind in (keys.ROPE_Q, keys.ROPE_KV):
        return keys.reorder_rope(param, kind, hf, inverse=True)
    if kind in (keys.COPY, keys.SHARED):
        return param
    if kind in (keys.GATE, keys.UP):
        half = param.shape[0] // 2
        return param[:half] if kind == keys.GATE else param[half:]
    if kind in (keys.EXPERT_GATE, keys.EXPERT_UP):
        half = param.shape[1] // 2
        rows = slice(0, half) if kind == keys.EXPERT_GATE else slice(half, None)
        return param[target.expert, rows]
    return param[target.expert]


def export_hf(model, config, path: str | Path, *, overwrite: bool = False,
              max_shard_bytes: int = 5 * 2**30, vocab_size: int | None = None,
              max_position_embeddings: int | None = None, dtype: torch.dtype | None = None,
              mtp: bool = True, fp8: bool = False) -> Path:
    """Writes `model` (built as `import_hf` builds it) as a Hugging Face DeepSeek-V3 folder:
    config.json as DeepSeek publishes it, safetensors shards and their index, tensors in
    the model's dtype (`dtype` casts the weights, not the router's fp32 bias), no FP8. MTP
    layers are written as DeepSeek's layer N+j (with copies of the embedding and head)
    unless `mtp=False`. `fp8=True` writes DeepSeek's FP8 format instead: the layers'
    projections as E4M3 with a `weight_scale_inv` per 128x128 block (the fp8 plugin's
    quantisation) and `quantization_config`. The folder appears only when complete."""
    return write_hf(model.state_dict(), config, path, overwrite=overwrite,
                    max_shard_bytes=max_shard_bytes, vocab_size=vocab_size,
                    max_position_embeddings=(max_position_embeddings
                                             or getattr(model, "max_sequence_length", None)),
                    dtype=dtype, mtp=mtp, fp8=fp8)


def write_hf(state: Mapping[str, torch.Tensor], config, path: str | Path, *,
             overwrite: bool = False, max_shard_bytes: int = 5 * 2**30,
             vocab_size: int | None = None, max_position_embeddings: int | None = None,
             dtype: torch.dtype | None = None, mtp: bool = True, fp8: bool = False) -> Path:
    """`export_hf` of the Megatron tensors `state` (by model name; read in Hugging Face
    order, one at a time, each converted and handed to the shard writer before the next:
    a lazy `state` such as `lazy_load.LayerByLayer` keeps memory to one layer and one
    output shard)."""
    vocab = vocab_size or state["embedding.word_embeddings.weight"].shape[0]
    weight_dtype = dtype or config.params_dtype
    name = {v: k for k, v in DTYPES.items()}[weight_dtype]
    cfg = to_hf_config(config, vocab, max_position_embeddings, dtype=name)
    depth = (config.mtp_num_layers or 0) if mtp else 0
    cfg["num_nextn_predict_layers"] = depth if mtp else 0
    hf = from_hf_config(cfg)
    order = keys.hf_names(hf, depth)
    targets = {n: keys.megatron_target(n, hf, depth) for n in order}
    for hf_name, target in targets.items():  # before anything is written
        if target is None or target.name not in state:
            raise HFConversionError(f"{hf_name}: no Megatron tensor "
                                    f"{getattr(target, 'name', '?')} in the model")
    with staged_folder(path, overwrite=overwrite) as stage:
        if fp8:
            cfg["quantization_config"] = dict(QUANTIZATION_CONFIG)
        (stage / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        writer = ShardWriter(stage, max_shard_bytes)
        for hf_name in order:
            for name, tensor in _hf_outputs(hf_name, targets[hf_name], state, hf, weight_dtype,
                                            fp8):
                writer.add(name, tensor)
        writer.finish()
    return Path(path)


def _hf_outputs(hf_name: str, target: keys.Target, state: Mapping[str, torch.Tensor],
                hf: HFModel, weight_dtype: torch.dtype, fp8: bool) -> list:
    """The (name, tensor) pairs one HF tensor is written as, in tensors of their own (no
    view keeps a Megatron tensor, or a lazy `state`'s layer, alive once they are made)."""
    tensor = _hf_tensor(target, state[target.name], hf)
    check_finite(tensor, hf_name, f"in the Megatron checkpoint's {target.name}")
    if fp8 and stored_in_fp8(hf_name):
        q, scale_inv = quantize_weight(tensor, BLOCK)
        return [(hf_name, q), (hf_name + SCALE_SUFFIX, scale_inv)]
    if not hf_name.endswith("e_score_correction_bias") and tensor.dtype != weight_dtype:
        tensor = tensor.to(weight_dtype)
        check_finite(tensor, hf_name, f"after the cast to {weight_dtype} (beyond its range: "
                     "choose another --dtype)")
    return [(hf_name, tensor.clone())]
