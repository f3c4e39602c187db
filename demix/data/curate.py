"""Curation: read candidate datasets, clean, dedupe, split, tokenize and pack token streams.

Writes a `demix.dataset` artifact: tokenizer/, <name>/train.bin, <name>/heldout.bin (every
document followed by eos) and manifest.json last, with token counts per dataset (the prior).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from demix.config import DataConfig, DatasetSpec
from demix.data.shards import DATASET_KIND
from demix.errors import DataError, ModelError
from demix.storage import check_uri, staged_dir, write_manifest

EOS = "<|endoftext|>"
TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
# Documents are tokenized in groups of about this many characters: large enough for the
# tokenizer's threads, small enough that the Encoding objects of a group stay small.
ENCODE_GROUP_CHARS = 4_000_000


def normalize(text: str) -> str:
    """NFC, unix newlines, no trailing spaces on lines, no surrounding whitespace."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def _read_text(path: Path, dataset: str) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(
            f"dataset {dataset!r}: cannot read {path} ({err.strerror}); check its permissions"
        ) from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            raise DataError(
                f"dataset {dataset!r}: {path} is not valid gzip; give .jsonl/.txt or gzip of them"
            ) from None
    if b"\x00" in raw:
        raise DataError(
            f"dataset {dataset!r}: {path} is binary (NUL bytes); give UTF-8 .jsonl or .txt files"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"dataset {dataset!r}: {path} is not UTF-8 text (bad byte at offset {err.start}); "
            "convert it to UTF-8"
        ) from None


def dataset_files(spec: DatasetSpec) -> list[Path]:
    """The files of a dataset: its paths in order, folders expanded to their text files, sorted.

    Raises DataError naming the dataset and path when a path is missing, remote or an empty folder.
    """
    files: list[Path] = []
    for entry in spec.paths:
        path = Path(entry)
        if "://" in entry:
            check_uri(entry)
            raise DataError(
                f"dataset {spec.name!r}: {entry}: gs:// paths are fetched by `demix curate` "
                "(demix.stages.curate_stage); call that, or copy the files to a local path"
            )
        if path.is_dir():
            try:
                found = sorted(
                    p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES)
                )
            except OSError as err:
                raise DataError(
                    f"dataset {spec.name!r}: cannot list folder {path} ({err.strerror})"
                ) from None
            if not found:
                raise DataError(
                    f"dataset {spec.name!r}: folder {path} holds no {'/'.join(TEXT_SUFFIXES)} files"
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(
                f"dataset {spec.name!r}: path {path} does not exist; fix data.datasets paths"
            )
    return files


def read_documents(spec: DatasetSpec) -> Iterator[str]:
    """Raw documents of a dataset: one per JSONL line (field spec.text_field), one per text file.

    Raises DataError naming the file (and line) of a missing, binary or malformed input.
    """
    for path in dataset_files(spec):
        text = _read_text(path, spec.name)
        if not path.name.endswith(JSONL_SUFFIXES):
            yield text
            continue
        # Not splitlines(): JSON strings may hold raw U+2028 and other Unicode line breaks.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or spec.text_field not in record:
                raise DataError(
                    f"{path}:{number}: no field {spec.text_field!r} "
                    f"(set text_field of dataset {spec.name!r})"
                )
            value = record[spec.text_field]
            if not isinstance(value, str):
                raise DataError(
                    f"{path}:{number}: field {spec.text_field!r} is a {type(value).__name__}, "
                    "not a string"
                )
            yield value


def heldout_indices(hashes: list[str], config: DataConfig, seed: int) -> set[int]:
    """Indices of held-out documents: the first k in a seeded order of document hashes.

    k = heldout_fraction of the documents (at least 1 when there are 2 or more, never all),
    capped at max_heldout_documents.
    """
    n = len(hashes)
    if n < 2:
        return set()
    k = min(max(1, round(config.heldout_fraction * n)), config.max_heldout_documents, n - 1)
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{hashes[i]}".encode()).digest())
    return set(order[:k])


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


def _load_base_tokenizer(tokenizer_dir: Path):
    from demix.model import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.eos_token_id is None:
        raise ModelError(
            f"{tokenizer_dir}: the base model's tokenizer has no eos token; "
            "set eos_token in its tokenizer_config.json"
        )
    return tokenizer


def _encode_groups(docs: list[str]) -> Iterator[list[str]]:
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


def write_tokens(tokenizer, docs: list[str], eos: int, dtype: np.dtype, path: Path) -> int:
    """Tokenize `docs` (no special tokens), each followed by eos, into the flat file `path`.

    Returns the number of tokens written.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    total = 0
    with open(path, "wb") as f:
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
            np.asarray(flat, dtype=dtype).tofile(f)
            total += len(flat)
    return total


def curate(
    config: DataConfig,
    out: str | Path,
    seed: int,
    tokenizer_dir: str | Path | None = None,
    **manifest_fields,
) -> dict:
    """Curate `config.datasets` into the artifact folder `out`; return its manifest.

    Cleaning: NFC, unix newlines, trailing spaces stripped; documents shorter than
    config.min_chars dropped; exact duplicates (sha256 of the normalized text) removed within
    and across datasets, the first in config order kept. With `tokenizer_dir` (a base model)
    its tokenizer is copied, else a byte-level BPE is trained on the train splits.
    Raises DataError for missing/unreadable/binary/malformed inputs and for a dataset that is
    empty after cleaning, ModelError for an unusable base tokenizer; `out` is untouched on error.
    """
    start = time.perf_counter()
    seen: set[bytes] = set()
    splits: dict[str, dict[str, list[str]]] = {}
    stats: dict[str, dict] = {}
    for spec in config.datasets:
        docs, hashes, short, dups = [], [], 0, 0
        for raw in read_documents(spec):
            text = normalize(raw)
            if len(text) < config.min_chars:
                short += 1
                continue
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            if digest in seen:
                dups += 1
                continue
            seen.add(digest)
            docs.append(text)
            hashes.append(digest.hex())
        if not docs:
            raise DataError(
                f"dataset {spec.name!r} is empty after cleaning ({short} documents shorter than "
                f"data.min_chars={config.min_chars}, {dups} duplicates); check its paths and "
                "text_field"
            )
        held = heldout_indices(hashes, config, seed)
        splits[spec.name] = {
            "train": [d for i, d in enumerate(docs) if i not in held],
            "heldout": [d for i, d in enumerate(docs) if i in held],
        }
        stats[spec.name] = {
            "documents": len(docs) - len(held),
            "heldout_documents": len(held),
            "dropped_short": short,
            "duplicates_removed": dups,
            "sources": list(spec.paths),
        }
    read_s = time.perf_counter() - start

    if tokenizer_dir is not None:
        tokenizer = _load_base_tokenizer(Path(tokenizer_dir))
    else:
        train_texts = [d for parts in splits.values() for d in parts["train"]]
        tokenizer = train_tokenizer(train_texts, config.tokenizer.vocab_size)
    vocab = len(tokenizer)
    eos = int(tokenizer.eos_token_id)
    # Token ids run from 0 to vocab - 1.
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    tokenizer_s = time.perf_counter() - start - read_s

    with staged_dir(out) as tmp:
        tokenizer.save_pretrained(tmp / "tokenizer")
        for name, parts in splits.items():
            (tmp / name).mkdir()
            for split, docs in parts.items():
                count = write_tokens(tokenizer, docs, eos, dtype, tmp / name / f"{split}.bin")
                stats[name][f"{split}_tokens"] = count
        total = sum(s["train_tokens"] for s in stats.values())
        prior = {name: s["train_tokens"] / total for name, s in stats.items()}
        manifest = write_manifest(
            tmp,
            DATASET_KIND,
            datasets=stats,
            token_prior=prior,
            dtype=dtype.name,
            vocab_size=vocab,
            eos_token_id=eos,
            tokenizer="tokenizer",
            seconds=round(time.perf_counter() - start, 1),
            **manifest_fields,
        )
    for name, s in stats.items():
        print(
            f"[demix] curate {name}: {s['documents']} train + {s['heldout_documents']} held-out "
            f"docs, {s['train_tokens']:,} train + {s['heldout_tokens']:,} held-out tokens, "
            f"{s['duplicates_removed']} duplicates, {s['dropped_short']} short, "
            f"prior {prior[name]:.3f}",
            file=sys.stderr,
        )
    print(
        f"[demix] curate: read {read_s:.1f} s, tokenizer {tokenizer_s:.1f} s, "
        f"total {manifest['seconds']:.1f} s -> {out}",
        file=sys.stderr,
    )
    return manifest
