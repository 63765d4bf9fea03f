"""The model builder beside the release launch script (Megatron-LM core_r0.19.0
`gpt_builders.py`): imported by the script, not called when `pretrain` builds the model
itself, kept so the script's imports are the release script's."""

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)
from megatron.training.arguments import core_transformer_config_from_args


def gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
    config = config or core_transformer_config_from_args(args)
    if args.num_experts:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                          normalization=args.normalization, vp_stage=vp_stage)
    else:
        spec = get_gpt_layer_local_spec(config.num_moe_experts, config.moe_grouped_gemm,
                                        config.qk_layernorm, config.multi_latent_attention,
                                        normalization=config.normalization)
    return GPTModel(config=config, transformer_layer_spec=spec,
                    vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings,
                    pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                    pg_collection=pg_collection)
