"""The demo's default corpus: Python's own documentation topics as byte-level tokens.

`pydoc_data.topics` ships with every CPython (about 465 KB of English prose), so the demo
needs no download. Each topic is a document; tokens are its UTF-8 bytes (0-255) and the
end-of-document token is 256, which is what Megatron's `NullTokenizer` with
`--vocab-size 257` uses. The corpus is written once as Megatron's indexed dataset
(`.bin`/`.idx`) and then read by Megatron's own `GPTDataset`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

BYTE_VOCAB_SIZE = 257  # 256 byte values and the end-of-document token
EOD = 256


def documents() -> list[bytes]:
    from pydoc_data.topics import topics

    return [topics[name].encode("utf-8") for name in sorted(topics)]


def build_byte_corpus(directory: str | os.PathLike) -> str:
    """Writes the corpus under `directory` (once) and returns the `--data-path` prefix.

    Safe to call from several ranks at once: each writes to a private name and renames it
    into place, and an existing complete corpus is reused.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = documents()
    digest = hashlib.sha1(b"\0".join(docs)).hexdigest()[:12]
    prefix = Path(directory) / f"pydoc-bytes-{digest}"
    if Path(f"{prefix}.bin").exists() and Path(f"{prefix}.idx").exists():
        return str(prefix)

    Path(directory).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        tmp = Path(scratch) / "corpus"
        builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=np.uint16)
        for doc in docs:
            tokens = np.frombuffer(doc, dtype=np.uint8).astype(np.int64)
            builder.add_document(torch.from_numpy(np.append(tokens, EOD)), [len(tokens) + 1])
        builder.finalize(f"{tmp}.idx")
        # .bin first: a reader checks for the .idx, so it never sees half a corpus.
        os.replace(f"{tmp}.bin", f"{prefix}.bin")
        os.replace(f"{tmp}.idx", f"{prefix}.idx")
    return str(prefix)
