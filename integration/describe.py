"""`megaseek describe --preset NAME [FLAGS]`: what a model costs, by arithmetic over its
flags; nothing is built.

    megaseek describe --preset deepseek-v3 --plugins mla moe fp8 dualpipe \\
        --pipeline-schedule dualpipe --pipeline-model-parallel-size 16 \\
        --pipeline-model-parallel-layout "Etttt|(tttt|)*14tmL" \\
        --expert-model-parallel-size 64 --data-parallel-size 128 --micro-batch-size 1 \\
        --global-batch-size 15360 --bf16 --use-distributed-optimizer \\
        --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16 --recompute-granularity selective \\
        --recompute-modules layernorm mla_up_proj

(DeepSeek's recipe: `integration.deepseek_v3.RECIPE`) prints
- the parameters of the main model and of the MTP modules, total and activated per token;
- per pipeline rank, each of its stages (contents, parameters, activation bytes and
  forward + backward FLOPs of one micro-batch, the micro-batches of it in flight at the
  rank's peak, from the schedule's own program: 1F1B P - rank, DualPipe P + 1 and
  DualPipeV 2P + 1 stages of their P- and 2P-stage cuts), and the rank's parameter,
  gradient, optimizer-state and activation bytes;
- how evenly the stages and ranks share the FLOPs, and DeepSeek's memory savings that
  megaseek does not have yet with what each would save;
- training FLOPs per token (forward + backward, for MFU), attention and the routed experts
  a token actually uses included.
`--json` prints every figure as an exact integer instead.

The flags are read as a run reads them: Megatron's parser (`add_megatron_arguments`) with
the plugins' flags (the registry's `add_arguments`, as the launch adds them), after
`--preset` is expanded; describe adds only `--data-parallel-size` (a run derives it from
the world size) and `--json`. A flag describe does not model is refused by name, never
ignored; the flags get a run's start-up checks (`run_start_up_checks`): what a run
refuses, describe refuses. The figures are the cost models' (`integration.cost`, which
composes the plugins': `plugins.mla.cost`, `plugins.moe.cost`, `plugins.fp8.cost`); the
stages are the run's (`stage_layout`), at the places the schedule's `Pipeline` puts them.
Conventions (see `integration.cost`): the vocabulary is `--vocab-size` as given for the
model totals, padded as Megatron pads it (`--make-vocab-size-divisible-by` x TP) for the
per-rank bytes; activations as the plugins' layers keep them on a GPU, dropout off.
DeepSeek-V3: 671.0B total, 36.6B activated (the report's 37B; README_WEIGHTS counts 36.7B
without the 0.9B embedding); its MTP module 11.6B, of which the transformer layer is
README_WEIGHTS' 11.5B.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import asdict, dataclass

from integration import cost, presets
from integration.refusals import Parser, refuse
from plugins.common.cost import Activations
from plugins.dualpipe.layout import (
    EMBEDDING,
    FIRST_FLAG,
    LAST_FLAG,
    LAYOUT_FLAG,
    LOSS,
    MTP,
    LayoutError,
    StageLayout,
)
from plugins.fp8.cost import FP8Activations, weight_cache_bytes

GB = 1e9


class DescribeError(SystemExit):
    """A refusal: printed as every megaseek refusal, `megaseek: error: MESSAGE`, exit
    status 2 (`integration.refusals`)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


# --- the flags -------------------------------------------------------------------------------

# The flags whose values the figures depend on; a flag of Megatron's or of a plugin's that
# is not here would change what a run costs in a way describe does not count, so it is
# refused by name.
READ = frozenset("""
    --num-layers --hidden-size --ffn-hidden-size --num-attention-heads --kv-channels
    --group-query-attention --num-query-groups --seq-length --max-position-embeddings
    --vocab-size --make-vocab-size-divisible-by --swiglu --normalization
    --disable-bias-linear --untie-embeddings-and-output-weights --mtp-num-layers
    --mtp-loss-scaling-factor --spec --attention-dropout --hidden-dropout
    --multi-latent-attention --q-lora-rank --kv-lora-rank --qk-head-dim
    --qk-pos-emb-head-dim --v-head-dim
    --num-experts --moe-ffn-hidden-size --moe-shared-expert-intermediate-size
    --moe-shared-expert-gate --moe-layer-freq --moe-router-topk
    --moe-router-load-balancing-type --moe-aux-loss-coeff
    --plugins --bf16 --fp8-format --fp8-recipe --fp8-cache-weights --fp8-exclude-modules
    --moe-fp8-dispatch
    --tensor-model-parallel-size --pipeline-model-parallel-size --expert-model-parallel-size
    --data-parallel-size --decoder-first-pipeline-num-layers
    --decoder-last-pipeline-num-layers --pipeline-model-parallel-layout --pipeline-schedule
    --micro-batch-size
    --recompute-granularity --recompute-modules --recompute-method --recompute-num-layers
    --use-distributed-optimizer --main-grads-dtype --exp-avg-dtype --exp-avg-sq-dtype --json
""".split())
# Read (checked as a run checks them), but they change no figure: the positional
# encoding's settings, the router's, and the EMA's (its copy of the weights is in host
# memory).
READ_UNCOUNTED = frozenset("""
    --position-embedding-type --rope-type --rotary-base --rotary-scaling-factor
    --yarn-original-max-position-embeddings --yarn-beta-fast --yarn-beta-slow --mscale
    --mscale-all-dim --norm-epsilon --moe-router-num-groups --moe-router-group-topk
    --moe-router-score-function --moe-router-bias-update-rate
    --moe-router-topk-scaling-factor --moe-router-dtype --fp8-backend
    --moe-router-enable-expert-bias --no-rope-fusion
    --expert-tensor-parallel-size --global-batch-size
    --ema-decay --ema-interval --ema-start-iter
""".split())
HELP = frozenset({"-h", "--help"})
# Flags Megatron takes more values of than describe counts.
COUNTED_VALUES = {"--recompute-method": ("uniform",), "--fp8-format": ("e4m3",),
                  "--fp8-recipe": ("blockwise",), "--exp-avg-dtype": ("fp32", "bf16"),
                  "--exp-avg-sq-dtype": ("fp32", "bf16")}
# Megatron's own schedule: what a run gets without `--pipeline-schedule`.
ONE_F_ONE_B = "1f1b"
RECOMPUTE_NAMES = ("layernorm", "mla_up_proj", "mlp", "moe", "moe_act", "shared_experts")


def parser() -> argparse.ArgumentParser:
    """Megatron's parser with the plugins' flags, as a run builds it, plus describe's own
    two; its refusals in one line (`integration.refusals.Parser`)."""
    from megatron.training.arguments import add_megatron_arguments

    from plugins import default_registry

    p = Parser(prog="megaseek describe", allow_abbrev=False,
               description="what a model costs, by arithmetic over its flags")
    add_megatron_arguments(p)
    default_registry().add_arguments(p)
    own = p.add_argument_group("megaseek describe")
    own.add_argument("--data-parallel-size", type=int, default=1,
                     help="the data-parallel ranks (a run derives them from the world size); "
                          "they divide the distributed optimizer's state")
    own.add_argument("--json", action="store_true",
                     help="every figure as an exact integer, in JSON")
    for action in p._actions:  # --help lists what describe reads
        if not set(action.option_strings) & (READ | READ_UNCOUNTED | HELP):
            action.help = argparse.SUPPRESS
    # A run without data or tokenizer flags trains on the byte corpus (257 tokens), one
    # sequence a micro-batch unless told.
    p.set_defaults(vocab_size=257, micro_batch_size=1)
    return p


def _without_one_f_one_b(argv: list[str]) -> list[str]:
    """argv without `--pipeline-schedule 1f1b`, which names the schedule a run gets
    without the flag (the dualpipe plugin's flag takes its own schedules only)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--pipeline-schedule" and argv[i + 1:i + 2] == [ONE_F_ONE_B]:
            i += 2
            continue
        if argv[i] != f"--pipeline-schedule={ONE_F_ONE_B}":
            out.append(argv[i])
        i += 1
    return out


def _given(p: argparse.ArgumentParser, argv: list[str]) -> dict[str, str]:
    """{option: its last value as given} for every option in argv, in order; an option
    the parser does not know maps to None."""
    given: dict[str, str] = {}
    for i, word in enumerate(argv):
        if not word.startswith("--"):
            continue
        option, _, value = word.partition("=")
        if option not in p._option_string_actions:
            given.setdefault(option, None)
            continue
        given[option] = value or (argv[i + 1] if i + 1 < len(argv) else "")
    return given


def parse(argv: list[str]) -> argparse.Namespace:
    argv = _without_one_f_one_b(presets.expand(list(argv), announce=False))
    with warnings.catch_warnings():  # megatron's import-time notes about TE and Apex
        warnings.simplefilter("ignore")
        p = parser()
    given = _given(p, argv)
    for option, value in given.items():
        if value is None or option not in READ | READ_UNCOUNTED | HELP:
            raise DescribeError(f"{option} is not a flag describe understands "
                                "(it reads the model's flags, the parallel layout, the "
                                "micro-batch, recomputation, FP8 and optimizer-state "
                                "options; see --help)")
    args = p.parse_args(argv)
    # What was given, as given: plugin flags have no value until a run resolves them, and
    # a refusal names a value as the user wrote it.
    args.given = {p._option_string_actions[o].dest: text for o, text in given.items()}
    for option, counted in COUNTED_VALUES.items():
        if option in given and given[option] not in counted:
            raise DescribeError(f"{option} {given[option]}: describe counts "
                                f"{', '.join(counted)}")
    missing = [flag for flag in ("--num-layers", "--hidden-size", "--num-attention-heads",
                                 "--seq-length")
               if getattr(args, flag[2:].replace("-", "_")) is None]
    if missing:
        raise DescribeError(f"give {', '.join(missing)} (or a --preset)")
    return check(args, argv, p._option_string_actions)


def plugin_flag(args: argparse.Namespace, dest: str, off):
    """A plugin flag's value, `off` where it was not given (the registry fills in plugin
    defaults only for a run)."""
    return getattr(args, dest) if dest in args.given else off


def enabled_plugins(args: argparse.Namespace) -> list:
    """The registry's plugins `--plugins` names, in registry order (unknown names
    refused as a run refuses them)."""
    from plugins import builtin_plugins

    plugins = builtin_plugins()
    known = {plugin.name for plugin in plugins}
    unknown = [name for name in args.plugins if name not in known]
    if unknown:
        raise DescribeError(f"--plugins: unknown plugin(s) {', '.join(unknown)}; "
                            f"available: {', '.join(sorted(known))}")
    return [plugin for plugin in plugins if plugin.name in args.plugins]


def schedule(args: argparse.Namespace) -> str:
    return plugin_flag(args, "pipeline_schedule", None) or ONE_F_ONE_B


def run_start_up_checks(args: argparse.Namespace, argv: list[str], options: dict) -> None:
    """What `megaseek pretrain` refuses at start-up in these flags, refused here too:
    megaseek's checks before Megatron's validation (`argument_checks.before_megatron`), then
    the plugins' as the run plan is made. They run on a copy of `args` as a run of this
    layout has them: Megatron's local modules (describe reads no --transformer-impl), and
    --tensor-model-parallel-size x --pipeline-model-parallel-size x --data-parallel-size
    ranks. The checks after Megatron's validation are of the machine and the files (the
    backend, --tensorboard-dir, the data), which describe does not read."""
    from integration import argument_checks
    from plugins import PluginError, default_registry
    from upstream.cpu import CPU_ARGUMENTS, given

    run = argparse.Namespace(**vars(args))
    for option in CPU_ARGUMENTS:  # what a run on this CPU machine adds where not given
        if not given(argv, option[0]):
            action = options[option[0]]
            setattr(run, action.dest, option[1] if len(option) > 1 else action.const)
    run.transformer_impl = "local"
    run.world_size = (args.tensor_model_parallel_size * args.pipeline_model_parallel_size
                      * args.context_parallel_size * args.data_parallel_size)
    try:
        argument_checks.before_megatron(run, argv)
        default_registry().plan(run)
    except PluginError as error:
        raise DescribeError(f"{error}") from None


def check(args: argparse.Namespace, argv: list[str], options: dict) -> argparse.Namespace:
    from plugins.mla.plugin import MLA
    from plugins.moe.plugin import MOE

    for flag, size in (("--tensor-model-parallel-size", args.tensor_model_parallel_size),
                       ("--pipeline-model-parallel-size", args.pipeline_model_parallel_size),
                       ("--data-parallel-size", args.data_parallel_size)):
        if size < 1:  # before the world size is made of them
            raise DescribeError(f"{flag} {size} must be 1 or more")
    run_start_up_checks(args, argv, options)
    plugins = enabled_plugins(args)
    for flag in ("--hidden-size", "--num-attention-heads"):
        if getattr(args, flag[2:].replace("-", "_")) < 1:
            raise DescribeError(f"{flag} "
                                f"{getattr(args, flag[2:].replace('-', '_'))} must be 1 or more")
    if args.spec is not None and list(args.spec) != ["integration.deepseek_v3", "decoder_spec"]:
        raise DescribeError(f"--spec {' '.join(args.spec)}: describe counts "
                            "only the DeepSeek-V3 decoder (--spec integration.deepseek_v3 "
                            "decoder_spec) or Megatron's GPT layers the flags give")
    if args.add_bias_linear:
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
    if plugin_flag(args, "fp8_exclude_modules", []):
        raise DescribeError("--fp8-exclude-modules is not modelled yet: "
                            "its activation bytes count every linear's input in FP8 under "
                            "--plugins fp8; describe without it")
    if args.multi_latent_attention and MLA not in plugins:
        raise DescribeError("--multi-latent-attention counts the mla "
                            "plugin's attention: give --plugins mla")
    if args.num_experts and MOE not in plugins:
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
    stage_layout(args)  # Megatron's layout checks for its own schedule (a run's, for the others)
    return args


# --- the model -------------------------------------------------------------------------------

def shape(args: argparse.Namespace) -> cost.GPTShape:
    """The model the flags build, as its parts' cost models take it."""
    from plugins.mla.cost import MLAShape
    from plugins.moe.cost import MoEShape, sequence_balance_loss_on

    layers, hidden, heads = args.num_layers, args.hidden_size, args.num_attention_heads
    ffn = args.ffn_hidden_size or 4 * hidden
    if args.multi_latent_attention:
        attention = MLAShape.from_config(args)
    else:
        attention = cost.StandardAttention(
            hidden, heads, args.num_query_groups if args.group_query_attention else heads,
            args.kv_channels or hidden // heads)
    moe, pattern = None, (0,) * layers
    if args.num_experts:
        moe = MoEShape(hidden_size=hidden, num_moe_experts=args.num_experts,
                       moe_ffn_hidden_size=args.moe_ffn_hidden_size or ffn,
                       moe_router_topk=args.moe_router_topk,
                       moe_shared_expert_intermediate_size=(
                           args.moe_shared_expert_intermediate_size or 0),
                       moe_shared_expert_gate=args.moe_shared_expert_gate,
                       gated_linear_unit=args.swiglu,
                       sequence_balance_loss=sequence_balance_loss_on(args))
        pattern = cost.moe_layer_pattern(args.moe_layer_freq, layers)
        if len(pattern) != layers:
            raise DescribeError(f"--moe-layer-freq {args.given['moe_layer_freq']} lists "
                                f"{len(pattern)} layers, not --num-layers {layers}")
    return cost.GPTShape(
        num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, vocab_size=args.vocab_size,
        untied=args.untie_embeddings_and_output_weights, gated_linear_unit=args.swiglu,
        norm_numbers=1 if args.normalization == "RMSNorm" else 2, attention=attention,
        moe=moe, moe_layers=pattern, mtp_num_layers=args.mtp_num_layers or 0)


# --- the layout ------------------------------------------------------------------------------

@dataclass
class Stage:
    """One model chunk as a rank builds it: a pipeline stage (0 first in its direction)."""

    number: int
    layers: list[int]
    embedding: bool = False
    head: bool = False        # final norm, output layer and the loss
    mtp: int = 0              # MTP layers (with their own copy of the embedding off stage 0)
    direction: int = 0        # DualPipe's two directions; 0 for the other schedules

    def label(self) -> str:
        """Its contents as layout letters around its layer numbers: `E0-3`, `57-60mL`."""
        layers = (f"{self.layers[0]}-{self.layers[-1]}" if len(self.layers) > 1 else
                  f"{self.layers[0]}" if self.layers else "")
        return ("E" if self.embedding else "") + layers + MTP * self.mtp + (
            LOSS if self.head else "")


def stage_layout(args: argparse.Namespace) -> StageLayout:
    """Every stage's contents as a run builds them, stage 0 first: the dualpipe plugin's
    for its schedules (`plugins.dualpipe.plugin.stage_layout`, the one a run places: the
    layout flags, else the even split its start-up check allows), Megatron's for 1F1B
    (--pipeline-model-parallel-layout, else Megatron's layer split with
    --decoder-first/last-pipeline-num-layers)."""
    mtp = args.mtp_num_layers or 0
    if schedule(args) != ONE_F_ONE_B:
        from plugins.config import read
        from plugins.dualpipe.plugin import DUALPIPE
        from plugins.dualpipe.plugin import stage_layout as placed

        config = read(DUALPIPE.config, args)
        stages = _pipeline(args).stages
        return placed(config) or StageLayout.even(args.num_layers, stages, mtp)
    if args.pipeline_model_parallel_layout is not None:
        return _megatron_layout(args)
    p = args.pipeline_model_parallel_size
    split = _megatron_split(args.num_layers, p, args.decoder_first_pipeline_num_layers,
                            args.decoder_last_pipeline_num_layers)
    return StageLayout.from_counts([split(rank)[1] for rank in range(p)], mtp)


def _megatron_layout(args: argparse.Namespace) -> StageLayout:
    """--pipeline-model-parallel-layout under Megatron's own schedule, checked as Megatron
    checks it (`PipelineParallelLayerLayout`); a layout of more stages than ranks is
    Megatron's interleaved schedule, which describe does not model."""
    from megatron.core.transformer.pipeline_parallel_layer_layout import (
        PipelineParallelLayerLayout,
    )

    text, p = args.pipeline_model_parallel_layout, args.pipeline_model_parallel_size
    said = f"{LAYOUT_FLAG} {text}"
    if (args.decoder_first_pipeline_num_layers is not None
            or args.decoder_last_pipeline_num_layers is not None):
        raise DescribeError(f"{LAYOUT_FLAG} cannot be combined with {FIRST_FLAG} or "
                            f"{LAST_FLAG} (the layout already says every stage's layers): "
                            "drop one")
    try:
        layout = StageLayout.parse(text)
        megatron = PipelineParallelLayerLayout(text, p)
        megatron.validate_layer_layout(args.num_layers, args.mtp_num_layers)
    except LayoutError as why:
        raise DescribeError(str(why)) from None
    except (AssertionError, ValueError) as why:
        raise DescribeError(f"{said}: {why}") from None
    if len(layout.stages) != p:
        raise DescribeError(
            f"{said} has {len(layout.stages)} stages on --pipeline-model-parallel-size {p}: "
            f"Megatron's interleaved schedule ({len(layout.stages) // p} virtual stages a "
            "rank), which describe does not model; give one stage a rank, or "
            "--pipeline-schedule dualpipe / dualpipev with their stages")
    last = len(layout.stages) - 1
    if layout.count(MTP) != layout.count(MTP, last):
        raise DescribeError(f"{said}: describe counts the MTP layers (m) in the loss's "
                            "stage; Megatron's standalone MTP stage is not modelled")
    return layout


def _pipeline(args: argparse.Namespace):
    """The schedule's program (`plugins.dualpipe.program.Pipeline`), with enough
    micro-batches for its steady state (the most it holds in flight)."""
    from plugins.dualpipe.program import Pipeline

    p = args.pipeline_model_parallel_size
    return Pipeline(schedule(args), p, microbatches=4 * p)


def stages(args: argparse.Namespace, layout: StageLayout | None = None) -> list[list[Stage]]:
    """Each pipeline rank's model chunks in chunk order, as a run places them: the stage
    each chunk builds from the schedule's placement (Megatron's for 1F1B: stage r on rank
    r; the dualpipe plugin's for its schedules: DualPipeV 2P stages, rank r holding r and
    2P-1-r, both ends on rank 0; DualPipe P stages in each of two directions, rank r
    holding stage r of one and P-1-r of the other), its contents from `stage_layout` (or
    `layout`, of as many stages)."""
    layout = layout or stage_layout(args)
    pipeline = _pipeline(args)
    ranks = []
    for rank in range(pipeline.ranks):
        held = []
        for chunk in range(pipeline.chunks):
            direction, number = pipeline.place(rank, chunk)
            letters = layout.stages[number]
            held.append(Stage(number, list(layout.layers(number)),
                              embedding=EMBEDDING in letters, head=LOSS in letters,
                              mtp=letters.count(MTP), direction=direction))
        ranks.append(held)
    return ranks


def _megatron_split(layers: int, p: int, first: int | None, last: int | None):
    """pipeline rank -> (first layer, layers) as Megatron's decoder builds them without
    virtual stages (`get_transformer_layer_offset`, `get_num_layers_to_build`)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = argparse.Namespace(
        num_layers=layers, pipeline_model_parallel_size=p,
        num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
        virtual_pipeline_model_parallel_size=None, pipeline_model_parallel_layout=None,
        account_for_embedding_in_pipeline_split=False,
        account_for_loss_in_pipeline_split=False)

    def split(pp_rank: int) -> tuple[int, int]:
        return (get_transformer_layer_offset(config, None, pp_rank),
                get_num_layers_to_build(config, None, pp_rank))

    return split


def padded_vocab(args) -> int:
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return -(-args.vocab_size // multiple) * multiple


def fp8_enabled(args) -> bool:
    from plugins.fp8.plugin import FP8

    return FP8 in enabled_plugins(args)


def stage_params(m: cost.GPTShape, args, stage: Stage) -> tuple[int, int, int]:
    """(dense, expert, fp8-linear) parameters of a stage (this TP/EP rank's shares)."""
    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    vocab = padded_vocab(args)
    total = cost.Count()
    for layer in stage.layers:
        total += cost.layer_parameters(m, layer)
    if stage.embedding:
        total += cost.embedding_parameters(m, vocab)
    if stage.head:
        total += cost.head_parameters(m, vocab)
    total += cost.mtp_layer_parameters(m) * stage.mtp
    if stage.mtp and not stage.embedding:  # Megatron's MTP embeds with a copy of its own
        total += cost.embedding_parameters(m, vocab)
    fp8 = 0
    if fp8_enabled(args):
        for layer in stage.layers + [m.num_layers] * stage.mtp:
            fp8 += cost.linear_parameters(m, layer, tp, ep)
    return total.replicated + total.tensor // tp, total.expert // ep, fp8


def recompute_set(args) -> tuple[frozenset[str], bool]:
    """(the --recompute-modules in force, whether whole layers are recomputed)."""
    if args.recompute_granularity == "full":
        return frozenset(), True
    if args.recompute_granularity == "selective":
        return frozenset(args.recompute_modules or ["core_attn"]), False
    return frozenset(), False


def kept_activations(args, cpu_attention: bool = False) -> Activations:
    """How the run's layers keep their activations: the training dtype, linear inputs in
    FP8 with the fp8 plugin."""
    kind = FP8Activations if fp8_enabled(args) else Activations
    return kind(element=2 if args.bf16 else 4, cpu_attention=cpu_attention)


def chunk_activation(m: cost.GPTShape, args, stage: Stage, kept: Activations,
                     spared: dict[str, float] | None = None) -> int:
    """Bytes kept for backward by one micro-batch through one chunk; `spared` {a layer's
    saved term: the fraction of it not kept} counts a saving not built."""
    tokens = args.micro_batch_size * args.seq_length
    tp = args.tensor_model_parallel_size
    modules, full = recompute_set(args)
    spared = spared or {}

    def layer(number: int) -> int:
        if full:  # each layer keeps only its input
            return tokens * m.hidden_size * kept.element
        try:
            terms = cost.layer_saved_terms(m, number, tokens, args.seq_length, modules, tp,
                                           kept)
        except cost.NotCounted as why:
            raise DescribeError(str(why)) from None
        return math.ceil(sum(bytes_ * (1 - spared.get(term, 0))
                             for term, bytes_ in terms.items()))

    total = sum(layer(number) for number in stage.layers)
    if stage.embedding:
        total += tokens * 8  # the token ids the embedding lookup keeps (int64)
    if stage.head:
        total += cost.head_saved_bytes(m, tokens, tp, kept.element)
    total += stage.mtp * (layer(m.num_layers)
                          + cost.mtp_extra_saved_bytes(m, tokens, kept.element))
    return total


def stage_flops(m: cost.GPTShape, args, stage: Stage) -> int:
    """Forward + backward FLOPs of one micro-batch through a stage, on one TP rank (the
    stage's share of the model's `training_flops_per_token`; recomputation not counted)."""
    seq = args.seq_length
    per_token = sum(cost.layer_flops_per_token(m, layer, seq) for layer in stage.layers)
    if stage.head:
        per_token += cost.head_flops_per_token(m)
    per_token += stage.mtp * cost.mtp_flops_per_token(m, seq)
    return args.micro_batch_size * seq * per_token // args.tensor_model_parallel_size


def balance(args, layout: StageLayout | None = None) -> dict:
    """How evenly the work is cut: forward + backward FLOPs of one micro-batch through
    each stage (`stage_flops`) and through each rank's stages, and each one's max / mean
    (1.0: even), at `layout` (default: the run's). Under the DualPipe schedules every rank
    runs each of its chunks once a micro-batch, so the ranks' sums are what keeps the
    others waiting."""
    m = shape(args)
    ranks = stages(args, layout)
    by_stage: dict[int, int] = {}
    for chunks in ranks:
        for stage in chunks:
            by_stage[stage.number] = stage_flops(m, args, stage)
    flops = [by_stage[n] for n in sorted(by_stage)]
    per_rank = [sum(stage_flops(m, args, stage) for stage in chunks) for chunks in ranks]
    return {"stage_flops": flops, "rank_flops": per_rank,
            "stage_max_over_mean": max(flops) * len(flops) / sum(flops),
            "rank_max_over_mean": max(per_rank) * len(per_rank) / sum(per_rank)}


def held_at_peak(args, rank: int, per_microbatch: list[int]) -> tuple[int, list[int]]:
    """(the most activation bytes the rank holds at once, the micro-batches of each of its
    chunks it then holds), from the schedule's own program (`Pipeline.program`, the cells
    a run executes) in its steady state. A chunk's micro-batch is held from its forward
    until its backward, or its W where the weight gradient is split off (the inputs the
    weight gradient reads stay until then); the F and B of an F&B cell run together, so the
    forward's are counted before the backward's are freed. 1F1B: P - r micro-batches;
    DualPipe: P + 1 (chunks of a P-stage cut), DualPipeV: 2P + 1 (chunks of its 2P-stage
    cut): the PP + 1 of DeepSeek's table, PP its stages."""
    held = [0] * len(per_microbatch)
    peak, at_peak = 0, list(held)
    for cell in _pipeline(args).program(rank):
        for part in cell.parts():
            if part.op == "F":
                held[part.chunk] += 1
                now = sum(n * b for n, b in zip(held, per_microbatch))
                if now > peak:
                    peak, at_peak = now, list(held)
            elif part.op == "W" or (part.op == "B" and not part.split):
                held[part.chunk] -= 1
    return peak, at_peak


@dataclass(frozen=True)
class Saving:
    """A memory saving of DeepSeek's that megaseek does not have yet: what it is, and how
    it would change a rank's figures (activation terms spared, embedding copies shared)."""

    name: str
    short: str                        # a few words for a table
    spared: dict[str, float]          # a layer's saved term: the fraction not kept
    shares_mtp_embedding: bool = False


def savings_not_built(args) -> list[Saving]:
    """DeepSeek-V3's memory savings (the report, section 3, and two inferred where it does
    not say how the MoE combine keeps the experts' outputs) that the layers and placement
    megaseek builds do not make, for this run's flags. Recomputing RMSNorm and the MLA
    up-projections (--recompute-modules layernorm mla_up_proj), FP8 linear inputs (--plugins
    fp8), BF16 moments, ZeRO-1 (--use-distributed-optimizer) and the EMA on the host
    (--plugins ema) are built, and counted where given."""
    found = []
    if schedule(args) != ONE_F_ONE_B and (args.mtp_num_layers or 0):
        found.append(Saving("the MTP module shares stage 0's embedding on the same rank "
                            "(megaseek's MTP stage builds a copy of its own)",
                            "MTP sharing the embedding", {},
                            shares_mtp_embedding=True))
    modules, _ = recompute_set(args)
    if fp8_enabled(args) and "layernorm" in modules:
        found.append(Saving(
            "RMSNorm outputs not kept (the FP8 linears after a norm keep their own FP8 copy "
            "of its output, which --recompute-modules layernorm does not drop)",
            "RMSNorm outputs not kept",
            {"down-projections' input": 1, "q up-projection input": 1,
             "kv up-projection input": 1, "shared experts' fc1 input": 1, "MLP input": 1}))
    if fp8_enabled(args) and args.num_experts:
        found.append(Saving(
            "the SwiGLU output recomputed in backward (the FP8 routed and shared experts "
            "keep fc2's FP8 input)",
            "the SwiGLU output recomputed",
            {"experts' fc2 input": 1, "shared experts fc2 input": 1}))
    if args.num_experts and args.bf16:
        found.append(Saving(
            "no fp32 copies in the MoE layer (megaseek keeps the router's input in fp32, "
            "which the RMSNorm recomputation could rebuild, and the experts' outputs in "
            "fp32, BF16 in DeepSeek's combine)",
            "no fp32 copies in the MoE layer",
            {"router input (fp32)": 1, "experts' output, gates (fp32)": 0.5}))
    if args.num_experts and fp8_enabled(args) and "moe_act" not in modules:
        # Inferred, not in the report: with the gate applied to the SwiGLU output, the
        # gate's gradient is fc2's input gradient against that output (which the SwiGLU
        # recomputation rebuilds), so nothing of the experts' outputs is kept.
        found.append(Saving(
            "the experts' outputs not kept (the gates applied to the SwiGLU output before "
            "the down-projection, so that their gradient comes from what fc2 keeps; "
            "inferred: the report does not say how its combine keeps them)",
            "the experts' outputs not kept",
            {"experts' output, gates (fp32)": 1}))
    return found


# --- the report ------------------------------------------------------------------------------

def describe(args: argparse.Namespace) -> dict:
    m = shape(args)
    params = cost.model_parameters(m)
    flops = cost.training_flops_per_token(m, args.seq_length)
    kept = kept_activations(args)
    weight = 2 if args.bf16 else 4
    grad = 2 if args.main_grads_dtype == "bf16" else 4
    moments = ((2 if args.exp_avg_dtype == "bf16" else 4)
               + (2 if args.exp_avg_sq_dtype == "bf16" else 4))
    master = 4 if args.bf16 else 0
    tp, ep, dp = (args.tensor_model_parallel_size, args.expert_model_parallel_size,
                  args.data_parallel_size)
    expert_dp = tp * dp // ep
    state = master + moments

    def held_bytes(dense_n: int, expert_n: int, fp8_n: int) -> dict[str, int]:
        n = dense_n + expert_n
        optimizer = (state * dense_n // dp + state * expert_n // expert_dp
                     if args.use_distributed_optimizer else state * n)
        cache = (weight_cache_bytes(fp8_n) if plugin_flag(args, "fp8_cache_weights", False)
                 else 0)
        return {"parameters": n, "parameter_bytes": weight * n, "gradient_bytes": grad * n,
                "optimizer_bytes": optimizer, "fp8_weight_cache_bytes": cache}

    savings = savings_not_built(args)
    per_rank = []
    for rank, chunks in enumerate(stages(args)):
        counts = [stage_params(m, args, stage) for stage in chunks]
        dense_n, expert_n, fp8_n = (sum(c[i] for c in counts) for i in range(3))
        own = held_bytes(dense_n, expert_n, fp8_n)
        per_microbatch = [chunk_activation(m, args, stage, kept) for stage in chunks]
        activations, held = held_at_peak(args, rank, per_microbatch)
        total = (own["parameter_bytes"] + own["gradient_bytes"] + own["optimizer_bytes"]
                 + own["fp8_weight_cache_bytes"] + activations)
        would_save = {}
        for saving in savings:
            if saving.shares_mtp_embedding:
                copies = sum(1 for s in chunks if s.mtp and not s.embedding)
                shared = copies if any(s.embedding for s in chunks) else 0
                emb = cost.embedding_parameters(m, padded_vocab(args)).total // tp
                gone = held_bytes(shared * emb, 0, 0)
                would_save[saving.name] = (gone["parameter_bytes"] + gone["gradient_bytes"]
                                           + gone["optimizer_bytes"])
            else:
                fewer = [chunk_activation(m, args, stage, kept, saving.spared)
                         for stage in chunks]
                would_save[saving.name] = activations - held_at_peak(args, rank, fewer)[0]
        spared = {term: f for saving in savings for term, f in saving.spared.items()}
        fewer = [chunk_activation(m, args, stage, kept, spared) for stage in chunks]
        embedding_saving = sum(would_save[s.name] for s in savings if s.shares_mtp_embedding)
        per_rank.append({
            "rank": rank, "layers": [s.layers for s in chunks],
            "embedding": any(s.embedding for s in chunks), "head": any(s.head for s in chunks),
            "stages": [{"stage": s.number, "direction": s.direction, "contents": s.label(),
                        "layers": s.layers, "parameters": c[0] + c[1],
                        "activation_bytes_per_microbatch": a,
                        "flops_per_microbatch": stage_flops(m, args, s),
                        "microbatches_held": h}
                       for s, c, a, h in zip(chunks, counts, per_microbatch, held)],
            **own,
            "activation_bytes_per_microbatch": per_microbatch,
            "microbatches_in_flight": sum(held), "activation_bytes": activations,
            "total_bytes": total,
            "not_built_bytes": would_save,
            "total_bytes_with_all_built": (total - activations - embedding_saving
                                           + held_at_peak(args, rank, fewer)[0]),
        })
    return {
        "model": {"main": asdict(params["main"]) | {"total": params["main"].total},
                  "mtp": asdict(params["mtp"]) | {"total": params["mtp"].total}},
        "flops_per_token": flops,
        "layout": {"tp": tp, "pp": args.pipeline_model_parallel_size, "ep": ep, "dp": dp,
                   "expert_dp": expert_dp, "schedule": schedule(args),
                   "stages": str(stage_layout(args)),
                   "micro_batch": args.micro_batch_size, "seq_length": args.seq_length,
                   "recompute": args.recompute_granularity,
                   "recompute_modules": args.recompute_modules,
                   "bytes": {"weight": weight, "grad": grad, "master": master,
                             "moments": moments, "activation": kept.element,
                             "fp8_activations": kept.quantized},
                   "distributed_optimizer": args.use_distributed_optimizer},
        "fp8_linears": cost.linear_names(m) if kept.quantized else [],
        "per_rank": per_rank,
        "balance": {key: value for key, value in balance(args).items()
                    if key.endswith("_flops")},
        "not_built": [saving.name for saving in savings],
        "not_built_short": [saving.short for saving in savings],
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


def _max_over_mean(values: list[int]) -> float:
    return max(values) * len(values) / sum(values)


def _stage(stage: dict, dualpipe: bool) -> str:
    """A stage's number, marked ' in DualPipe's second direction."""
    return f"{stage['stage']}" + ("'" if dualpipe and stage["direction"] else "")


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
        f"stages        {layout['stages']} (FLOPs a micro-batch, max/mean: stages "
        f"{_max_over_mean(report['balance']['stage_flops']):.2f}, ranks "
        f"{_max_over_mean(report['balance']['rank_flops']):.2f})",
    ]
    if report["fp8_linears"]:
        lines.append(f"FP8           {', '.join(report['fp8_linears'])} (embedding, head, router, "
                     "norms and attention core in the training dtype)")
    dualpipe = layout["schedule"] == "dualpipe"
    lines += [
        "",
        f"{'rank':>4} {'stage':>5} {'contents':<11} {'params':>7} {'act/mb':>9} "
        f"{'FLOP/mb':>12} {'held':>4}  {'weights':>9} {'grads':>9} {'optim':>9} "
        f"{'activ.':>9} {'total':>9}",
    ]
    for r in report["per_rank"]:
        for i, stage in enumerate(r["stages"]):
            line = (f"{r['rank'] if i == 0 else '':>4} {_stage(stage, dualpipe):>5} "
                    f"{stage['contents']:<11} {_b(stage['parameters']):>7} "
                    f"{_gb(stage['activation_bytes_per_microbatch']):>9} "
                    f"{_flop(stage['flops_per_microbatch']):>12} "
                    f"{stage['microbatches_held']:>4}")
            if i == 0:
                line += (f"  {_gb(r['parameter_bytes']):>9} {_gb(r['gradient_bytes']):>9} "
                         f"{_gb(r['optimizer_bytes']):>9} {_gb(r['activation_bytes']):>9} "
                         f"{_gb(r['total_bytes']):>9}")
            lines.append(line)
    lines.append("(layers 0-based; contents: E embedding, layers, m MTP layer, L final norm, "
                 "output head and loss"
                 + (", ' DualPipe's second direction" if dualpipe else "")
                 + "; act/mb, FLOP/mb: one micro-batch through the stage, forward + backward; "
                 "held: its micro-batches in flight at the rank's peak; activ.: that peak)")
    if report["not_built"]:
        ranks = report["per_rank"]
        after = max(ranks, key=lambda r: r["total_bytes_with_all_built"])
        lines.append("not built     DeepSeek's memory savings megaseek does not have yet, and the "
                     "most each would save on a rank:")
        for name in report["not_built"]:
            most = max(ranks, key=lambda r: r["not_built_bytes"][name])
            lines.append(f"              {_gb(most['not_built_bytes'][name]):>9} (rank "
                         f"{most['rank']}) {name}")
        lines.append(f"              with all of them: {_gb(after['total_bytes_with_all_built'])}"
                     f" on rank {after['rank']}, the most of any rank")
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
