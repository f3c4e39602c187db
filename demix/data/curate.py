"""Curation: read candidate datasets, clean, dedupe, split, tokenize and pack token streams.

Writes a `demix.dataset` artifact: tokenizer/, <name>/train.bin, <name>/heldout.bin (every
document followed by eos) and manifest.json last, with token counts per dataset (the prior).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from demix.config import DataConfig, DatasetSpec
from demix.data.shards import DATASET_KIND
from demix.errors import DataError
from demix.storage import staged_dir, write_manifest

EOS = "<|endoftext|>"
TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz")


def normalize(text: str) -> str:
    """NFC, unix newlines, no trailing spaces on lines, no surrounding whitespace."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def _read_text(path: Path, dataset: str) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"dataset {dataset!r}: cannot read {path} ({err.strerror})") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except OSError:
            raise DataError(f"dataset {dataset!r}: {path} is not valid gzip") from None
    if b"\x00" in raw[:65536]:
        raise DataError(f"dataset {dataset!r}: {path} looks binary (NUL bytes); give text files")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"dataset {dataset!r}: {path} is not UTF-8 text (byte {err.start})") from None


def dataset_files(spec: DatasetSpec) -> list[Path]:
    files: list[Path] = []
    for entry in spec.paths:
        path = Path(entry)
        if "://" in entry:
            raise DataError(f"dataset {spec.name!r}: {entry}: remote URIs are not supported here; use a local path")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
            if not found:
                raise DataError(f"dataset {spec.name!r}: folder {path} holds no {'/'.join(TEXT_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"dataset {spec.name!r}: path {path} does not exist")
    return files


def read_documents(spec: DatasetSpec) -> Iterator[str]:
    """Raw documents of a dataset: one per JSONL line (field spec.text_field), one per text file.

    Raises DataError naming the file (and line) of a missing, binary or malformed input.
    """
    for path in dataset_files(spec):
        text = _read_text(path, spec.name)
        if not path.name.endswith((".jsonl", ".jsonl.gz")):
            yield text
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(spec.text_field), str):
                raise DataError(f"{path}:{number}: no string field {spec.text_field!r} "
                                f"(set text_field of dataset {spec.name!r})")
            yield record[spec.text_field]


def _split(hashes: list[str], config: DataConfig, seed: int) -> set[int]:
    """Indices of held-out documents: a seeded hash order, fraction capped, at least one."""
    n = len(hashes)
    if n < 2:
        return set()
    k = min(max(1, round(config.heldout_fraction * n)), config.max_heldout_documents, n - 1)
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{hashes[i]}".encode()).digest())
    return set(order[:k])


def _train_tokenizer(texts: Iterator[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def _encode(tokenizer, docs: list[str], eos: int, dtype: np.dtype) -> np.ndarray:
    pieces = []
    for start in range(0, len(docs), 256):
        for ids in tokenizer(docs[start:start + 256], add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids + [eos], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def curate(config: DataConfig, out: str | Path, seed: int, tokenizer_dir: str | Path | None = None,
           **manifest_fields) -> dict:
    """Curate `config.datasets` into the artifact folder `out`; return its manifest.

    Raises DataError for missing/unreadable/binary/malformed inputs and for a dataset that is
    empty after cleaning; `out` is untouched on error.
    """
    seen: dict[str, str] = {}
    splits: dict[str, dict[str, list[str]]] = {}
    stats: dict[str, dict] = {}
    for spec in config.datasets:
        docs, hashes, short, dups = [], [], 0, 0
        for raw in read_documents(spec):
            text = normalize(raw)
            if len(text) < config.min_chars:
                short += 1
                continue
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen:
                dups += 1
                continue
            seen[digest] = spec.name
            docs.append(text)
            hashes.append(digest)
        if not docs:
            raise DataError(f"dataset {spec.name!r} is empty after cleaning ({short} shorter than "
                            f"data.min_chars={config.min_chars}, {dups} duplicates); check its paths and text_field")
        held = _split(hashes, config, seed)
        splits[spec.name] = {"train": [d for i, d in enumerate(docs) if i not in held],
                             "heldout": [d for i, d in enumerate(docs) if i in held]}
        stats[spec.name] = {"documents": len(docs) - len(held), "heldout_documents": len(held),
                            "dropped_short": short, "duplicates_removed": dups,
                            "sources": [str(p) for p in spec.paths]}

    if tokenizer_dir is not None:
        from demix.model import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir)
        if tokenizer.eos_token_id is None:
            raise DataError(f"{tokenizer_dir}: the base tokenizer has no eos token")
    else:
        tokenizer = _train_tokenizer((d for s in splits.values() for d in s["train"]), config.tokenizer.vocab_size)
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    dtype = np.dtype(np.uint16 if vocab <= 65535 else np.uint32)

    with staged_dir(out) as tmp:
        tokenizer.save_pretrained(tmp / "tokenizer")
        for name, parts in splits.items():
            (tmp / name).mkdir()
            for split, docs in parts.items():
                ids = _encode(tokenizer, docs, eos, dtype)
                ids.tofile(tmp / name / f"{split}.bin")
                stats[name][f"{split}_tokens"] = int(len(ids))
        total = sum(s["train_tokens"] for s in stats.values())
        prior = {name: s["train_tokens"] / total for name, s in stats.items()}
        manifest = write_manifest(tmp, DATASET_KIND, datasets=stats, token_prior=prior, dtype=dtype.name,
                                  vocab_size=vocab, eos_token_id=eos, tokenizer="tokenizer", **manifest_fields)
    for name, s in stats.items():
        print(f"[demix] curate {name}: {s['documents']} docs, {s['train_tokens']:,} train tokens, "
              f"{s['heldout_tokens']:,} held-out tokens, {s['duplicates_removed']} duplicates, "
              f"{s['dropped_short']} short", file=sys.stderr)
    return manifest
