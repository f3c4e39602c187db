"""Input side of curation: dataset specs to input files (local paths and gs:// URIs), documents
read from .jsonl/.txt (optionally gzipped), and the text normalization every document gets."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from demix.config import DatasetSpec
from demix.errors import DataError, DemixError
from demix.storage import check_uri, is_remote, remote_files

TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
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


def _local_files(spec: DatasetSpec, entry: str) -> list[Path]:
    """The text files of one local path of a dataset. Raises DataError naming the path."""
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


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, with an article: "null", "a number", "an array"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else "a string"


def read_file_documents(path: Path, spec: DatasetSpec) -> Iterator[str]:
    """Raw documents of one file of a dataset: one per JSONL line (field spec.text_field), or
    the whole file for text files.

    Raises DataError naming the file (and line) of an unreadable, binary or malformed input, or
    of a line whose text field is missing or not a string.
    """
    text = _read_text(path, spec.name)
    if not path.name.endswith(JSONL_SUFFIXES):
        yield text
        return
    # Not splitlines(): JSON strings may hold raw U+2028 and other Unicode line breaks.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        record = read_json_line(line, f"{path}:{number}", DataError)
        if not isinstance(record, dict) or spec.text_field not in record:
            raise DataError(
                f"{path}:{number}: no field {spec.text_field!r} "
                f"(set text_field of dataset {spec.name!r})"
            )
        value = record[spec.text_field]
        if not isinstance(value, str):
            raise DataError(
                f"{path}:{number}: field {spec.text_field!r} is {json_type(value)}, not a "
                f"string; give each line's text as a JSON string or set text_field of dataset "
                f"{spec.name!r}"
            )
        yield value


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
