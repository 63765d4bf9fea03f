"""`megaseek convert`: Hugging Face DeepSeek-V3 folders <-> Megatron checkpoints, on the CPU.

    megaseek convert hf-to-megatron HF_DIR OUT_DIR [--mtp-num-layers 0] [--dtype D] [--overwrite]
                     [--tensor-model-parallel-size T] [--pipeline-model-parallel-size P]
                     [--expert-model-parallel-size E] [--pipeline-schedule 1f1b]
    megaseek convert megatron-to-hf CKPT_DIR OUT_DIR [--max-shard-size 5GB] [--dtype D]
                                                      [--overwrite]
    megaseek convert flags HF_DIR

hf-to-megatron writes a Megatron distributed checkpoint (torch_dist, Megatron's
`dist_checkpointing`, as a `release` checkpoint: OUT_DIR/latest_checkpointed_iteration.txt
and OUT_DIR/release/), the source `config.json` as OUT_DIR/hf_config.json and the matching
Megatron flags, one per line, in OUT_DIR/megatron_flags.txt (`megaseek pretrain $(cat
megatron_flags.txt) --plugins mla moe --load OUT_DIR --finetune` loads it at any TP/EP/PP
layout). Both directions stream: the model is built on the meta device (names, shapes
and sharding only) and one parameter (hf-to-megatron) or one layer (megatron-to-hf) is
made, written and dropped at a time, so a process's peak memory is about one layer plus
one input shard (hf-to-megatron) or one output shard of --max-shard-size (megatron-to-hf)
above its ~410 MiB of Python, torch and Megatron, whatever the number of layers. With the
default sizes 1 one process writes the whole checkpoint. With T, P or E above 1 it starts
T*P*E gloo processes on this machine, Megatron's parallel state at those sizes (expert
tensor parallel size 1): each builds only its part of the model (its pipeline stage's
layers, Megatron's even split; its tensor-parallel slices; its experts), makes its
parameters from the Hugging Face tensors it needs, sliced before they are copied, and
all save together; the checkpoint is the same as the one-process one (Megatron's sharded
state dicts are layout-free). Sizes that do not divide the model (attention heads,
vocabulary, FFN widths, routed experts, layers), more than 64 processes, and
--pipeline-schedule dualpipe or dualpipev (the checkpoint does not depend on the
schedule; it loads under any) are refused before anything is written. megatron-to-hf
reads such a folder back (its hf_config.json gives the architecture), or a checkpoint
`megaseek pretrain` saved at any layout (its saved arguments do; the vocabulary is
Megatron's padded one), on one process, and writes a Hugging Face folder. `flags` prints
the Megatron flags of a Hugging Face config. Output folders appear only when complete.
Every refusal is one `megaseek: error: ...` line and exit status 2: the output
folder (`integration.output_dir`), the config, the shards' headers and the layout are
checked before any weight is read; a non-finite weight stops the conversion as it is met.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from integration.output_dir import OutputFolderError, check_output_folder
from integration.refusals import Parser, refuse

DTYPES = ("float32", "bfloat16", "float16")
TRACKER = "latest_checkpointed_iteration.txt"


SMALLEST_SHARD = 2**10  # below it a shard holds a single small tensor: a file per tensor


def shard_size(text: str) -> int:
    """--max-shard-size: bytes, or a number with KB, MB or GB (powers of 1024), 1KB or
    more (each shard holds whole tensors, so a smaller size writes one file per tensor)."""
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "B": 1}
    try:
        unit = next((u for u in units if text.upper().endswith(u)), "")
        size = int(float(text[: len(text) - len(unit)]) * units.get(unit, 1))
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 5GB, 500MB, 8KB or a "
                                         "number of bytes)") from None
    if size < SMALLEST_SHARD:
        raise argparse.ArgumentTypeError(f"{text} must be 1KB or more (each shard holds whole "
                                         "tensors; Hugging Face's default is 5GB)")
    return size


def _parser() -> argparse.ArgumentParser:
    from integration.hf.layout import SCHEDULES

    parser = Parser(prog="megaseek convert", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    to_megatron = sub.add_parser("hf-to-megatron")
    to_megatron.add_argument("source")
    to_megatron.add_argument("out")
    to_megatron.add_argument("--mtp-num-layers", type=int, default=None,
                             help="0 leaves the checkpoint's MTP layers out")
    to_megatron.add_argument("--dtype", choices=DTYPES, default=None,
                             help="the Megatron weights' dtype (default: the checkpoint's)")
    to_megatron.add_argument("--overwrite", action="store_true")
    to_megatron.add_argument("--tensor-model-parallel-size", type=int, default=1, metavar="T",
                             help="with T, P or E above 1: convert on T*P*E CPU processes, "
                             "each building its part of the model at that layout")
    to_megatron.add_argument("--pipeline-model-parallel-size", type=int, default=1, metavar="P",
                             help="pipeline stages (Megatron's even split of the layers)")
    to_megatron.add_argument("--expert-model-parallel-size", type=int, default=1, metavar="E",
                             help="expert-parallel ranks")
    to_megatron.add_argument("--pipeline-schedule", choices=SCHEDULES, default="1f1b",
                             help="only 1f1b (the others are refused): the checkpoint loads "
                             "under any schedule")
    to_hf = sub.add_parser("megatron-to-hf")
    to_hf.add_argument("source")
    to_hf.add_argument("out")
    to_hf.add_argument("--max-shard-size", type=shard_size, default=5 * 2**30)
    to_hf.add_argument("--dtype", choices=DTYPES, default=None)
    to_hf.add_argument("--overwrite", action="store_true")
    flags = sub.add_parser("flags")
    flags.add_argument("source")
    return parser


def hf_to_megatron(source: Path, out: Path, mtp_num_layers: int | None, dtype: str | None,
                   overwrite: bool, layout=None, schedule: str = "1f1b") -> None:
    """One process (`layout` None or all sizes 1), or `layout.ranks` processes that each
    write their part of the model at that layout (`integration.hf.layout`); either way
    streamed (`convert.save_megatron`). Everything that can be checked without reading a
    weight is checked first: the output folder, the config, the shards' headers, the
    layout and Megatron's config of the model."""
    from integration.hf.config import from_hf_config, megatron_flags, read_hf_config
    from integration.hf.convert import DTYPES as TORCH_DTYPES
    from integration.hf.convert import _on_one_rank, save_megatron
    from integration.hf.layout import Layout, convert_on_ranks, peak_rss_mib
    from integration.hf.safetensors_io import staged_folder

    layout = layout or Layout()
    overrides = {}
    if mtp_num_layers is not None:
        overrides["mtp_num_layers"] = mtp_num_layers
    if dtype is not None:
        overrides["params_dtype"] = TORCH_DTYPES[dtype]
    check_output_folder(out, overwrite=overwrite, inputs=[source])
    hf_config = read_hf_config(source)
    depth = _checked_mtp_depth(source, overrides, layout, schedule)
    hf_config["num_nextn_predict_layers"] = depth
    hf_config.pop("quantization_config", None)  # the Megatron weights are dequantised
    flags = megatron_flags(from_hf_config(hf_config, source / "config.json"))
    with staged_folder(out, overwrite=overwrite) as stage:
        (stage / "release").mkdir()
        if layout.ranks == 1:
            _on_one_rank()
            save_megatron(source, stage / "release", overrides)
            print(f"megaseek convert: peak RSS {peak_rss_mib():.0f} MiB", flush=True)
        else:
            convert_on_ranks(layout, source, stage / "release", overrides)
        (stage / TRACKER).write_text("release")
        (stage / "hf_config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (stage / "megatron_flags.txt").write_text("\n".join(flags) + "\n")
    where = "" if layout.ranks == 1 else (
        f", written by {layout.ranks} ranks at TP={layout.tensor} PP={layout.pipeline} "
        f"EP={layout.expert}")
    print(f"megaseek convert: wrote {out} (Megatron torch_dist, release{where}); its flags:")
    print(" ".join(flags))


def _checked_mtp_depth(source: Path, overrides: dict, layout, schedule: str) -> int:
    """The MTP depth the import writes, after checking the checkpoint's names, dtypes, the
    layout's split and Megatron's config of the model at that layout (headers and config
    only: nothing is built or written yet)."""
    from integration.hf.config import read_hf_model
    from integration.hf.convert import _plan, megatron_config
    from integration.hf.layout import check_layout
    from integration.hf.safetensors_io import Reader

    hf = read_hf_model(source)
    reader = Reader(source)
    try:
        plan = _plan(reader, hf, overrides)
    finally:
        reader.close()
    check_layout(layout, hf, plan["mtp_layers"], schedule)
    megatron_config(hf, plan, overrides, tensor_model_parallel_size=layout.tensor,
                    pipeline_model_parallel_size=layout.pipeline,
                    expert_model_parallel_size=layout.expert, expert_tensor_parallel_size=1)
    return plan["mtp_layers"]


def megatron_to_hf(source: Path, out: Path, max_shard_size: int, dtype: str | None,
                   overwrite: bool) -> None:
    """A checkpoint written by `hf-to-megatron` (its hf_config.json gives the architecture)
    or by `megaseek pretrain --plugins mla moe` at any layout (its saved arguments do),
    read on one rank (Megatron's torch_dist format reshards) and exported layer by layer:
    the model is built on the meta device, one layer's tensors are read at a time."""
    import torch

    from integration.checkpoint_tool import checkpoint_directory, verify
    from integration.hf.convert import DTYPES as TORCH_DTYPES
    from integration.hf.convert import _on_one_rank, build_model, write_hf
    from integration.hf.layout import peak_rss_mib
    from integration.hf.lazy_load import LayerByLayer

    check_output_folder(out, overwrite=overwrite, inputs=[source])
    directory = checkpoint_directory(str(source), None, flag=None, steps=False)
    verify(directory, steps=False)  # before anything of it is read
    _on_one_rank()
    if (source / "hf_config.json").is_file():
        config, vocab, positions = _config_from_hf(source / "hf_config.json")
    else:
        config, vocab, positions = _config_from_saved_arguments(directory)
    with torch.device("meta"):  # names and shapes only: the tensors are read layer by layer
        model = build_model(config, vocab, positions)
    write_hf(LayerByLayer(model, directory), config, out, overwrite=overwrite,
             max_shard_bytes=max_shard_size, vocab_size=vocab, max_position_embeddings=positions,
             dtype=TORCH_DTYPES[dtype] if dtype else None)
    print(f"megaseek convert: wrote {out} (Hugging Face DeepSeek-V3); peak RSS "
          f"{peak_rss_mib():.0f} MiB")


def _config_from_hf(path: Path):
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from integration.hf.config import from_hf_config, megatron_fields, read_json
    from integration.hf.convert import DTYPES as TORCH_DTYPES
    from integration.hf.convert import megatron_checked

    hf = from_hf_config(read_json(path), path)
    fields = megatron_fields(hf)
    fields.update(use_cpu_initialization=True, perform_initialization=False,
                  init_model_with_meta_device=True,
                  params_dtype=TORCH_DTYPES.get(hf.dtype or "float32", TORCH_DTYPES["float32"]))
    return (megatron_checked(MLATransformerConfig, fields), hf.vocab_size,
            hf.max_position_embeddings)


# Settings of the training run that do not change the weights, reset for one CPU rank
# whose model is built on the meta device.
ONE_RANK = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                virtual_pipeline_model_parallel_size=None, pipeline_model_parallel_layout=None,
                expert_model_parallel_size=1, expert_tensor_parallel_size=1,
                context_parallel_size=1, sequence_parallel=False, use_cpu_initialization=True,
                perform_initialization=False, init_model_with_meta_device=True,
                recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
                recompute_modules=None, fp8=None, fp8_recipe=None)


def _config_from_saved_arguments(directory: str):
    import dataclasses

    from megatron.core.transformer.transformer_config import MLATransformerConfig
    from megatron.training.argument_utils import core_transformer_config_from_args

    from integration.checkpoint_tool import saved_arguments
    from integration.hf.config import HFConversionError

    args = saved_arguments(directory)
    if not args.multi_latent_attention or not args.untie_embeddings_and_output_weights:
        raise HFConversionError(f"{directory}: export needs a DeepSeek-V3 model: "
                                "--multi-latent-attention and "
                                "--untie-embeddings-and-output-weights")
    # Reset on the arguments too, not only on the config built from them: Megatron's
    # config refuses some run settings on its own (FP8 with MoE needs TE there; the fp8
    # plugin lifts that check only inside a run), and none of them changes a weight.
    args = argparse.Namespace(**{**vars(args),
                                 **{k: v for k, v in ONE_RANK.items() if hasattr(args, k)}})
    config = core_transformer_config_from_args(args, MLATransformerConfig)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    fields.update({k: v for k, v in ONE_RANK.items() if k in fields})
    return MLATransformerConfig(**fields), args.padded_vocab_size, args.max_position_embeddings


def _layout(options):
    from integration.hf.layout import Layout

    return Layout(tensor=options.tensor_model_parallel_size,
                  pipeline=options.pipeline_model_parallel_size,
                  expert=options.expert_model_parallel_size)


def main(argv: list[str] | None = None) -> None:
    """`megaseek convert ...` (argv without the `convert` word)."""
    import integration  # noqa: F401
    from integration.hf.config import HFConversionError, megatron_flags, read_hf_model
    from plugins import PluginError

    options = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if options.direction == "flags":
            print(" ".join(megatron_flags(read_hf_model(options.source))))
        elif options.direction == "hf-to-megatron":
            hf_to_megatron(Path(options.source), Path(options.out), options.mtp_num_layers,
                           options.dtype, options.overwrite, _layout(options),
                           options.pipeline_schedule)
        else:
            megatron_to_hf(Path(options.source), Path(options.out), options.max_shard_size,
                           options.dtype, options.overwrite)
    except (HFConversionError, OutputFolderError, PluginError) as e:
        refuse(e)


if __name__ == "__main__":
    main()

