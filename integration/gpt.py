"""GPT model, batch and dataset providers for Megatron's `pretrain()`, with plugin seams.

These are the three callables Megatron-LM's `pretrain_gpt.py` hands to `pretrain()`; the
model provider builds Megatron's `GPTModel` from its local layer spec (TE's with
`--transformer-impl transformer_engine`) and lets the enabled plugins rewrite that spec as
the model is built (`upstream.seams.model.model_specs`).
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any

import torch

from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_decoder_layer_specs,
    get_gpt_layer_local_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.transformer.multi_token_prediction import mtp_on_this_rank
from megatron.core.transformer.spec_utils import import_module
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
from megatron.core.utils import (
    get_attr_wrapped_model,
    get_batch_on_this_cp_rank,
    get_batch_on_this_tp_rank,
)
from megatron.training import get_args, print_rank_0
from megatron.training.argument_utils import core_transformer_config_from_args
from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage

from integration.hooks import FailedOnThisRank
from integration.transformer_engine import check_installed
from plugins import PluginError


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                   config=None, pg_collection=None) -> GPTModel:
    """Builds this rank's GPTModel chunk from Megatron's specs for `--transformer-impl` (the
    plugins rewrite them as GPTModel is built: `upstream.seams.model.model_specs`)."""
    args = get_args()
    config = config or core_transformer_config_from_args(args)
    layer_spec, mtp_spec = layer_specs(args, config, vp_stage)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        mtp_block_spec=mtp_spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )


def layer_specs(args, config, vp_stage: int | None):
    """(decoder spec, MTP block spec or None) of Megatron's GPT, for `--transformer-impl`
    local or transformer_engine (Megatron's block spec with TE's modules, MTP's too)."""
    impl = args.transformer_impl
    if impl not in ("local", "transformer_engine"):
        raise PluginError(f"--transformer-impl {impl}: megaseek builds local or "
                          "transformer_engine modules; pass --transformer-impl local")
    check_installed(args)  # also where no start-up check ran (a checkpoint's saved arguments)
    use_te = impl == "transformer_engine"
    if args.spec is not None:  # Megatron's --spec MODULE FUNCTION, as its GPT builder reads it
        layer_spec = _spec_from_flag(args.spec, config, vp_stage)
    elif args.num_experts or use_te:
        # Megatron's block spec: one spec per layer (dense first layers, --moe-layer-freq).
        layer_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                                normalization=args.normalization,
                                                vp_stage=vp_stage)
    else:
        layer_spec = get_gpt_layer_local_spec(
            qk_layernorm=args.qk_layernorm,
            multi_latent_attention=args.multi_latent_attention,
            normalization=args.normalization,
        )
    mtp_spec = _mtp_block_spec(config, vp_stage, use_te) if config.mtp_num_layers else None
    return layer_spec, mtp_spec


def _mtp_block_spec(config, vp_stage: int | None, use_te: bool):
    """MTP layers built like the decoder's last layer (whichever stage holds them), as
    Megatron's GPT builder does without a model provider (training/models/gpt.py:387), so
    both launch paths build the same MTP."""
    last_layer = get_gpt_decoder_layer_specs(config, use_transformer_engine=use_te,
                                             normalization=config.normalization,
                                             qk_l2_norm=config.qk_l2_norm,
                                             vp_stage=vp_stage)[-1]
    return get_gpt_mtp_block_spec(config, last_layer, use_transformer_engine=use_te,
                                  vp_stage=vp_stage)


def _spec_from_flag(spec: list[str], config, vp_stage: int | None):
    """`--spec MODULE FUNCTION`: a spec object, or a function of the config (and
    `vp_stage`) that returns one, as Megatron's own GPT builder calls it."""
    if len(spec) != 2:
        raise ValueError(f"--spec takes MODULE FUNCTION; got {' '.join(spec)!r}")
    found = import_module(tuple(spec))
    if found is None:
        raise ValueError(f"--spec {' '.join(spec)}: cannot import {spec[0]}")
    if not callable(found):
        return found
    if "vp_stage" in inspect.signature(found).parameters:
        return found(config, vp_stage=vp_stage)
    return found(config)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of token losses, token count, and the report Megatron averages across DP."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1), num_tokens.view(1)])}


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _mtp_on_this_stage(config, vp_stage: int | None) -> bool:
    return mtp_on_this_rank(layout=config.pipeline_model_parallel_layout,
                            mtp_num_layers=config.mtp_num_layers, ignore_virtual=False,
                            vp_stage=vp_stage)


def get_batch(data_iterator, vp_stage: int | None, mtp_here: bool) -> dict[str, Any]:
    """TP rank 0 reads the next micro-batch and broadcasts it to the rest of its TP group
    (tokens and positions too where MTP runs: it embeds the shifted tokens)."""
    args = get_args()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        read = next(data_iterator)
        check_token_ids(read, args)
        batch = {key: value.to(_device(), non_blocking=True) if torch.is_tensor(value) else value
                 for key, value in read.items()}
    batch = get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=False,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=parallel_state.get_tensor_model_parallel_src_rank(),
        broadcast_group=parallel_state.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=tp_rank,
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=mtp_here,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        is_pipeline_last_stage=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
    )
    return get_batch_on_this_cp_rank(
        batch, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group()
    )


def check_token_ids(batch: dict[str, Any], args) -> None:
    """Megatron's embedding and loss index with the token ids unchecked: an id past the
    model's vocabulary fails inside them (IndexError on CPU, a device-side assert on GPU).
    A user's --data-path says nothing about its largest id at start-up (Megatron's index
    does not hold it), so each micro-batch is checked as it is read, on the host (the
    data loader's tensors, before they move: no device sync), and the rank that finds one
    says so in one line (`FailedOnThisRank`)."""
    largest = max((int(batch[key].max()) for key in ("tokens", "labels")
                   if torch.is_tensor(batch.get(key)) and batch[key].numel()), default=-1)
    if largest >= args.padded_vocab_size:
        given = f"--vocab-size {args.vocab_size}" if args.vocab_size else "the tokenizer's"
        raise FailedOnThisRank(f"the data holds token id {largest}, outside the model's vocabulary "
                         f"of {args.padded_vocab_size} ({given}, padded to a multiple of "
                         f"--make-vocab-size-divisible-by {args.make_vocab_size_divisible_by} "
                         f"x TP): give a --vocab-size above {largest}, or the --tokenizer-type "
                         "the data was made with")


def forward_step(data_iterator, model: GPTModel):
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    mtp_here = _mtp_on_this_stage(get_attr_wrapped_model(model, "config"), vp_stage)
    needs_batch = is_first_or_last_pipeline_stage(vp_stage) or mtp_here
    batch = get_batch(data_iterator, vp_stage, mtp_here) if needs_batch else {}
    loss_mask = batch.get("loss_mask")
    output = model(batch.get("tokens"), batch.get("position_ids"), batch.get("attention_mask"),
                   labels=batch.get("labels"), loss_mask=loss_mask)
    return output, partial(loss_func, loss_mask)


def _dataset_config(args) -> GPTDatasetConfig:
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=build_tokenizer(args),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
    )


def datasets_provider(train_val_test_num_samples, vp_stage: int | None = None):
    args = get_args()
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset

    def built_on_this_rank() -> bool:
        return (is_first_or_last_pipeline_stage(vp_stage)
                and parallel_state.get_tensor_model_parallel_rank() == 0)

    print_rank_0("> building GPT datasets ...")
    return BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, built_on_this_rank, _dataset_config(args)
    ).build()


datasets_provider.is_distributed = True  # every rank calls it; Megatron broadcasts nothing

