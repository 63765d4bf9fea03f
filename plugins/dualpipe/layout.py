"""Which layers each stage of a DualPipe schedule holds, in the order a micro-batch runs
through them (stage 0 embeds, the last stage has the head, MTP and the loss).

Megatron's words for an uneven cut are used as Megatron defines them, for the schedule's
stages instead of Megatron's interleaved ones:
- `--pipeline-model-parallel-layout`: one string, `|` between stages, E the embedding,
  t a transformer layer, m an MTP layer, L the loss (and output head); `(tt|)*30` repeats.
  Megatron's own parser reads it (pipeline_parallel_layer_layout.py parse_str_to_list).
- `--decoder-first-pipeline-num-layers` / `--decoder-last-pipeline-num-layers`: the first /
  last stage's layers; the stages between share the rest equally.
DualPipeV runs 2P stages on P ranks (rank r holds stages r and 2P-1-r), DualPipe P stages
in each of its two directions (rank r holds stage r of one and P-1-r of the other): the
stage counts a layout must have (`Pipeline.stages`).
"""

from __future__ import annotations

from dataclasses import dataclass

EMBEDDING, LAYER, MTP, LOSS = "E", "t", "m", "L"

LAYOUT_FLAG = "--pipeline-model-parallel-layout"
FIRST_FLAG = "--decoder-first-pipeline-num-layers"
LAST_FLAG = "--decoder-last-pipeline-num-layers"


class LayoutError(ValueError):
    """A layout the schedule cannot place; the message names the flag to change."""


@dataclass(frozen=True)
class StageLayout:
    """Each stage's contents as layout letters, stage 0 first (e.g. ("Et", "tt", "tmL"))."""

    stages: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "StageLayout":
        """A `--pipeline-model-parallel-layout` string, read by Megatron's parser."""
        from megatron.core.transformer.enums import LayerType
        from megatron.core.transformer.pipeline_parallel_layer_layout import (
            PipelineParallelLayerLayout,
        )

        letters = {LayerType.embedding: EMBEDDING, LayerType.decoder: LAYER,
                   LayerType.mtp: MTP, LayerType.loss: LOSS}
        if any(character.isspace() for character in text):
            raise LayoutError(f"{LAYOUT_FLAG} {text!r} holds spaces: write it without them "
                              "(e.g. 'Et|tt|tmL')")
        try:
            rows = PipelineParallelLayerLayout.parse_str_to_list(text)
        except (AssertionError, ValueError) as why:
            raise LayoutError(f"{LAYOUT_FLAG} {text}: {why} (letters: E embedding, t "
                              "transformer layer, m MTP layer, L loss; | between "
                              "stages)") from None
        return cls(tuple("".join(letters[item] for item in row) for row in rows))

    @classmethod
    def split(cls, layers: int, stages: int, first: int | None = None,
              last: int | None = None, mtp: int = 0) -> "StageLayout":
        """`layers` over `stages` stages: `first` / `last` layers in the first / last stage
        where given, the stages between sharing the rest equally (Megatron's uneven split).
        Refuses a split that does not come out whole, naming the flags."""
        given = " and ".join(f"{flag} {count}" for flag, count in ((FIRST_FLAG, first),
                                                                  (LAST_FLAG, last))
                             if count is not None)
        for flag, count in ((FIRST_FLAG, first), (LAST_FLAG, last)):
            if count is not None and count < 1:
                raise LayoutError(f"{flag} {count} must be 1 or more, as Megatron has it (a "
                                  f"stage without layers: give {LAYOUT_FLAG})")
        ends = (first or 0) + (last or 0)
        middle = stages - (first is not None) - (last is not None)
        rest = layers - ends
        if rest < 0:
            raise LayoutError(f"{given}: {ends} layers, more than --num-layers {layers}")
        if middle == 0 and rest:
            raise LayoutError(f"{given} place {ends} of --num-layers {layers} layers, and "
                              f"no stage is left between them for the other {rest}")
        if middle and rest < middle:
            raise LayoutError(f"{given} leave {rest} of --num-layers {layers} layers to the "
                              f"{middle} stages between, which need one each, as Megatron has "
                              f"it (stages without layers: give {LAYOUT_FLAG})")
        if middle and rest % middle:
            raise LayoutError(f"{given} leave {rest} of --num-layers {layers} layers to the "
                              f"{middle} stages between, which they do not share equally: "
                              f"change {given.split(' ')[0]} so that {middle} divides the rest")
        counts = [rest // middle if middle else 0] * stages
        if first is not None:
            counts[0] = first
        if last is not None:
            counts[-1] = last
        return cls.from_counts(counts, mtp)

    @classmethod
    def even(cls, layers: int, stages: int, mtp: int = 0, embedding_counted: bool = False,
             loss_counted: bool = False) -> "StageLayout":
        """Megatron's even split of `layers` over `stages` stages, the embedding / loss
        counted as a layer where `embedding_counted` / `loss_counted` (its
        --account-for-embedding/loss-in-pipeline-split): what a run without a layout
        builds. The caller has checked that the count comes out whole."""
        per_stage = (layers + embedding_counted + loss_counted) // stages
        counts = [per_stage] * stages
        counts[0] -= embedding_counted
        counts[-1] -= loss_counted
        return cls.from_counts(counts, mtp)

    @classmethod
    def from_counts(cls, counts: list[int], mtp: int = 0) -> "StageLayout":
        """Each stage's transformer layers as counted, the embedding opening the first
        stage, the MTP layers and the loss ending the last (the same stage when one)."""
        cut = [LAYER * n for n in counts]
        cut[0] = EMBEDDING + cut[0]
        cut[-1] = cut[-1] + MTP * mtp + LOSS
        return cls(tuple(cut))

    def __str__(self) -> str:
        return "|".join(self.stages)

    def contents(self, stage: int) -> str:
        """What a stage holds, its transformer layers by global number from 0 (as the
        checkpoint's `decoder.layers.N`), a run of three or more as a range: "E t0-t3",
        "t6 m L"."""
        layers = self.layers(stage)
        if len(layers) >= 3:
            numbered = [f"t{layers.start}-t{layers.stop - 1}"]
        else:
            numbered = [f"t{n}" for n in layers]
        letters = self.stages[stage]
        return " ".join([EMBEDDING] * letters.count(EMBEDDING) + numbered
                        + [MTP] * letters.count(MTP) + [LOSS] * letters.count(LOSS))

    def count(self, letter: str, stage: int | None = None) -> int:
        held = self.stages if stage is None else [self.stages[stage]]
        return sum(s.count(letter) for s in held)

    def layers(self, stage: int) -> range:
        """The global numbers (from 0) of the transformer layers stage `stage` builds."""
        before = sum(s.count(LAYER) for s in self.stages[:stage])
        return range(before, before + self.stages[stage].count(LAYER))

    def check(self, stages: int, num_layers: int, mtp_num_layers: int, schedule: str,
              pipeline_size: int) -> None:
        """Refuses a layout the schedule cannot place: `stages` stages, E starting stage 0,
        every transformer layer of --num-layers, the MTP layers and L ending the last."""
        said = f"{LAYOUT_FLAG} {self}"
        if len(self.stages) != stages:
            per_rank = ("2 per rank, rank r holding stages r and {}-r".format(stages - 1)
                        if schedule == "dualpipev" else
                        "one per rank in each direction, rank r holding stages r and "
                        f"{stages - 1}-r")
            raise LayoutError(f"{said} has {len(self.stages)} stages; --pipeline-schedule "
                              f"{schedule} on --pipeline-model-parallel-size {pipeline_size} "
                              f"runs {stages} ({per_rank}): give {stages} stages separated "
                              "by '|'")
        empty = [stage for stage, letters in enumerate(self.stages) if not letters]
        if empty:
            # A model chunk without parameters (measured: the schedule and the MTP
            # evaluation take a chunk's device from its parameters, and its checkpoint
            # state is saved as one rank's common state).
            raise LayoutError(f"{said}: stage {empty[0]} holds nothing; every stage needs at "
                              f"least one of E, t, m, L: move a layer (t) into it")
        for letter, name in ((EMBEDDING, "the embedding (E)"), (LOSS, "the loss (L)")):
            if self.count(letter) != 1:
                raise LayoutError(f"{said} holds {name} {self.count(letter)} times: give it "
                                  "once")
        if not self.stages[0].startswith(EMBEDDING):
            raise LayoutError(f"{said}: the embedding (E) must open the first stage")
        if not self.stages[-1].endswith(LOSS):
            raise LayoutError(f"{said}: the loss (L) must end the last stage")
        layers = self.count(LAYER)
        if layers != num_layers:
            raise LayoutError(f"{said} holds {layers} transformer layers (t); --num-layers is "
                              f"{num_layers}: give {num_layers}")
        mtp = self.count(MTP)
        if mtp != mtp_num_layers:
            raise LayoutError(f"{said} holds {mtp} MTP layers (m); --mtp-num-layers is "
                              f"{mtp_num_layers}: give {mtp_num_layers}")
        last = self.stages[-1]
        if mtp and (self.count(MTP, len(self.stages) - 1) != mtp
                    or not last.endswith(MTP * mtp + LOSS)):
            # The MTP layers read the main model's last hidden states and share the head's
            # stage (Megatron builds them with post_process).
            raise LayoutError(f"{said}: the MTP layers (m) must sit together just before "
                              f"the loss (L), in the last stage")
