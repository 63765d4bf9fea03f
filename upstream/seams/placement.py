"""The placement seam: which pipeline stages each rank's model chunks build, as a plugin's
`Placement` says, where Megatron places them interleaved only.

The seam is where the placement attaches to Megatron: its layer split, its first/last
stage predicates, the batch fields a rank reads, MTP's stage, the embedding group, and
the arguments each chunk's `GPTModel` is built with (`upstream.seams.model`). What a
schedule does with the chunks once built (DualPipe's mirrored copies, its embedding
copies on one rank) is the plugin's: `Placement.chunk_built`.
"""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass
from functools import wraps
from typing import Any, Callable

from upstream.megatron_modules import megatron_module, megatron_training
from upstream.patching import Fix, Patcher, source_has
from upstream.seams import SEAM, VERSION
from upstream.seams.model import BuildStep, attach


@dataclass(frozen=True)
class Placement:
    """Which pipeline stage each model chunk of each rank builds.

    `stage(rank, chunk)` names the stage that chunk `chunk` of pipeline rank `rank`
    builds. Stage 0 holds the embedding, the last stage the output head, the loss and
    MTP. With `copies` = 1 the model is cut into `pipeline_size x chunks_per_rank` stages
    whose layers Megatron's interleaved split gives out (Megatron's own placement is
    `stage = chunk * pipeline_size + rank`; DualPipeV's is `rank` for chunk 0 and
    `2 * pipeline_size - 1 - rank` for chunk 1). With `copies` = 2 every stage is built by
    two ranks (DualPipe: `pipeline_size` stages, as Megatron splits them without virtual
    stages); `holders` lists a stage's copies, the one checkpoints hold first.

    `process_groups(chunk, given)`, where given, answers the process groups chunk `chunk`
    is built with instead of `given` (Megatron's `pg_collection`, None for parallel_state's).
    Every rank asks it for every chunk in the same order, so it may create groups.

    `layers(stage)`, where given, answers the global numbers of the transformer layers a
    stage builds (an uneven layout the placement cuts itself: plugins/dualpipe/layout.py);
    without it Megatron's layer split gives them out.

    `said`: the start-up log's lines that tell where the stages went; the seam prints them
    once, on rank 0, when it attaches the placement to a run.

    `chunk_built` runs on each chunk once Megatron has built it. Megatron's embedding group
    is the first pipeline rank alone under the seam (it cannot tie two copies on one rank):
    a placement that puts the MTP stage, which keeps its own copy of the embedding, on the
    rank of stage 0 ties the two copies itself (DualPipe's: plugins/dualpipe/placement.py).
    """

    pipeline_size: int
    chunks_per_rank: int
    stage: Callable[[int, int], int]
    copies: int = 1
    process_groups: Callable[[int, Any], Any] | None = None
    layers: Callable[[int], range] | None = None
    said: tuple[str, ...] = ()

    @property
    def stages(self) -> int:
        return self.pipeline_size * self.chunks_per_rank // self.copies

    def megatron_coordinates(self, rank: int, chunk: int) -> tuple[int, int | None]:
        """The (pipeline rank, virtual stage) whose layers Megatron's split gives to this
        chunk's stage; virtual stage None: the split without virtual stages."""
        stage = self.stage(rank, chunk)
        if self.stages == self.pipeline_size:
            return stage, None
        return stage % self.pipeline_size, stage // self.pipeline_size

    def is_first(self, rank: int, chunk: int) -> bool:
        return self.stage(rank, chunk) == 0

    def is_last(self, rank: int, chunk: int) -> bool:
        return self.stage(rank, chunk) == self.stages - 1

    def holders(self, stage: int) -> list[tuple[int, int]]:
        """(rank, chunk) of every copy of a stage, the checkpointed copy first."""
        return [(r, c) for r in range(self.pipeline_size) for c in range(self.chunks_per_rank)
                if self.stage(r, c) == stage]

    def check(self) -> None:
        built = sorted(self.stage(r, c) for r in range(self.pipeline_size)
                       for c in range(self.chunks_per_rank))
        if built != sorted(list(range(self.stages)) * self.copies):
            raise ValueError(f"a placement must build every stage {self.copies} time(s); it "
                             f"builds {built}")

    def chunk_built(self, rank: int, chunk: int, chunks: dict[int, Any]) -> None:
        """Called on every rank each time it has built one of its chunks: chunk `chunk` of
        pipeline rank `rank`, with `chunks` (chunk -> GPTModel) the rank's chunks built so
        far, this one included (all of them at the rank's last call). Every copy of a stage
        is built in the same order on every rank, so it may communicate. Nothing by
        default."""


_LAYER_SPLIT_USERS = (  # modules that imported Megatron's layer split functions by name
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.attention",
    "megatron.core.models.gpt.gpt_layer_specs",
)


def pipeline_placement(placement: Placement) -> Fix:
    """Megatron's layer split answers for the placement's stages, and each chunk it builds
    gets pre_process (embedding) / post_process (head, loss) and MTP by its stage (through
    the one `GPTModel.__init__` wrapper, `upstream.seams.model`), then goes to
    `placement.chunk_built`. Rank 0 prints `placement.said` as it attaches."""

    def apply(patcher: Patcher) -> None:
        from megatron.core import parallel_state

        if placement.said and int(os.environ.get("RANK", "0")) == 0:
            print("\n".join(placement.said), flush=True)

        layer = megatron_module("megatron.core.transformer.transformer_layer")
        block = megatron_module("megatron.core.transformer.transformer_block")
        offset, count = layer.get_transformer_layer_offset, block.get_num_layers_to_build

        def placed(function, of_layers: Callable[[range], int]):
            @wraps(function)
            def at_placed_stage(config, vp_stage=None, pp_rank=None):
                rank = parallel_state.get_pipeline_model_parallel_rank() if pp_rank is None else pp_rank
                if placement.layers is not None:
                    return of_layers(placement.layers(placement.stage(rank, vp_stage or 0)))
                pp, vp = placement.megatron_coordinates(rank, vp_stage or 0)
                if vp is not None:
                    return function(config, vp_stage=vp, pp_rank=pp)
                # Stages split as without virtual stages, though the rank builds two chunks
                # (config's virtual size asks for them): the split reads it only here.
                virtual = config.virtual_pipeline_model_parallel_size
                config.virtual_pipeline_model_parallel_size = None
                try:
                    return function(config, vp_stage=None, pp_rank=pp)
                finally:
                    config.virtual_pipeline_model_parallel_size = virtual

            return at_placed_stage

        for name in _LAYER_SPLIT_USERS:
            module = megatron_module(name)
            for attribute, original, of_layers in (
                    ("get_transformer_layer_offset", offset, lambda layers: layers.start),
                    ("get_num_layers_to_build", count, len)):
                if getattr(module, attribute, None) is original:
                    patcher.setattr(module, attribute, placed(original, of_layers))

        # Asked per chunk (ignore_virtual=False), "first/last stage" means the placement's;
        # asked per rank, it keeps meaning the first/last pipeline rank.
        first_stage = parallel_state.is_pipeline_first_stage
        last_stage = parallel_state.is_pipeline_last_stage

        def chunk_or_rank(per_rank, per_chunk):
            @wraps(per_rank)
            def stage_predicate(ignore_virtual=True, vp_stage=None):
                if ignore_virtual or vp_stage is None:
                    return per_rank(ignore_virtual=ignore_virtual, vp_stage=vp_stage)
                return per_chunk(parallel_state.get_pipeline_model_parallel_rank(), vp_stage)

            return stage_predicate

        patcher.setattr(parallel_state, "is_pipeline_first_stage",
                        chunk_or_rank(first_stage, placement.is_first))
        patcher.setattr(parallel_state, "is_pipeline_last_stage",
                        chunk_or_rank(last_stage, placement.is_last))

        # Which batch fields a rank reads: a rank that holds the first stage in one chunk
        # and the last in another (DualPipeV's rank 0) reads them all, as without a pipeline.
        utils = megatron_module("megatron.core.utils")
        batch_broadcast = utils.get_batch_on_this_tp_rank
        broadcast_signature = inspect.signature(batch_broadcast)

        @wraps(batch_broadcast)
        def batch_for_this_ranks_stages(*args, **kwargs):
            bound = broadcast_signature.bind(*args, **kwargs)
            rank = parallel_state.get_pipeline_model_parallel_rank()
            chunks = range(placement.chunks_per_rank)
            first = any(placement.is_first(rank, c) for c in chunks)
            last = any(placement.is_last(rank, c) for c in chunks)
            bound.arguments["is_pipeline_first_stage"] = first
            bound.arguments["is_pipeline_last_stage"] = last
            if first and last:
                bound.arguments["pipeline_model_parallel_size"] = 1
            return batch_broadcast(*bound.args, **bound.kwargs)

        # Launch scripts import it by name (Megatron-LM's pretrain_gpt.py runs as __main__).
        for module in [utils, *[m for name, m in list(sys.modules.items())
                                if name == "__main__" or name.startswith("megatron.")]]:
            if getattr(module, "get_batch_on_this_tp_rank", None) is batch_broadcast:
                patcher.setattr(module, "get_batch_on_this_tp_rank", batch_for_this_ranks_stages)

        gpt_model = megatron_module("megatron.core.models.gpt.gpt_model")
        patcher.setattr(gpt_model, "mtp_on_this_rank", lambda *a, vp_stage=None, **k: placement.is_last(
            parallel_state.get_pipeline_model_parallel_rank(), vp_stage or 0))

        # The embedding's copies (stage 0's and the MTP stage's) may sit on one rank, which
        # Megatron's embedding group (a group of ranks) cannot tie: its group is made the
        # first pipeline rank alone (its all-reduces become no-ops), and the placement ties
        # the copies (`Placement.chunk_built`, and its schedule after each backward).
        initialize = parallel_state.initialize_model_parallel

        @wraps(initialize)
        def initialize_with_local_embedding_copies(*args, **kwargs):
            kwargs["get_embedding_ranks"] = _first_pipeline_rank_only
            return initialize(*args, **kwargs)

        patcher.setattr(parallel_state, "initialize_model_parallel",
                        initialize_with_local_embedding_copies)

        built: dict[int, Any] = {}  # this rank's chunks, as they are built

        def at_stage(bound: dict[str, Any]) -> None:
            rank = parallel_state.get_pipeline_model_parallel_rank()
            chunk = bound.get("vp_stage") or 0
            bound["pre_process"] = placement.is_first(rank, chunk)
            bound["post_process"] = placement.is_last(rank, chunk)
            if placement.process_groups is not None:
                bound["pg_collection"] = placement.process_groups(chunk,
                                                                  bound.get("pg_collection"))

        def chunk_built(model, bound: dict[str, Any]) -> None:
            chunk = bound.get("vp_stage") or 0
            built[chunk] = model
            placement.chunk_built(parallel_state.get_pipeline_model_parallel_rank(), chunk,
                                  dict(built))

        attach(patcher, BuildStep("pipeline placement", at_stage, chunk_built))

    return Fix(
        "seam:pipeline-placement",
        f"megatron/core/transformer/transformer_layer.py:59 get_transformer_layer_offset, "
        f"transformer_block.py:70 get_num_layers_to_build, models/gpt/gpt_model.py "
        f"GPTModel.__init__ (pre_process, post_process, pg_collection; built by "
        f"training.py:1730-1760 get_model or training/models/gpt.py:307), :160 "
        f"mtp_on_this_rank, "
        f"core/parallel_state.py:1994 is_pipeline_first_stage, :2004 is_pipeline_last_stage, "
        f"core/utils.py:2119 get_batch_on_this_tp_rank (launch scripts' get_batch passes "
        f"the rank's first/last flags), core/parallel_state.py:618,1269 "
        f"initialize_model_parallel(get_embedding_ranks), models/common/language_module/"
        f"language_module.py:247-306 and distributed/finalize_model_grads.py:146-260 (the "
        f"MTP stage's embedding copy, tied over the embedding group) ({VERSION})",
        "Megatron places stages interleaved only (stage = chunk x PP + rank) and decides "
        "embedding, head and MTP by the first/last pipeline rank; a chunk's first/last "
        "stage (e.g. which batch fields get_batch reads) is asked of parallel_state; the "
        "MTP stage's embedding copy is tied to stage 0's by an all-reduce over a group of "
        "ranks, which cannot tie two copies on one rank",
        lambda: source_has(megatron_training().get_model, "is_pp_first_stage(", "is_vp_first_stage(")
        and source_has(megatron_module("megatron.core.models.gpt.gpt_model").GPTModel.__init__,
                       "mtp_on_this_rank("),
        apply, SEAM)


def _first_pipeline_rank_only(pipeline_ranks: list[int], *unused) -> list[int]:
    return pipeline_ranks[:1]


