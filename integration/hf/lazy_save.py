"""Megatron's torch_dist save of a model whose tensors are made only as they are written.

`dist_checkpointing.save(model.sharded_state_dict(), dir, sharded_strategy=LazySave(...))`
with `model` built on the meta device writes the checkpoint `dist_checkpointing.save` writes
for the same model filled in memory (same keys, plans, `.metadata`, `metadata.json`): all
the planning is Megatron's, on the meta tensors' shapes. Only the writing differs: this
rank's write items are grouped by the parameter they come from and written one parameter at
a time, `tensor_of(name)` making that parameter's real tensor just before its items are
written and dropped after, so a rank holds one parameter (plus one shard it reads) however
large the model.

Relies on Megatron-Core 0.19.2's private save pipeline (strategies/torch.py,
strategies/state_dict_saver.py, strategies/filesystem_async.py); each use says where.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from megatron.core.dist_checkpointing.strategies.state_dict_saver import (
    save_state_dict_async_finalize, save_state_dict_async_plan)
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner, TorchDistSaveShardedStrategy, _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict)
from torch.distributed.checkpoint.filesystem import (DEFAULT_SUFFIX, SerializationFormat,
                                                    _write_item)
from torch.distributed.checkpoint.planner import WriteItemType


class _View:
    """Where a ShardedTensor's data lies in its parameter: the parameter's name and the
    view's (size, stride, storage offset), read off the meta tensors."""

    def __init__(self, name: str, data: torch.Tensor):
        self.name = name
        self.geometry = (tuple(data.size()), tuple(data.stride()), data.storage_offset())

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.as_strided(*self.geometry)


def _views(sharded_state_dict, names: dict[int, str]) -> dict[tuple, _View]:
    """(checkpoint key, global offset) -> the `_View` of every ShardedTensor to save.

    Taken before `mcore_to_pyt_state_dict` detaches the data (strategies/torch.py:288),
    which loses the link from a factory's chunk (a view) to its parameter."""
    views = {}
    for sh in nested_values(sharded_state_dict):
        if not isinstance(sh, ShardedTensor):
            continue
        base = sh.data._base if sh.data._base is not None else sh.data
        name = names.get(id(base))
        if name is None:
            raise AssertionError(f"{sh.key}: its data is no tensor of the model")
        views[(sh.key, tuple(sh.global_offset))] = _View(name, sh.data)
    return views


class _Writer(FileSystemWriterAsync):
    """Megatron's writer (its plans, file names and `.metadata`), but the data of each
    write item is made when the item is written (`write`), not all at once beforehand
    (filesystem_async.py:114, which resolves every item up front)."""

    def __init__(self, path: str, views: dict[tuple, _View],
                 tensor_of: Callable[[str], torch.Tensor], order: Callable[[str], Any]):
        super().__init__(path, thread_count=1)
        self.views, self.tensor_of, self.order = views, tensor_of, order
        self.results = None

    def prepare_write_data(self, plan, planner) -> None:
        self.items, self.planner = plan.items, planner
        # one file per rank, named as Megatron's writer names its first (filesystem_async.py:140)
        self.file = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"

    def write(self) -> None:
        by_param: dict[str, list] = {}
        objects = []
        for item in self.items:
            if item.type == WriteItemType.BYTE_IO:
                objects.append(item)
            else:
                view = self.views[(item.index.fqn, tuple(item.index.offset))]
                by_param.setdefault(view.name, []).append((item, view))
        results = []
        transforms = [self.transforms] if hasattr(self, "transforms") else []
        with open(os.path.join(self.checkpoint_dir, self.file), "wb") as stream:
            def put(item, data):
                # the arguments Megatron's writer passes (filesystem_async.py:394-420)
                results.append(_write_item(*transforms, stream, data, item, self.file,
                                           serialization_format=SerializationFormat.TORCH_SAVE))

            for item in objects:
                put(item, self.planner.resolve_data(item))
            for name in sorted(by_param, key=self.order):
                tensor = self.tensor_of(name)  # the one real parameter held
                for item, view in by_param[name]:
                    shape = self.planner.resolve_data(item).shape  # the meta tensor written
                    put(item, _owned(view.of(tensor).reshape(shape)))
                del tensor
            os.fsync(stream.fileno())
        self.results = results

    def retrieve_write_results(self):
        return self.results


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, cloned when it is a view of a larger storage: torch.save writes a view's
    whole storage (Megatron clones such views too, filesystem_async.py:146-167)."""
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole and tensor.is_contiguous() else tensor.clone()


class LazySave(TorchDistSaveShardedStrategy):
    """The torch_dist save strategy (`dist_checkpointing.save(..., sharded_strategy=...)`)
    for a sharded state dict of meta tensors: `tensors` are the model's tensors by name
    (`model.state_dict(keep_vars=True)`), `tensor_of(name)` makes the real one; they are
    made in the order of `order(name)` (by name when left out)."""

    def __init__(self, tensors: dict[str, torch.Tensor],
                 tensor_of: Callable[[str], torch.Tensor],
                 order: Callable[[str], Any] | None = None):
        super().__init__()
        self.names = {id(t): name for name, t in tensors.items() if torch.is_tensor(t)}
        self.tensor_of, self.order = tensor_of, order or (lambda name: name)

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        # TorchDistSaveShardedStrategy.async_save's steps (strategies/torch.py:754-841), with
        # our writer and its lazy write in place of Megatron's async request
        views = _views(sharded_state_dict, self.names)
        grouped, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        pyt_state_dict = mcore_to_pyt_state_dict(grouped, False)
        writer = _Writer(str(checkpoint_dir), views, self.tensor_of, self.order)
        planner = MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False,
                                   flatten_sharded_tensors=False)
        finalize_args, *_ = save_state_dict_async_plan(pyt_state_dict, writer, None, 0,
                                                       planner=planner)
        writer.write()
        save_state_dict_async_finalize(*finalize_args)

