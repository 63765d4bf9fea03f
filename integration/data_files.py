"""Data and tokenizer files of the wrong kind (present, but not what Megatron reads),
found at start-up. Megatron opens them only once the model is built (the dataset) or when
it builds the tokenizer, and fails there with a bare assertion or a wrapped traceback.

Each function returns what is wrong, naming the file, or None.
"""

from __future__ import annotations

import json
import os
import struct

# megatron/core/datasets/indexed_dataset.py (megatron-core 0.19.2): the index starts with
# this header (line 47), a version (1), a dtype code (DType, lines 50-58), the sequence and
# document counts, then one int32 length and one int64 pointer per sequence (lines 260-300).
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_TOKEN_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # DType code -> bytes
_COUNTS = struct.Struct("<9sQBQQ")  # header, version, dtype code, sequences, documents


def indexed_dataset_problem(prefix: str) -> str | None:
    """PREFIX.idx read as Megatron's `_IndexReader` reads it, and PREFIX.bin as long as the
    index says (the last sequence's pointer plus its length, in tokens of the index's
    dtype); what Megatron would fail on, or None."""
    import numpy

    idx, data = prefix + ".idx", prefix + ".bin"
    with open(idx, "rb") as stream:
        head = stream.read(_COUNTS.size)
    if len(head) < _COUNTS.size or head[:9] != _INDEX_HEADER:
        return (f"{idx} is not a Megatron index (it does not start with Megatron's "
                "MMIDIDX header): make the dataset with Megatron's "
                "tools/preprocess_data.py")
    _, version, code, sequences, documents = _COUNTS.unpack(head)
    if version != 1 or code not in _TOKEN_SIZES:
        return (f"{idx}: index version {version}, token type code {code}: megatron-core "
                "0.19.2 reads version 1 with a type code from 1 to 8")
    tables = sequences * (4 + 8) + documents * 8
    if os.path.getsize(idx) < _COUNTS.size + tables:
        return (f"{idx} is cut short: it declares {sequences} sequences and {documents} "
                "document boundaries that it does not hold")
    if sequences == 0:
        return None
    offset = _COUNTS.size
    last_length = numpy.fromfile(idx, dtype=numpy.int32, count=1,
                                 offset=offset + (sequences - 1) * 4)[0]
    last_pointer = numpy.fromfile(idx, dtype=numpy.int64, count=1,
                                  offset=offset + sequences * 4 + (sequences - 1) * 8)[0]
    expected = int(last_pointer) + int(last_length) * _TOKEN_SIZES[code]
    actual = os.path.getsize(data)
    if actual < expected:
        return (f"{data} holds {actual} bytes and its index {idx} points to {expected}: the "
                "two files are not one dataset (or the .bin is cut short)")
    return None


# What AutoTokenizer.from_pretrained loads from a folder: a fast tokenizer, a config naming
# the tokenizer class, or one of the slow tokenizers' vocabulary files.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt",
                    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def tokenizer_folder_problem(folder: str) -> str | None:
    """A --tokenizer-model folder that holds no tokenizer (a model's folder without its
    tokenizer files): Hugging Face's AutoTokenizer fails on it in the tokenizer build."""
    if not os.path.isdir(folder):
        return None
    if any(os.path.isfile(os.path.join(folder, name)) for name in _TOKENIZER_FILES):
        return None
    return (f"holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)}): give the folder "
            "the tokenizer was saved to")


def json_vocabulary_problem(path: str) -> str | None:
    """GPT-2's BPE vocabulary is a JSON object of token -> id (Hugging Face's
    GPT2Tokenizer json.load's it when the tokenizer is built)."""
    try:
        with open(path, encoding="utf-8") as stream:
            vocabulary = json.load(stream)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return f"is not a JSON vocabulary ({error.__class__.__name__}: {error})"
    if not isinstance(vocabulary, dict):
        return "is not a JSON vocabulary (a JSON object of token -> id)"
    return None


def hub_files_cached(repo: str, filename: str) -> bool:
    """Whether Hugging Face's cache (HF_HUB_CACHE, or HF_HOME/hub, as huggingface_hub reads
    them) holds `filename` of the Hub repository `repo`."""
    from huggingface_hub import try_to_load_from_cache

    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache",
                                                  "huggingface"), "hub")
    return isinstance(try_to_load_from_cache(repo, filename, cache_dir=cache), str)


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached from here (offline mode, or its host's
    name does not resolve), or None."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "on", "yes", "true"):
        return "HF_HUB_OFFLINE is set"
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        return "huggingface.co cannot be resolved"
    return None
