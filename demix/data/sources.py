"""Input side of curation: dataset specs to input files (local paths and gs:// URIs), documents
read from .jsonl/.txt (optionally gzipped), zstd-compressed .jsonl, Parquet files and folders
saved by `datasets` (Arrow shards), and the text normalization every document gets."""

from __future__ import annotations

import codecs
import dataclasses
import errno
import gzip
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any

from demix.config import DatasetSpec
from demix.errors import DataError, DemixError, json_type, one_line
from demix.storage import check_uri, fetch_files, is_remote, remote_files, split_gs

# What a folder is expanded to (a saved `datasets` folder: its .arrow shards instead).
INPUT_SUFFIXES = (
    ".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd", ".txt", ".txt.gz", ".parquet",
)  # fmt: skip
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
ZSTD_SUFFIXES = (".jsonl.zst", ".jsonl.zstd")
ARROW_SUFFIXES = (".parquet", ".arrow")
ZSTD_READ_BYTES = 1 << 16  # compressed bytes decompressed at a time
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


def _read_text(path: Path, dataset: str) -> str:
    """The text of a (possibly gzipped) UTF-8 file. Raises DataError naming the file."""
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


def read_file_documents(path: Path, spec: DatasetSpec) -> Iterator[str]:
    """Raw documents of one file of a dataset: one per JSONL line (field spec.text_field), one
    per row of a Parquet or Arrow file (column spec.text_field), or the whole file for text
    files. Compressed JSONL (zstd) and Parquet/Arrow files are read piece by piece.

    Raises DataError naming the file (and line or row) of an unreadable, binary or malformed
    input, or of a record whose text is missing or not a string.
    """
    if path.name.endswith(ARROW_SUFFIXES):
        yield from _table_documents(path, spec)
    elif path.name.endswith(ZSTD_SUFFIXES):
        yield from _jsonl_documents(_zstd_lines(path), path, spec)
    elif path.name.endswith(JSONL_SUFFIXES):
        # Not splitlines(): JSON strings may hold raw U+2028 and other Unicode line breaks.
        yield from _jsonl_documents(_read_text(path, spec.name).split("\n"), path, spec)
    elif spec.where:
        raise DataError(
            f"{path}: dataset {spec.name!r} selects records by {sorted(spec.where)} (where), "
            "but a text file has no fields; give JSONL or Parquet records or remove where"
        )
    else:
        yield _read_text(path, spec.name)


def selected(spec: DatasetSpec, value_of) -> bool:
    """Whether a record passes spec.where; value_of(field) gives the record's value or None."""
    for field, patterns in spec.where.items():
        value = value_of(field)
        if not isinstance(value, str) or not any(fnmatchcase(value, p) for p in patterns):
            return False
    return True


def _jsonl_documents(lines: Iterable[str], path: Path, spec: DatasetSpec) -> Iterator[str]:
    """The text field of each non-blank JSONL line. Raises DataError naming file and line."""
    for number, line in enumerate(lines, start=1):
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


def _zstd_chunks(path: Path) -> Iterator[bytes]:
    """The decompressed bytes of a zstd file (one or more frames), ZSTD_READ_BYTES of compressed
    input at a time. Raises DataError naming the file and about where a frame is corrupt or
    cut off."""
    import zstandard

    at = 0  # compressed bytes consumed before `chunk`
    frame = None  # the decompressor of the frame being read
    with open(path, "rb") as raw:
        while chunk := raw.read(ZSTD_READ_BYTES):
            while chunk:
                if frame is None:
                    frame = zstandard.ZstdDecompressor().decompressobj()
                try:
                    yield frame.decompress(chunk)
                except zstandard.ZstdError as err:
                    raise DataError(
                        f"{path}: corrupt zstd data near byte {at} ({one_line(err)}); "
                        "compress the file again"
                    ) from None
                rest = b""
                if frame.eof:  # what follows the frame starts the next one
                    rest, frame = frame.unused_data, None
                at += len(chunk) - len(rest)
                chunk = rest
    if frame is not None:
        raise DataError(
            f"{path}: zstd data ends inside a frame near byte {at} (a truncated file?); "
            "compress or copy it again"
        )


def _zstd_lines(path: Path) -> Iterator[str]:
    """The lines ("\n"-separated) of a zstd-compressed UTF-8 file, decompressed as read."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    done, pending = 0, ""  # decompressed bytes decoded; text after the last newline
    for data in _zstd_chunks(path):
        try:
            pending += decoder.decode(data)
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}: not UTF-8 text (bad byte near decompressed offset {done + err.start}); "
                "convert it to UTF-8"
            ) from None
        done += len(data)
        *lines, pending = pending.split("\n")
        yield from lines
    try:
        pending += decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (it ends inside a character)") from None
    yield pending


def _table_documents(path: Path, spec: DatasetSpec) -> Iterator[str]:
    """The text column of a Parquet file (row group by row group) or an Arrow IPC file or stream
    (record batch by batch), as saved by `datasets`. Raises DataError naming the file, and the
    row (counted from 0) of a value that is not a string."""
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
                yield value
                row += 1
    except (pa.ArrowException, OSError) as err:
        kind = "Parquet" if parquet else "Arrow (IPC)"
        after = f" after row {row - 1}" if row else ""
        raise DataError(f"{path}: not a readable {kind} file{after} ({one_line(err)})") from None


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


def read_documents(spec: DatasetSpec) -> Iterator[str]:
    """Raw documents of a dataset (local paths), file by file in order.

    Raises DataError naming the file (and line) of a missing, binary or malformed input.
    """
    for path in dataset_files(spec):
        yield from read_file_documents(path, spec)


def clean_document(raw: str, min_chars: int) -> tuple[str, bytes] | None:
    """(normalized text, its sha256) of a raw document, or None when it is too short."""
    text = normalize(raw)
    if len(text) < min_chars:
        return None
    return text, hashlib.sha256(text.encode("utf-8")).digest()
