"""Multi-token prediction (Megatron's `--mtp-num-layers`) where megaseek builds the model:
the start-up check of where its layers go.

Megatron builds MTP with the loss, on the last pipeline stage, unless a
`--pipeline-model-parallel-layout` places it: then only the layout's 'm' entries are
built, and a layout without them builds none, silently. (The DualPipe placements put MTP
with the loss as well: `plugins.dualpipe.placement`, `upstream.seams.placement`.)
"""

from __future__ import annotations

import argparse

from plugins import PluginError


def check_placement(args: argparse.Namespace) -> None:
    depth = getattr(args, "mtp_num_layers", None)
    layout = getattr(args, "pipeline_model_parallel_layout", None)
    if not depth or layout is None:
        return
    placed = _mtp_layers_in(layout)
    if placed != depth:
        raise PluginError(f"--mtp-num-layers {depth} with --pipeline-model-parallel-layout "
                          f"{_shown(layout)}: the layout places {placed} MTP layer(s) ('m'); "
                          f"put {depth} 'm' in its last stage, before 'L'")


def _mtp_layers_in(layout) -> int:
    if isinstance(layout, str):
        return layout.count("m")
    from megatron.core.transformer.enums import LayerType

    return sum(stage.count(LayerType.mtp) for rank in layout.layout for stage in rank)


def _shown(layout) -> str:
    return layout if isinstance(layout, str) else repr(layout)
