"""Tokenizer of a curated dataset: the bounded sample a BPE is trained on, BPE training, a base
model's tokenizer, and encoding documents into a token stream."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from demix.config import DataConfig
from demix.data.lines import DocumentLimit
from demix.data.sources import InputFile, clean_document, read_file_documents
from demix.errors import ModelError
from demix.storage import fetch_files

EOS = "<|endoftext|>"
# Documents are tokenized in groups of about this many characters: large enough for the
# tokenizer's threads, small enough that the Encoding objects of a group stay small.
ENCODE_GROUP_CHARS = 4_000_000


def file_order(dataset: str, files: list) -> list[int]:
    """A fixed pseudo-random order of a dataset's files (sha256 of its name and each file's
    position), so that reading files in it until a budget spreads over the dataset."""
    return sorted(
        range(len(files)), key=lambda i: hashlib.sha256(f"{dataset}:{i}".encode()).digest()
    )


def tokenizer_sample(files: list[InputFile], config: DataConfig) -> list[str]:
    """The documents a BPE tokenizer is trained on: about data.tokenizer.sample_chars characters.

    Each dataset gets a share of the budget in proportion to the bytes of its files. Its files
    are read in `file_order` until their bytes reach the share; of the cleaned
    documents read, not already in the sample, those with the smallest content hashes are kept
    until their characters reach the share. The sample, in file order, depends only on the
    files and the config, never on how curation is grouped, and reads about the budget, not
    the whole corpus.
    Raises DataError for an unreadable or malformed file read.
    """
    budget = config.tokenizer.sample_chars
    total = sum(f.size for f in files)
    specs = {spec.name: spec for spec in config.datasets}
    seen: set[bytes] = set()
    sample: list[str] = []
    for name, spec in specs.items():
        mine = [f for f in files if f.dataset == name]
        share = budget * (sum(f.size for f in mine) / total if total else 1 / len(specs))
        chosen, read = [], 0
        for i in file_order(name, mine):
            if read >= share:
                break
            chosen.append(i)
            read += mine[i].size
        found: dict[bytes, str] = {}  # content hash -> text, in file order
        for i in sorted(chosen):
            path = fetch_files(mine[i].uri)
            for raw in read_file_documents(path, spec, DocumentLimit.of(config)):
                cleaned = clean_document(raw, config.min_chars)
                if cleaned and cleaned[1] not in seen and cleaned[1] not in found:
                    found[cleaned[1]] = cleaned[0]
        if sum(len(text) for text in found.values()) > share:
            kept, chars = set(), 0
            for digest in sorted(found):
                if chars >= share:
                    break
                kept.add(digest)
                chars += len(found[digest])
            found = {d: text for d, text in found.items() if d in kept}
        seen.update(found)
        sample.extend(found.values())
    return sample


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer with eos "<|endoftext|>" (also the pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def load_base_tokenizer(tokenizer_dir: Path):
    """The tokenizer of a base model folder. Raises ModelError when it is unusable or has no eos."""
    from demix.model import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.eos_token_id is None:
        raise ModelError(
            f"{tokenizer_dir}: the base model's tokenizer has no eos token; "
            "set eos_token in its tokenizer_config.json"
        )
    return tokenizer


def _encode_groups(docs: list[str]) -> Iterator[list[str]]:
    """`docs` in consecutive groups of about ENCODE_GROUP_CHARS characters."""
    group: list[str] = []
    size = 0
    for doc in docs:
        group.append(doc)
        size += len(doc)
        if size >= ENCODE_GROUP_CHARS:
            yield group
            group, size = [], 0
    if group:
        yield group


def encode_documents(
    tokenizer, docs: list[str], eos: int, dtype: np.dtype, f: BinaryIO
) -> list[int]:
    """Tokenize `docs` (no special tokens), each followed by eos, appending to the open file `f`.

    Returns the number of tokens of each document, its eos included.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    lengths: list[int] = []
    for group in _encode_groups(docs):
        if backend is not None:
            # The Rust batch encoder (threads, no offsets): several times faster than __call__.
            encodings = backend.encode_batch_fast(group, add_special_tokens=False)
            rows = [e.ids for e in encodings]
        else:
            rows = tokenizer(group, add_special_tokens=False)["input_ids"]
        flat: list[int] = []
        for ids in rows:
            flat.extend(ids)
            flat.append(eos)
            lengths.append(len(ids) + 1)
        np.asarray(flat, dtype=dtype).tofile(f)
    return lengths
