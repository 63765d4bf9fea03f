"""Hugging Face safetensors folders, one tensor at a time.

`Reader` opens a folder's shards (`model.safetensors.index.json`, or one
`model.safetensors`) and hands out tensors by name: one shard is memory-mapped at a time
and a tensor is read only when asked for. `ShardWriter` writes tensors as they come into
shards of at most `max_shard_bytes`, then the index; `staged_folder` makes the output
appear only when complete (written into a hidden sibling, renamed at the end).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from integration.hf.config import HFConversionError, read_json

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Reader:
    """A folder's tensors by name. A shard that is not a readable safetensors file (cut
    short, overwritten, not one at all) or an index that is not one is an HFConversionError
    naming the file and what is wrong with it, when it is first opened."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(f, str) for f in weight_map.values()):
                raise HFConversionError(f"{index}: no weight_map (tensor name -> shard file)")
            self.files = {name: self.folder / f for name, f in weight_map.items()}
        elif (self.folder / SINGLE).is_file():
            with _opened(self.folder / SINGLE) as f:
                self.files = {name: self.folder / SINGLE for name in f.keys()}
        else:
            raise HFConversionError(f"{self.folder}: neither {INDEX} nor {SINGLE}")
        for name, path in self.files.items():
            if not path.is_file():
                raise HFConversionError(f"{name}: its shard {path.name} is missing")
        self._open: tuple[Path, object] | None = None
        self._stack = contextlib.ExitStack()

    def names(self) -> set[str]:
        return set(self.files)

    def shards(self) -> list[Path]:
        """The shard files in name order: reading tensors shard by shard keeps one mapped."""
        return sorted(set(self.files.values()))

    def names_in(self, shard: Path) -> list[str]:
        return sorted(n for n, f in self.files.items() if f == shard)

    def _handle(self, name: str):
        path = self.files[name]
        if self._open is None or self._open[0] != path:
            self._stack.close()
            self._stack = contextlib.ExitStack()
            self._open = (path, self._stack.enter_context(_opened(path)))
        return self._open[1]

    def header(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype string) without reading the data."""
        with _named(self.files[name], name):
            part = self._handle(name).get_slice(name)
            return tuple(part.get_shape()), part.get_dtype()

    def get(self, name: str) -> torch.Tensor:
        with _named(self.files[name], name):
            return self._handle(name).get_tensor(name)

    def close(self) -> None:
        self._stack.close()
        self._open = None


_HEADER_ERROR = "Error while deserializing header: "


@contextlib.contextmanager
def _named(path: Path, tensor: str | None = None) -> Iterator[None]:
    """safetensors' and the OS's errors reading `path` as an HFConversionError naming it
    (and `tensor`): a cut-short file reads as 'file not fully covered' by its header."""
    try:
        yield
    except SafetensorError as e:
        detail = str(e)
        what = "not a readable safetensors file (cut short or corrupt)" \
            if detail.startswith(_HEADER_ERROR) else "cannot be read"
        of = f" ({tensor})" if tensor else ""
        raise HFConversionError(f"{path}{of}: {what}: "
                                f"{detail.removeprefix(_HEADER_ERROR)}") from None
    except OSError as e:
        raise HFConversionError(f"{path}: cannot be read ({e.strerror or e})") from None


@contextlib.contextmanager
def _opened(path: Path):
    with _named(path):
        handle = safe_open(path, "pt")
    with handle:
        yield handle


class ShardWriter:
    """Writes (name, tensor) pairs into `model-0000i-of-0000n.safetensors` shards of at most
    `max_shard_bytes` (a larger tensor gets a shard of its own), then the index."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder, self.max = Path(folder), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max:
            self._flush()
        self.pending[name] = tensor.detach().contiguous().cpu()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        path = self.folder / f"part-{len(self.written) + 1:05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.written)
        weight_map = {}
        for i, (path, names) in enumerate(self.written, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update((name, final) for name in names)
        index = {"metadata": {"total_size": self.total},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


@contextlib.contextmanager
def staged_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A fresh hidden sibling of `out` to write into; renamed to `out` when the block ends
    without an error, removed otherwise. An existing `out` is an error unless `overwrite`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise HFConversionError(f"{out} exists; pass overwrite=True to replace it")
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():  # overwrite: the old folder goes only once the new one is complete
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        stage.rename(out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        stage.rename(out)
