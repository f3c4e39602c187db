"""Curation: read candidate datasets, clean, dedupe, split, tokenize and pack token streams.

Three steps, the same in one process (`curate`) and fanned out over KFP tasks:

- plan (`plan_curation`): list the input files, split them into contiguous groups, and decide
  the tokenizer (a base model's, or a BPE trained on a bounded sample) before anything is
  tokenized;
- map (`curate_group`, one per group): clean, drop short documents, dedupe within the group,
  tokenize; keeps each document's tokens, length and content hash;
- reduce (`merge_groups`): merge the groups in file order, drop duplicates across groups (the
  first kept), pick held-out documents per dataset and write the `demix.dataset` artifact:
  tokenizer/, <name>/train.bin, <name>/heldout.bin (every document followed by eos) and
  manifest.json last, with token counts per dataset (the prior).

Groups are contiguous runs of the files in config order, so the result does not depend on how
many there are.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from demix.config import DataConfig, DatasetSpec
from demix.data.shards import DATASET_KIND
from demix.errors import DataError, ModelError
from demix.storage import (
    atomic_write_json,
    check_uri,
    fetch_files,
    is_remote,
    read_manifest,
    remote_files,
    staged_dir,
    write_manifest,
)

EOS = "<|endoftext|>"
TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
# Documents are tokenized in groups of about this many characters: large enough for the
# tokenizer's threads, small enough that the Encoding objects of a group stay small.
ENCODE_GROUP_CHARS = 4_000_000
PLAN_KIND = "demix.curation_plan"
GROUP_KIND = "demix.curation_group"
PLAN_FILE = "plan.json"
HASH_BYTES = 32  # sha256 of a document's normalized text
# Tokens copied per write when the reduce concatenates the groups' token files.
COPY_CHUNK_TOKENS = 1 << 24


def normalize(text: str) -> str:
    """Lone surrogates (a JSON escape such as "\\ud83d" without its pair) as U+FFFD, NFC, unix
    newlines, no trailing spaces on lines, no surrounding whitespace."""
    text = re.sub("[\ud800-\udfff]", "\ufffd", text)
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
    if wide := _utf16_or_32(raw):
        raise DataError(
            f"dataset {dataset!r}: {path} is {wide} encoded; convert it to UTF-8 "
            f"(e.g. iconv -f {wide} -t UTF-8)"
        )
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


def _utf16_or_32(raw: bytes) -> str | None:
    """The encoding, UTF-16 or UTF-32, when the bytes start with its byte order mark or read as
    printable UTF-16 text without one (NUL high bytes at every other position); else None."""
    for bom, name in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32")):
        if raw.startswith(bom):
            return name
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    head = raw[: min(len(raw), 4096) // 2 * 2]
    even, odd = head[0::2].count(0), head[1::2].count(0)
    if min(even, odd) or max(even, odd) <= len(head) // 4:
        return None
    text = head.decode("utf-16-le" if odd else "utf-16-be", errors="replace")
    printable = sum(c.isprintable() or c.isspace() for c in text)
    return "UTF-16" if printable >= 0.95 * len(text) else None


def _local_files(spec: DatasetSpec, entry: str) -> list[Path]:
    path = Path(entry)
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
        return found
    if path.is_file():
        return [path]
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DataError(
                f"dataset {spec.name!r}: path {path} is a symlink loop; point the link at a "
                "real file or folder"
            ) from None
    raise DataError(f"dataset {spec.name!r}: path {path} does not exist; fix data.datasets paths")


def dataset_files(spec: DatasetSpec) -> list[Path]:
    """The files of a dataset: its paths in order, folders expanded to their text files, sorted.

    Raises DataError naming the dataset and path when a path is missing, remote or an empty folder.
    """
    files: list[Path] = []
    for entry in spec.paths:
        if "://" in entry:
            check_uri(entry)
            raise DataError(
                f"dataset {spec.name!r}: {entry}: gs:// paths are listed by input_files and "
                "fetched by the curation steps; call those, or copy the files to a local path"
            )
        files.extend(_local_files(spec, entry))
    return files


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One input file of a dataset: a local path or gs:// URI, its size, and a stamp that
    changes with its content (local: mtime in ns; gs://: crc32c)."""

    dataset: str
    uri: str
    size: int
    stamp: str


def input_files(spec: DatasetSpec) -> list[InputFile]:
    """The files of a dataset in order (as dataset_files), local or gs://, listed without reading.

    Raises DataError naming the dataset and path when a path is missing or an empty folder.
    """
    out: list[InputFile] = []
    for entry in spec.paths:
        check_uri(entry)
        if not is_remote(entry):
            for path in _local_files(spec, entry):
                stat = path.stat()
                out.append(InputFile(spec.name, str(path), stat.st_size, str(stat.st_mtime_ns)))
            continue
        listed = remote_files(entry)
        if len(listed) > 1 or listed[0][0] != entry:  # a folder: its text files only
            listed = [f for f in listed if f[0].endswith(TEXT_SUFFIXES)]
            if not listed:
                raise DataError(
                    f"dataset {spec.name!r}: folder {entry} holds no "
                    f"{'/'.join(TEXT_SUFFIXES)} files"
                )
        out.extend(InputFile(spec.name, uri, size, crc) for uri, size, crc in listed)
    return out


def read_file_documents(path: Path, spec: DatasetSpec) -> Iterator[str]:
    """Raw documents of one file of a dataset: one per JSONL line (field spec.text_field), or
    the whole file for text files.

    Raises DataError naming the file (and line) of an unreadable, binary or malformed input.
    """
    text = _read_text(path, spec.name)
    if not path.name.endswith(JSONL_SUFFIXES):
        yield text
        return
    # Not splitlines(): JSON strings may hold raw U+2028 and other Unicode line breaks.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as err:  # also too deep, or too many digits
            reason = getattr(err, "msg", None) or (
                "nested too deeply" if isinstance(err, RecursionError) else "a number too long"
            )
            raise DataError(f"{path}:{number}: not valid JSON ({reason})") from None
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


def read_documents(spec: DatasetSpec) -> Iterator[str]:
    """Raw documents of a dataset (local paths), file by file in order.

    Raises DataError naming the file (and line) of a missing, binary or malformed input.
    """
    for path in dataset_files(spec):
        yield from read_file_documents(path, spec)


def _clean(raw: str, min_chars: int) -> tuple[str, bytes] | None:
    """(normalized text, its sha256) of a raw document, or None when it is too short."""
    text = normalize(raw)
    if len(text) < min_chars:
        return None
    return text, hashlib.sha256(text.encode("utf-8")).digest()


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


# ---------------------------------------------------------------- plan


def tokenizer_sample(files: list[InputFile], config: DataConfig) -> list[str]:
    """The documents a BPE tokenizer is trained on: about data.tokenizer.sample_chars characters.

    Each dataset gets a share of the budget in proportion to the bytes of its files. Its files
    are read in a fixed pseudo-random order (sha256 of dataset name and file position, so the
    sample spreads over the dataset) until their bytes reach the share; of the cleaned
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
        order = sorted(
            range(len(mine)), key=lambda i: hashlib.sha256(f"{name}:{i}".encode()).digest()
        )
        chosen, read = [], 0
        for i in order:
            if read >= share:
                break
            chosen.append(i)
            read += mine[i].size
        found: dict[bytes, str] = {}  # content hash -> text, in file order
        for i in sorted(chosen):
            for raw in read_file_documents(fetch_files(mine[i].uri), spec):
                cleaned = _clean(raw, config.min_chars)
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


def group_bounds(sizes: list[int], groups: int) -> list[tuple[int, int]]:
    """Split files (in order) into min(groups, files) contiguous runs of about equal bytes.

    Run i starts at the first file that starts at or after i / groups of the bytes, moved
    just enough that no run is empty. Returns [start, end) file index ranges, in order.
    """
    n = len(sizes)
    k = min(groups, n)
    weights = sizes if sum(sizes) else [1] * n
    starts = np.concatenate([[0], np.cumsum(weights)[:-1]])
    cuts = [0]
    for i in range(1, k):
        first = int(np.searchsorted(starts, sum(weights) * i / k, side="left"))
        cuts.append(min(max(first, cuts[-1] + 1), n - (k - i)))
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def plan_curation(
    config: DataConfig,
    out: str | Path,
    seed: int,
    tokenizer_dir: str | Path | None = None,
    groups: int | None = None,
    **manifest_fields,
) -> dict:
    """Write the curation plan artifact `out` (plan.json, tokenizer/, manifest last); return the plan.

    The plan lists every input file in config order, split into at most `groups` (default
    data.curate_groups) contiguous groups, and fixes the tokenizer: a copy of the base model's
    (`tokenizer_dir`) or a byte-level BPE trained on `tokenizer_sample`. `manifest_fields`
    pass through to the curated dataset's manifest.
    Raises DataError for missing/unreadable/binary/malformed inputs or an empty tokenizer
    sample, ModelError for an unusable base tokenizer; `out` is untouched on error.
    """
    start = time.perf_counter()
    files = [f for spec in config.datasets for f in input_files(spec)]
    bounds = group_bounds([f.size for f in files], groups or config.curate_groups)
    sample_stats = None
    if tokenizer_dir is not None:
        tokenizer = _load_base_tokenizer(Path(tokenizer_dir))
    else:
        texts = tokenizer_sample(files, config)
        if not texts:
            raise DataError(
                f"no document of at least data.min_chars={config.min_chars} characters in the "
                f"files sampled for the tokenizer (datasets {config.names}); check their paths "
                "and text_field"
            )
        tokenizer = train_tokenizer(texts, config.tokenizer.vocab_size)
        sample_stats = {"documents": len(texts), "chars": sum(len(t) for t in texts)}
    vocab = len(tokenizer)
    # Token ids run from 0 to vocab - 1.
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    plan = {
        "seed": seed,
        "data": config.model_dump(mode="json"),
        "vocab_size": vocab,
        "eos_token_id": int(tokenizer.eos_token_id),
        "dtype": dtype.name,
        "tokenizer_sample": sample_stats,
        "manifest_fields": manifest_fields,
        "groups": [
            [{"dataset": f.dataset, "uri": f.uri, "size": f.size} for f in files[a:b]]
            for a, b in bounds
        ],
    }
    with staged_dir(out) as tmp:
        tokenizer.save_pretrained(tmp / "tokenizer")
        atomic_write_json(tmp / PLAN_FILE, plan)
        write_manifest(tmp, PLAN_KIND, seconds=round(time.perf_counter() - start, 1))
    tokens = (
        f"tokenizer trained on {sample_stats['chars']:,} characters of "
        f"{sample_stats['documents']} documents"
        if sample_stats
        else f"tokenizer of {tokenizer_dir}"
    )
    print(
        f"[demix] curate plan: {len(files)} files in {len(bounds)} groups, {tokens}, "
        f"{time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return plan


def read_plan(plan_dir: str | Path) -> tuple[dict, str]:
    """(plan, plan id: sha256 of plan.json) of a curation plan artifact, its files verified.

    Raises DataError for a missing, incomplete or corrupt plan.
    """
    manifest = read_manifest(plan_dir, kind=PLAN_KIND, verify=True)
    if PLAN_FILE not in manifest["files"]:
        raise DataError(f"{plan_dir}: the curation plan lists no {PLAN_FILE}; plan again")
    plan = json.loads((Path(plan_dir) / PLAN_FILE).read_text())
    return plan, manifest["files"][PLAN_FILE]["sha256"]


# ---------------------------------------------------------------- map


def curate_group(plan_dir: str | Path, index: int, out: str | Path) -> dict:
    """Curate group `index` of a plan into the artifact `out`; return its manifest.

    Per dataset of the group: <name>/tokens.bin (each kept document's tokens and eos, in file
    order), <name>/lengths.bin (int64 tokens per document) and <name>/hashes.bin (the 32-byte
    sha256 of each document's normalized text). Documents shorter than data.min_chars and
    repeats within the group (of any dataset) are dropped and counted.
    Raises DataError for an unknown group, an input that changed since the plan was made, or
    an unreadable/binary/malformed file; `out` is untouched on error.
    """
    start = time.perf_counter()
    plan, plan_id = read_plan(plan_dir)
    if not 0 <= index < len(plan["groups"]):
        raise DataError(
            f"{plan_dir}: no group {index}; the curation plan has groups 0-{len(plan['groups']) - 1}"
        )
    config = DataConfig.model_validate(plan["data"])
    specs = {spec.name: spec for spec in config.datasets}
    from demix.model import load_tokenizer

    tokenizer = load_tokenizer(Path(plan_dir) / "tokenizer")
    eos, dtype = int(plan["eos_token_id"]), np.dtype(plan["dtype"])
    files = plan["groups"][index]
    seen: set[bytes] = set()
    stats: dict[str, dict] = {}
    with staged_dir(out) as tmp:
        for name in dict.fromkeys(f["dataset"] for f in files):
            (tmp / name).mkdir()
            docs, short, dups, lengths = 0, 0, 0, []
            with (
                open(tmp / name / "tokens.bin", "wb") as tokens,
                open(tmp / name / "hashes.bin", "wb") as hashes,
            ):
                for entry in (f for f in files if f["dataset"] == name):
                    path = fetch_files(entry["uri"])
                    size = path.stat().st_size if path.is_file() else None
                    if size != entry["size"]:
                        raise DataError(
                            f"{entry['uri']}: {'missing' if size is None else f'{size} bytes'}, "
                            f"{entry['size']} bytes when the curation plan was made; an input "
                            "changed during curation, curate again"
                        )
                    kept: list[str] = []
                    for raw in read_file_documents(path, specs[name]):
                        cleaned = _clean(raw, config.min_chars)
                        if cleaned is None:
                            short += 1
                        elif cleaned[1] in seen:
                            dups += 1
                        else:
                            seen.add(cleaned[1])
                            kept.append(cleaned[0])
                            hashes.write(cleaned[1])
                    lengths += encode_documents(tokenizer, kept, eos, dtype, tokens)
                    docs += len(kept)
            np.asarray(lengths, dtype="<i8").tofile(tmp / name / "lengths.bin")
            stats[name] = {
                "documents": docs,
                "dropped_short": short,
                "duplicates_removed": dups,
                "tokens": int(sum(lengths)),
            }
        manifest = write_manifest(
            tmp,
            GROUP_KIND,
            plan=plan_id,
            group=index,
            datasets=stats,
            seconds=round(time.perf_counter() - start, 1),
        )
    print(
        f"[demix] curate group {index + 1}/{len(plan['groups'])}: {len(files)} files, "
        f"{sum(s['documents'] for s in stats.values())} documents, "
        f"{sum(s['tokens'] for s in stats.values()):,} tokens, {manifest['seconds']:.1f} s",
        file=sys.stderr,
    )
    return manifest


# ---------------------------------------------------------------- reduce


@dataclasses.dataclass
class _Part:
    """One dataset's documents in one group, and where each goes: 0 dropped, 1 train, 2 held out."""

    folder: Path
    lengths: np.ndarray
    dest: np.ndarray


def _read_part(folder: Path, documents: int, dtype: np.dtype) -> tuple[list[bytes], np.ndarray]:
    """(content hashes, token lengths) of one dataset's documents in a curated group."""
    raw = (folder / "hashes.bin").read_bytes()
    lengths = np.fromfile(folder / "lengths.bin", dtype="<i8")
    tokens = (folder / "tokens.bin").stat().st_size
    if (
        len(raw) != documents * HASH_BYTES
        or len(lengths) != documents
        or (tokens != int(lengths.sum()) * dtype.itemsize)
    ):
        raise DataError(
            f"{folder}: its files do not hold the {documents} documents its manifest lists; "
            "curate the group again"
        )
    return [raw[i : i + HASH_BYTES] for i in range(0, len(raw), HASH_BYTES)], lengths


def _group_manifests(plan: dict, plan_id: str, group_dirs: list[Path]) -> list[tuple[Path, dict]]:
    """The curated groups of the plan, in group order; each must be given exactly once."""
    found: dict[int, tuple[Path, dict]] = {}
    for folder in group_dirs:
        manifest = read_manifest(folder, kind=GROUP_KIND)
        if manifest.get("plan") != plan_id:
            raise DataError(
                f"{folder}: a curated group of another curation plan; curate the groups of "
                "this plan again"
            )
        index = int(manifest["group"])
        if index in found:
            raise DataError(f"{folder}: group {index} is given twice (also {found[index][0]})")
        found[index] = (folder, manifest)
    missing = sorted(set(range(len(plan["groups"]))) - set(found))
    if missing:
        raise DataError(
            f"curated groups {missing} of {len(plan['groups'])} are missing; curate them first"
        )
    return [found[i] for i in range(len(plan["groups"]))]


def _copy_runs(part: _Part, dtype: np.dtype, outputs: dict[int, BinaryIO]) -> None:
    """Append each run of documents with the same destination to that destination's file."""
    if not len(part.dest):
        return
    tokens = np.memmap(part.folder / "tokens.bin", dtype=dtype, mode="r")
    offsets = np.concatenate([[0], np.cumsum(part.lengths)])
    change = np.flatnonzero(np.diff(part.dest)) + 1
    for first, last in zip(
        np.concatenate([[0], change]), np.concatenate([change, [len(part.dest)]]), strict=True
    ):
        target = outputs.get(int(part.dest[first]))
        if target is None:
            continue
        for at in range(int(offsets[first]), int(offsets[last]), COPY_CHUNK_TOKENS):
            np.asarray(tokens[at : min(at + COPY_CHUNK_TOKENS, int(offsets[last]))]).tofile(target)


def merge_groups(plan_dir: str | Path, group_dirs: list[str | Path], out: str | Path) -> dict:
    """Merge the curated groups of a plan into the dataset artifact `out`; return its manifest.

    Groups are taken in plan order whatever the order of `group_dirs`. A document whose hash
    an earlier group (or dataset) already kept is dropped and counted as a duplicate; per
    dataset, held-out documents are chosen by `heldout_indices` over the remaining hashes;
    train.bin and heldout.bin concatenate their documents in file order.
    Raises DataError for a missing, repeated or foreign group and for a dataset that is empty
    after cleaning; `out` is untouched on error.
    """
    start = time.perf_counter()
    plan, plan_id = read_plan(plan_dir)
    config = DataConfig.model_validate(plan["data"])
    groups = _group_manifests(plan, plan_id, [Path(d) for d in group_dirs])
    dtype = np.dtype(plan["dtype"])
    seen: set[bytes] = set()
    parts: dict[str, list[_Part]] = {}
    stats: dict[str, dict] = {}
    for spec in config.datasets:
        short, dups, hashes, parts[spec.name] = 0, 0, [], []
        for folder, manifest in groups:
            counts = manifest["datasets"].get(spec.name)
            if counts is None:
                continue
            short += counts["dropped_short"]
            dups += counts["duplicates_removed"]
            digests, lengths = _read_part(folder / spec.name, counts["documents"], dtype)
            dest = np.zeros(len(digests), dtype=np.int8)
            for i, digest in enumerate(digests):
                if digest in seen:
                    dups += 1
                    continue
                seen.add(digest)
                dest[i] = 1
                hashes.append(digest.hex())
            parts[spec.name].append(_Part(folder / spec.name, lengths, dest))
        if not hashes:
            raise DataError(
                f"dataset {spec.name!r} is empty after cleaning ({short} documents shorter than "
                f"data.min_chars={config.min_chars}, {dups} duplicates); check its paths and "
                "text_field"
            )
        held = heldout_indices(hashes, config, plan["seed"])
        position = 0  # of the dataset's first kept document in this group among all kept
        for part in parts[spec.name]:
            kept = np.flatnonzero(part.dest)
            is_held = np.fromiter((position + k in held for k in range(len(kept))), bool, len(kept))
            part.dest[kept[is_held]] = 2
            position += len(kept)
        stats[spec.name] = {
            "documents": len(hashes) - len(held),
            "heldout_documents": len(held),
            "dropped_short": short,
            "duplicates_removed": dups,
            "sources": list(spec.paths),
            "train_tokens": sum(int(p.lengths[p.dest == 1].sum()) for p in parts[spec.name]),
            "heldout_tokens": sum(int(p.lengths[p.dest == 2].sum()) for p in parts[spec.name]),
        }
    total = sum(s["train_tokens"] for s in stats.values())
    prior = {name: s["train_tokens"] / total for name, s in stats.items()}
    seconds = read_manifest(plan_dir)["seconds"] + sum(m["seconds"] for _, m in groups)
    with staged_dir(out) as tmp:
        shutil.copytree(Path(plan_dir) / "tokenizer", tmp / "tokenizer")
        for name, dataset_parts in parts.items():
            (tmp / name).mkdir()
            with (
                open(tmp / name / "train.bin", "wb") as train,
                open(tmp / name / "heldout.bin", "wb") as heldout,
            ):
                for part in dataset_parts:
                    _copy_runs(part, dtype, {1: train, 2: heldout})
        extra = {"tokenizer_sample": plan["tokenizer_sample"]} if plan["tokenizer_sample"] else {}
        manifest = write_manifest(
            tmp,
            DATASET_KIND,
            datasets=stats,
            token_prior=prior,
            dtype=dtype.name,
            vocab_size=plan["vocab_size"],
            eos_token_id=plan["eos_token_id"],
            tokenizer="tokenizer",
            **extra,
            seconds=round(seconds + time.perf_counter() - start, 1),
            **plan["manifest_fields"],
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
        f"[demix] curate: {len(groups)} groups merged in {time.perf_counter() - start:.1f} s, "
        f"curation total {manifest['seconds']:.1f} s -> {out}",
        file=sys.stderr,
    )
    return manifest


# ---------------------------------------------------------------- in one process


def curate(
    config: DataConfig,
    out: str | Path,
    seed: int,
    tokenizer_dir: str | Path | None = None,
    groups: int | None = None,
    **manifest_fields,
) -> dict:
    """Curate `config.datasets` into the artifact folder `out`; return its manifest.

    Plan, every group and the merge in this process, with the plan and groups in a temporary
    folder beside `out`. Cleaning: NFC, unix newlines, trailing spaces stripped; documents
    shorter than config.min_chars dropped; exact duplicates (sha256 of the normalized text)
    removed within and across datasets, the first in config order kept. With `tokenizer_dir`
    (a base model) its tokenizer is copied, else a byte-level BPE is trained on a sample.
    `groups` (default data.curate_groups) does not change the result.
    Raises DataError for missing/unreadable/binary/malformed inputs and for a dataset that is
    empty after cleaning, ModelError for an unusable base tokenizer; `out` is untouched on error.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = f".{out.name}.curate-"
    for stale in out.parent.glob(f"{glob.escape(scratch)}*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=scratch) as work:
        plan_dir = Path(work) / "plan"
        plan = plan_curation(config, plan_dir, seed, tokenizer_dir, groups, **manifest_fields)
        group_dirs = [Path(work) / f"group-{i}" for i in range(len(plan["groups"]))]
        for index, folder in enumerate(group_dirs):
            curate_group(plan_dir, index, folder)
        return merge_groups(plan_dir, group_dirs, out)
