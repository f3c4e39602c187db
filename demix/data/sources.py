"""Input side of curation: dataset specs to input files (local paths and gs:// URIs), documents
read from .jsonl/.txt (optionally gzipped), zstd-compressed .jsonl, Parquet files and folders
saved by `datasets` (Arrow shards), and the text normalization every document gets. Files are
read in bounded pieces and documents bounded by data.max_document_bytes (demix.data.lines)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any

from demix.config import DatasetSpec
from demix.data.lines import (
    DocumentLimit,
    OversizeCount,
    bounded_lines,
    bounded_text,
    checked_chunks,
    file_chunks,
    utf8_prefix,
)
from demix.errors import DataError, DemixError, json_type, one_line
from demix.storage import check_uri, fetch_files, is_remote, remote_files, split_gs

# What a folder is expanded to (a saved `datasets` folder: its .arrow shards instead).
INPUT_SUFFIXES = (
    ".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd", ".txt", ".txt.gz", ".parquet",
)  # fmt: skip
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
ZSTD_SUFFIXES = (".jsonl.zst", ".jsonl.zstd")
ARROW_SUFFIXES = (".parquet", ".arrow")
ARROW_BATCH_ROWS = 1024  # rows of the text column read at a time
HASH_BYTES = 32  # sha256 of a document's normalized text
# A Python str holds a surrogate code point only when it is unpaired (json.loads joins pairs).
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def normalize(text: str) -> str:
    """Lone surrogates as U+FFFD, NFC, unix newlines, no trailing spaces, no surrounding whitespace.

    A lone UTF-16 surrogate (a JSON escape such as "\\ud83d" without its pair, common in scraped
    text) is not a character and cannot be encoded as UTF-8; it becomes U+FFFD, the replacement
    character, as a UTF-8 decoder replaces an invalid byte. Escaped pairs are joined by the JSON
    parser before this and are kept.
    """
    text = _LONE_SURROGATE.sub("\ufffd", text)
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def _decoded(raw: bytes, where: str, offset: int, first: bool) -> str:
    """UTF-8 bytes read at `offset` of a file as text (a byte order mark dropped at the start).

    Raises DataError naming `where` and the offset of a bad byte.
    """
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{where} is not UTF-8 text (bad byte at offset {offset + err.start}); "
            "convert it to UTF-8"
        ) from None


def _file_chunks(path: Path, dataset: str) -> Iterator[bytes]:
    """A file's decompressed bytes in bounded chunks, refused when binary or UTF-16/32."""
    return checked_chunks(file_chunks(path, dataset), path, dataset)


def _text_document(
    path: Path, dataset: str, limit: DocumentLimit, counts: OversizeCount
) -> Iterator[str]:
    """The whole of a text file (.txt, .txt.gz) as one document, at most limit.max_bytes of it
    read into memory. Raises DataError naming the file."""
    raw, more = bounded_text(_file_chunks(path, dataset), limit.max_bytes)
    if more:
        if limit.oversize == "refuse":
            raise limit.refusal(str(path))
        if limit.oversize == "skip":
            counts.skipped += 1
            return
        counts.truncated += 1
        raw = utf8_prefix(raw)
    yield _decoded(raw, f"dataset {dataset!r}: {path}", 0, True)


def _saved_shards(spec: DatasetSpec, folder: str, state: bytes) -> list[str]:
    """The .arrow shard names, in order, of a folder saved by `datasets` (save_to_disk), from
    its state.json. Raises DataError naming the folder when it lists none."""
    try:
        names = [entry["filename"] for entry in json.loads(state)["_data_files"]]
    except (ValueError, KeyError, TypeError):
        names = []
    if not names or not all(
        isinstance(n, str) and n.endswith(".arrow") and PurePosixPath(n).name == n for n in names
    ):
        raise DataError(
            f"dataset {spec.name!r}: {folder}/state.json lists no .arrow shards (_data_files); "
            "save the dataset again with save_to_disk"
        )
    return names


def _dataset_dict_error(spec: DatasetSpec, folder: str, text: bytes) -> DataError:
    """The error for a DatasetDict folder (one subfolder per split) given as a dataset path."""
    try:
        splits = [str(s) for s in json.loads(text)["splits"]]
    except (ValueError, KeyError, TypeError):
        splits = []
    return DataError(
        f"dataset {spec.name!r}: {folder} is a saved DatasetDict of splits {splits}; give one "
        f"split's folder, e.g. {folder}/{splits[0] if splits else 'train'}"
    )


def _local_files(spec: DatasetSpec, entry: str) -> list[Path]:
    """The input files of one local path of a dataset. Raises DataError naming the path."""
    path = Path(entry)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            raise _dataset_dict_error(spec, str(path), (path / "dataset_dict.json").read_bytes())
        if (path / "state.json").is_file():
            shards = [
                path / n for n in _saved_shards(spec, str(path), (path / "state.json").read_bytes())
            ]
            if missing := [p.name for p in shards if not p.is_file()]:
                raise DataError(
                    f"dataset {spec.name!r}: {path} lacks the shards {missing} its state.json "
                    "lists; save the dataset again"
                )
            return shards
        try:
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.name.endswith(INPUT_SUFFIXES)
            )
        except OSError as err:
            raise DataError(
                f"dataset {spec.name!r}: cannot list folder {path} ({err.strerror})"
            ) from None
        if not found:
            raise DataError(
                f"dataset {spec.name!r}: folder {path} holds no {'/'.join(INPUT_SUFFIXES)} files"
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
        if len(listed) > 1 or listed[0][0] != entry:  # a folder
            listed = _remote_folder_files(spec, entry, listed)
        out.extend(InputFile(spec.name, uri, size, crc) for uri, size, crc in listed)
    return out


def _remote_folder_files(
    spec: DatasetSpec, entry: str, listed: list[tuple[str, int, str]]
) -> list[tuple[str, int, str]]:
    """The input files of a gs:// folder, as `_local_files` picks them from a local one."""
    bucket, key = split_gs(entry)
    folder = f"gs://{bucket}/{key}"
    by_uri = {f[0]: f for f in listed}
    if f"{folder}/dataset_dict.json" in by_uri:
        text = fetch_files(f"{folder}/dataset_dict.json").read_bytes()
        raise _dataset_dict_error(spec, folder, text)
    if f"{folder}/state.json" in by_uri:
        names = _saved_shards(spec, folder, fetch_files(f"{folder}/state.json").read_bytes())
        if missing := [n for n in names if f"{folder}/{n}" not in by_uri]:
            raise DataError(
                f"dataset {spec.name!r}: {folder} lacks the shards {missing} its state.json "
                "lists; save the dataset again"
            )
        return [by_uri[f"{folder}/{n}"] for n in names]
    found = [f for f in listed if f[0].endswith(INPUT_SUFFIXES)]
    if not found:
        raise DataError(
            f"dataset {spec.name!r}: folder {entry} holds no {'/'.join(INPUT_SUFFIXES)} files"
        )
    return found


def read_json_line(line: str, where: str, error: type[DemixError]) -> Any:
    """The JSON value of one line of a JSONL file, `where` being its "file:line".

    Raises `error` "where: not valid JSON (why)" for anything json cannot read, including
    values nested too deeply for the parser and integers of more digits than Python converts.
    """
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        reason = err.msg
    except RecursionError:
        reason = "nested too deeply"
    except ValueError:  # sys.get_int_max_str_digits(): 4300 digits by default
        reason = "a number with too many digits"
    raise error(f"{where}: not valid JSON ({reason})")


def read_file_documents(
    path: Path,
    spec: DatasetSpec,
    limit: DocumentLimit | None = None,
    counts: OversizeCount | None = None,
) -> Iterator[str]:
    """Raw documents of one file of a dataset: one per JSONL line (field spec.text_field), one
    per row of a Parquet or Arrow file (column spec.text_field), or the whole file for text
    files. Every file is read piece by piece, decompressed as read (gzip, zstd), and no
    document longer than `limit` (default: data.max_document_bytes' default, refused) is ever
    held whole: one is refused, skipped or truncated as limit.oversize says, and counted in
    `counts`.

    Raises DataError naming the file (and line or row) of an unreadable, binary or malformed
    input, of a record whose text is missing or not a string, or of a document over the limit
    under oversize: refuse.
    """
    limit = limit or DocumentLimit()
    counts = counts if counts is not None else OversizeCount()
    if path.name.endswith(ARROW_SUFFIXES):
        yield from _table_documents(path, spec, limit, counts)
    elif path.name.endswith(JSONL_SUFFIXES + ZSTD_SUFFIXES):
        yield from _jsonl_documents(path, spec, limit, counts)
    elif spec.where:
        raise DataError(
            f"{path}: dataset {spec.name!r} selects records by {sorted(spec.where)} (where), "
            "but a text file has no fields; give JSONL or Parquet records or remove where"
        )
    else:
        yield from _text_document(path, spec.name, limit, counts)


def selected(spec: DatasetSpec, value_of) -> bool:
    """Whether a record passes spec.where; value_of(field) gives the record's value or None."""
    for field, patterns in spec.where.items():
        value = value_of(field)
        if not isinstance(value, str) or not any(fnmatchcase(value, p) for p in patterns):
            return False
    return True


def _jsonl_documents(
    path: Path, spec: DatasetSpec, limit: DocumentLimit, counts: OversizeCount
) -> Iterator[str]:
    """The text field of each non-blank JSONL line, lines read up to limit.max_bytes (a longer
    record cannot be parsed without holding it: refused, or skipped under skip and truncate).
    Raises DataError naming file and line."""
    lines = bounded_lines(_file_chunks(path, spec.name), limit.max_bytes)
    for number, offset, raw in lines:
        if raw is None:
            if limit.oversize == "refuse":
                raise limit.refusal(f"{path}:{number}", "record")
            counts.skipped += 1
            continue
        # Not splitlines(): JSON strings may hold raw U+2028 and other Unicode line breaks.
        line = _decoded(raw, f"dataset {spec.name!r}: {path}", offset, number == 1)
        if not line.strip():
            continue
        record = read_json_line(line, f"{path}:{number}", DataError)
        if not isinstance(record, dict) or spec.text_field not in record:
            raise DataError(
                f"{path}:{number}: no field {spec.text_field!r} "
                f"(set text_field of dataset {spec.name!r})"
            )
        if spec.where and not selected(spec, record.get):
            continue
        value = record[spec.text_field]
        if not isinstance(value, str):
            raise DataError(
                f"{path}:{number}: field {spec.text_field!r} is {json_type(value)}, not a "
                f"string; give each line's text as a JSON string or set text_field of dataset "
                f"{spec.name!r}"
            )
        yield value


def _table_documents(
    path: Path, spec: DatasetSpec, limit: DocumentLimit, counts: OversizeCount
) -> Iterator[str]:
    """The text column of a Parquet file (row group by row group) or an Arrow IPC file or stream
    (record batch by batch), as saved by `datasets`; a value over limit.max_bytes is refused,
    skipped or truncated. Raises DataError naming the file, and the row (counted from 0) of a
    value that is not a string or, under oversize: refuse, too long."""
    import pyarrow as pa
    import pyarrow.ipc
    import pyarrow.parquet as pq

    field, parquet = spec.text_field, path.name.endswith(".parquet")
    row = 0
    try:
        if parquet:
            reader = pq.ParquetFile(path)
            names = reader.schema_arrow.names
            wanted = [field, *(c for c in spec.where if c in names and c != field)]
            batches = reader.iter_batches(batch_size=ARROW_BATCH_ROWS, columns=wanted)
        else:
            source = pa.memory_map(str(path))
            is_file = source.read(6) == b"ARROW1"  # the IPC file format, else a stream
            source.seek(0)
            reader = pa.ipc.open_file(source) if is_file else pa.ipc.open_stream(source)
            names = reader.schema.names
            batches = (
                (reader.get_batch(i) for i in range(reader.num_record_batches))
                if is_file
                else reader
            )
        if field not in names:
            raise DataError(
                f"{path}: no column {field!r} (its columns: {names}); set text_field of "
                f"dataset {spec.name!r}"
            )
        for batch in batches:
            column = batch.column(field)
            keep = _batch_selection(spec, batch)
            for i, value in enumerate(column.to_pylist()):
                if keep is not None and not keep[i]:
                    row += 1
                    continue
                if not isinstance(value, str):
                    kind = "null" if value is None else f"of type {column.type}"
                    raise DataError(
                        f"{path}:row {row}: column {field!r} is {kind}, not a string; set "
                        f"text_field of dataset {spec.name!r} to a text column"
                    )
                value = _within(value, limit, counts, f"{path}:row {row}")
                if value is not None:
                    yield value
                row += 1
    except (pa.ArrowException, OSError) as err:
        kind = "Parquet" if parquet else "Arrow (IPC)"
        after = f" after row {row - 1}" if row else ""
        raise DataError(f"{path}: not a readable {kind} file{after} ({one_line(err)})") from None


def _within(value: str, limit: DocumentLimit, counts: OversizeCount, where: str) -> str | None:
    """A table's text value within the limit: as it is, cut (truncate), or None (skip).

    Raises DataError naming `where` for a longer one under oversize: refuse."""
    if len(value) * 4 <= limit.max_bytes:  # a character is at most 4 bytes: no need to count
        return value
    raw = value.encode("utf-8", "surrogatepass")
    if len(raw) <= limit.max_bytes:
        return value
    if limit.oversize == "refuse":
        raise limit.refusal(where)
    if limit.oversize == "skip":
        counts.skipped += 1
        return None
    counts.truncated += 1
    return utf8_prefix(raw[: limit.max_bytes]).decode("utf-8", "surrogatepass")


def _batch_selection(spec: DatasetSpec, batch) -> list[bool] | None:
    """Which rows of a record batch pass spec.where (None: every row, no `where`)."""
    if not spec.where:
        return None
    names = batch.schema.names
    columns = {c: batch.column(c).to_pylist() if c in names else None for c in spec.where}
    return [
        selected(spec, lambda c, i=i: None if columns[c] is None else columns[c][i])
        for i in range(batch.num_rows)
    ]


def read_documents(spec: DatasetSpec, limit: DocumentLimit | None = None) -> Iterator[str]:
    """Raw documents of a dataset (local paths), file by file in order, each within `limit`.

    Raises DataError naming the file (and line) of a missing, binary or malformed input.
    """
    for path in dataset_files(spec):
        yield from read_file_documents(path, spec, limit)


def clean_document(raw: str, min_chars: int) -> tuple[str, bytes] | None:
    """(normalized text, its sha256) of a raw document, or None when it is too short."""
    text = normalize(raw)
    if len(text) < min_chars:
        return None
    return text, hashlib.sha256(text.encode("utf-8")).digest()
