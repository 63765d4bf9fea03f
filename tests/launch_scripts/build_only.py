"""A launch script that only builds the model as Megatron's `pretrain` would (through
`get_model` with a model provider) and prints, per pipeline chunk, what it holds:
`chunk RANK CHUNK embedding=0|1 head=0|1 layers=N,N,...` (global layer numbers)."""

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.parallel_state import get_pipeline_model_parallel_rank
from megatron.training import get_args
from megatron.training.arguments import core_transformer_config_from_args, parse_and_validate_args
from megatron.training.initialize import initialize_megatron
from megatron.training.training import get_model


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None,
                   pg_collection=None):
    args = get_args()
    return GPTModel(config=config or core_transformer_config_from_args(args),
                    transformer_layer_spec=get_gpt_layer_local_spec(),
                    vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings,
                    pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                    pg_collection=pg_collection)


if __name__ == "__main__":
    parse_and_validate_args()
    initialize_megatron(allow_no_cuda=True)  # (a no-op check on GPUs; lets it run on CPU)
    for chunk, model in enumerate(get_model(model_provider, wrap_with_ddp=False)):
        layers = ",".join(str(layer.layer_number) for layer in model.decoder.layers)
        print(f"chunk {get_pipeline_model_parallel_rank()} {chunk} "
              f"embedding={int(model.pre_process)} head={int(model.post_process)} "
              f"layers={layers}", flush=True)
