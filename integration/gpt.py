"""GPT model, batch and dataset providers for Megatron's `pretrain()`, with plugin seams.

These are the three callables Megatron-LM's `pretrain_gpt.py` hands to `pretrain()`; the
model provider builds Megatron's `GPTModel` from its local layer spec and lets the enabled
plugins rewrite that spec as the model is built (`upstream.seams.model_specs`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
from megatron.core.utils import (
    get_attr_wrapped_model,
    get_batch_on_this_cp_rank,
    get_batch_on_this_tp_rank,
)
from megatron.training import get_args, print_rank_0
from megatron.training.argument_utils import core_transformer_config_from_args
from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                   config=None, pg_collection=None) -> GPTModel:
    """Builds this rank's GPTModel chunk from Megatron's local specs (the plugins rewrite
    them as GPTModel is built: `upstream.seams.model_specs`)."""
    args = get_args()
    config = config or core_transformer_config_from_args(args)
    if args.num_experts:
        # Megatron's block spec: one spec per layer (dense first layers, --moe-layer-freq).
        layer_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                                normalization=args.normalization,
                                                vp_stage=vp_stage)
    else:
        layer_spec = get_gpt_layer_local_spec(
            qk_layernorm=args.qk_layernorm,
            multi_latent_attention=args.multi_latent_attention,
            normalization=args.normalization,
        )
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
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


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of token losses, token count, and the report Megatron averages across DP."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1), num_tokens.view(1)])}


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def get_batch(data_iterator, vp_stage: int | None) -> dict[str, Any]:
    """TP rank 0 reads the next micro-batch and broadcasts it to the rest of its TP group."""
    args = get_args()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        batch = {key: value.to(_device(), non_blocking=True) if torch.is_tensor(value) else value
                 for key, value in next(data_iterator).items()}
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
        mtp_on_this_rank=False,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        is_pipeline_last_stage=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
    )
    return get_batch_on_this_cp_rank(
        batch, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group()
    )


def forward_step(data_iterator, model: GPTModel):
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    batch = get_batch(data_iterator, vp_stage) if is_first_or_last_pipeline_stage(vp_stage) else {}
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

