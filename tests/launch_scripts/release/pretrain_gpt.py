"""A launch script that makes the calls Megatron-LM's release `pretrain_gpt.py` makes
(branch core_r0.19.0, repository root), knowing nothing of megaseek:
- no model provider: `pretrain(full_config, ...)` with `gpt_config_from_args(args)`, so
  Megatron builds the model itself (`megatron/training/models/gpt.py`) and wraps it in DDP
  through `megatron/training/models/dist_utils.py`;
- with `--num-experts`, Megatron's default spec is a block spec (one spec per layer);
- `get_batch` moves the batch with `.cuda(non_blocking=True)` on TP rank 0, then
  `get_batch_on_this_tp_rank`, `flatten_batch_for_packed_sequences`,
  `get_batch_on_this_cp_rank`;
- `pretrain` wrapped by `inprocess_restart.maybe_wrap_for_inprocess_restart`, and given
  `get_embedding_ranks` (with MTP ranks).
Written for the tests; its imports mirror the release script's (gpt_builders and
model_provider beside it)."""

from functools import partial

import torch

from gpt_builders import gpt_builder  # noqa: F401  (imported as the release script does)
from megatron.core import mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.enums import ModelType
from megatron.core.parallel_state import (
    get_context_parallel_group,
    get_hybrid_data_context_parallel_groups,
)
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
from megatron.core.transformer.multi_token_prediction import get_mtp_ranks
from megatron.core.transformer.multi_token_prediction import mtp_on_this_rank as mtp_on_rank
from megatron.core.utils import (
    flatten_batch_for_packed_sequences,
    get_attr_wrapped_model,
    get_batch_on_this_cp_rank,
    get_batch_on_this_tp_rank,
)
from megatron.training import get_args, inprocess_restart, pretrain
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
from megatron.training.arguments import core_transformer_config_from_args, parse_and_validate_args
from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage
from model_provider import model_provider  # noqa: F401

KEYS = ["attention_mask", "cu_seqlens", "cu_seqlens_padded", "hybrid_cp_group", "labels",
        "local_cp_size", "loss_mask", "max_seqlen", "position_ids", "tokens"]


def get_batch(data_iterator, vp_stage=None):
    args = get_args()
    config = core_transformer_config_from_args(args)
    mtp_here = mtp_on_rank(layout=config.pipeline_model_parallel_layout,
                           mtp_num_layers=config.mtp_num_layers, ignore_virtual=False,
                           vp_stage=vp_stage)
    if not is_first_or_last_pipeline_stage(vp_stage) and not mtp_here:
        return [None] * len(KEYS)
    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        batch = next(data_iterator)
        for key in KEYS:
            batch[key] = batch[key].cuda(non_blocking=True) if batch.get(key) is not None else None
    batch = get_batch_on_this_tp_rank(
        batch, broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(), has_cu_seqlens=False,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        cp_size=args.context_parallel_size, tp_rank=tp_rank,
        micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
        mtp_on_this_rank=mtp_here, pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(),
        is_pipeline_last_stage=mpu.is_pipeline_last_stage())
    batch = flatten_batch_for_packed_sequences(batch)
    batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False,
                                      cp_group=get_context_parallel_group(),
                                      hybrid_cp_group_func=get_hybrid_data_context_parallel_groups,
                                      use_per_sequence_balancing=False)
    return [batch.get(key) for key in KEYS]


def loss_func(loss_mask, output_tensor, model=None):
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1),
                                                    num_tokens.view(1)])}


def forward_step(data_iterator, model, return_schedule_plan=False):
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    (attention_mask, _, _, _, labels, _, loss_mask, _, position_ids,
     tokens) = get_batch(data_iterator, vp_stage)
    output = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask,
                   packed_seq_params=None)
    return output, partial(loss_func, loss_mask, model=model)


def is_dataset_built_on_rank(vp_stage=None):
    return mpu.get_tensor_model_parallel_rank() == 0 and is_first_or_last_pipeline_stage(vp_stage)


def train_valid_test_datasets_provider(num_samples, vp_stage=None):
    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(random_seed=args.seed, sequence_length=args.seq_length,
                              blend=blend, blend_per_split=blend_per_split, split=args.split,
                              tokenizer=build_tokenizer(args), reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False)
    dataset = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(dataset, num_samples,
                                         partial(is_dataset_built_on_rank, vp_stage=vp_stage),
                                         config).build()


def get_embedding_ranks(pp_ranks):
    ranks = [pp_ranks[0]]
    if len(pp_ranks) > 1:
        args = get_args()
        if not args.untie_embeddings_and_output_weights:
            ranks.append(pp_ranks[-1])
        ranks.extend(get_mtp_ranks(pp_ranks, core_transformer_config_from_args(args)))
    return sorted(set(ranks))


if __name__ == "__main__":
    setattr(train_valid_test_datasets_provider, "is_distributed", True)
    pretrain, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    args = parse_and_validate_args(extra_args_provider=None,
                                   args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    full_config = pretrain_cfg_container_from_args(args, gpt_config_from_args(args))
    pretrain(full_config, train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
             forward_step, store=store, get_embedding_ranks=get_embedding_ranks)
