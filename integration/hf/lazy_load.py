"""A Megatron torch_dist checkpoint's tensors by model name, read one layer at a time.

    tensors = LayerByLayer(model, directory)   # model built on the meta device
    tensors["decoder.layers.3.mlp.experts.weight1"]   # reads decoder layer 3, drops the last

`dist_checkpointing.load` takes a sharded state dict holding any subset of the model's keys
and reads only those (missing keys are the checkpoint's business, unexpected ones are
fine: its default StrictHandling.ASSUME_OK_UNEXPECTED); here the subset is one decoder or
MTP layer, or one of the other tensors (embedding, final norm, head), given real tensors
just before it is read. One layer and one other tensor are held at a time.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

_LAYER = re.compile(r"(decoder|mtp)\.layers\.(\d+)\.")


def _group(name: str) -> tuple:
    """The part of the model read together with `name`: its layer, or itself."""
    match = _LAYER.match(name)
    return (match.group(1), int(match.group(2))) if match else (name,)


def _real(entry):
    """`entry` (a ShardedTensor or factory of meta data) over a new CPU tensor to read into."""
    return dataclasses.replace(entry, data=torch.empty(entry.data.shape, dtype=entry.data.dtype))


class LayerByLayer(Mapping):
    def __init__(self, model, directory: str):
        self.directory = directory
        self.sharded = {k: v for k, v in model.sharded_state_dict().items()
                        if isinstance(v, (ShardedTensor, ShardedTensorFactory))}
        self.shapes = {k: v.shape for k, v in model.state_dict().items() if torch.is_tensor(v)}
        self.held: dict[bool, tuple[tuple, dict]] = {}  # layer or not -> (group, tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        group = _group(name)
        slot = len(group) == 2
        if self.held.get(slot, (None,))[0] != group:
            self.held.pop(slot, None)  # freed before the next one is read
            subset = {k: _real(v) for k, v in self.sharded.items() if _group(k) == group}
            self.held[slot] = (group, dist_checkpointing.load(subset, self.directory))
        return self.held[slot][1][name]

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)
