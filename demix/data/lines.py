"""Input files read in bounded pieces: decompressed as read (gzip, zstd), split into lines
without ever holding a line longer than data.max_document_bytes, and the size rule for
documents (`DocumentLimit`: refuse, skip or truncate what is longer).

A 14 MB gzip file can hold a 3 GiB line: read whole, it takes gigabytes before anything can
refuse it. Here a file's decompressed bytes come in chunks of at most READ_BYTES (zstd: at
most ZSTD_FEED_BYTES of compressed input per step, whose output zstd bounds at about 32 MiB),
and a line is gathered only up to the limit; the rest of a longer one is read and dropped.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import itertools
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from demix.config import DataConfig

from demix.config.bounds import DEFAULT_MAX_DOCUMENT_BYTES
from demix.errors import DataError, one_line

READ_BYTES = 1 << 16  # decompressed (or plain) bytes read at a time
ZSTD_READ_BYTES = 1 << 16  # compressed bytes read from a zstd file at a time
# compressed bytes fed to zstd per step: a block of 128 KiB can take 4 bytes, so one step
# yields at most about 32 MiB however the file was made
ZSTD_FEED_BYTES = 1 << 10
HEAD_BYTES = 4096  # what the UTF-16/32 check looks at


@dataclasses.dataclass(frozen=True)
class DocumentLimit:
    """The most bytes one document may take as read (`max_bytes`) and what happens to a
    longer one (`oversize`: refuse, skip or truncate; see DataConfig)."""

    max_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES
    oversize: str = "refuse"

    @classmethod
    def of(cls, config: DataConfig) -> DocumentLimit:
        """The limit a DataConfig sets."""
        return cls(config.max_document_bytes, config.oversize)

    def refusal(self, where: str, what: str = "document") -> DataError:
        """The one-line error of a document over the limit at `where` (file:line or file)."""
        return DataError(
            f"{where}: a {what} of more than {self.max_bytes:,} bytes (data.max_document_bytes); "
            "raise data.max_document_bytes, or set data.oversize: skip or truncate"
        )


@dataclasses.dataclass
class OversizeCount:
    """Documents over the limit that were left out (`skipped`) or cut (`truncated`)."""

    skipped: int = 0
    truncated: int = 0


def oversize_counts(counts: OversizeCount) -> dict[str, int]:
    """The counts as a manifest records them: oversize_skipped and oversize_truncated, each
    only when not 0."""
    found = {"oversize_skipped": counts.skipped, "oversize_truncated": counts.truncated}
    return {key: n for key, n in found.items() if n}


def file_chunks(path: Path, dataset: str) -> Iterator[bytes]:
    """The decompressed bytes of a plain, gzip (.gz) or zstd (.zst, .zstd) file, in bounded
    chunks. Raises DataError naming the file when it cannot be read or decompressed."""
    name = path.name
    try:
        if name.endswith((".zst", ".zstd")):
            yield from _zstd_chunks(path)
            return
        with gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb") as f:
            while chunk := f.read(READ_BYTES):
                yield chunk
    except (EOFError, zlib.error, gzip.BadGzipFile):
        raise DataError(
            f"dataset {dataset!r}: {path} is not valid gzip; give .jsonl/.txt or gzip of them"
        ) from None
    except OSError as err:
        raise DataError(
            f"dataset {dataset!r}: cannot read {path} ({err.strerror or one_line(err)}); "
            "check its permissions"
        ) from None


def _zstd_chunks(path: Path) -> Iterator[bytes]:
    """The decompressed bytes of a zstd file (one or more frames). Raises DataError naming the
    file and about where a frame is corrupt or cut off."""
    import zstandard

    at = 0  # compressed bytes consumed before `chunk`
    frame = None  # the decompressor of the frame being read
    with open(path, "rb") as raw:
        while block := raw.read(ZSTD_READ_BYTES):
            for start in range(0, len(block), ZSTD_FEED_BYTES):
                chunk = block[start : start + ZSTD_FEED_BYTES]
                while chunk:
                    if frame is None:
                        frame = zstandard.ZstdDecompressor().decompressobj()
                    try:
                        data = frame.decompress(chunk)
                    except zstandard.ZstdError as err:
                        raise DataError(
                            f"{path}: corrupt zstd data near byte {at} ({one_line(err)}); "
                            "compress the file again"
                        ) from None
                    if data:
                        yield data
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


def checked_chunks(chunks: Iterator[bytes], path: Path, dataset: str) -> Iterator[bytes]:
    """The chunks, refused (DataError naming the file) when the file reads as UTF-16 or
    UTF-32 (from its first HEAD_BYTES, checked before any chunk is passed on) or holds a NUL
    byte (binary)."""
    first: list[bytes] = []  # the chunks holding the head: at most HEAD_BYTES and one chunk
    for chunk in chunks:
        first.append(chunk)
        if sum(map(len, first)) >= HEAD_BYTES:
            break
    if wide := utf16_or_32(b"".join(first)[:HEAD_BYTES]):
        raise DataError(
            f"dataset {dataset!r}: {path} is {wide} encoded; convert it to UTF-8 "
            f"(e.g. iconv -f {wide} -t UTF-8)"
        )
    for chunk in itertools.chain(first, chunks):
        if b"\x00" in chunk:
            raise DataError(
                f"dataset {dataset!r}: {path} is binary (NUL bytes); give UTF-8 .jsonl or "
                ".txt files"
            )
        yield chunk


def utf16_or_32(raw: bytes) -> str | None:
    """The encoding, UTF-16 or UTF-32, when the bytes start with its byte order mark or read as
    printable UTF-16 text without one (NUL high bytes at every other position); else None."""
    for bom, name in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32")):
        if raw.startswith(bom):
            return name
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    head = raw[: min(len(raw), HEAD_BYTES) // 2 * 2]
    even, odd = head[0::2].count(0), head[1::2].count(0)
    if min(even, odd) or max(even, odd) <= len(head) // 4:
        return None
    text = head.decode("utf-16-le" if odd else "utf-16-be", errors="replace")
    printable = sum(c.isprintable() or c.isspace() for c in text)
    return "UTF-16" if printable >= 0.95 * len(text) else None


def bounded_lines(
    chunks: Iterator[bytes], max_bytes: int
) -> Iterator[tuple[int, int, bytes | None]]:
    """(line number from 1, the line's offset in the bytes, the line without "\\n") of each
    "\\n"-separated line; a line longer than max_bytes is never held: (number, offset, None) is
    yielded as soon as it passes max_bytes (a caller that refuses it reads no further), and its
    rest is read and dropped when the caller goes on."""
    pending: list[bytes] = []
    size, number, offset, over = 0, 0, 0, False
    for chunk in chunks:
        start = 0
        while start < len(chunk):
            end = chunk.find(b"\n", start)
            piece = chunk[start : len(chunk) if end < 0 else end]
            size += len(piece)
            if not over:
                if size > max_bytes:
                    over, pending = True, []
                    yield number + 1, offset, None
                else:
                    pending.append(piece)
            if end < 0:
                break
            number += 1
            if not over:
                yield number, offset, b"".join(pending)
            pending, offset, over = [], offset + size + 1, False
            size = 0
            start = end + 1
    if not over:
        yield number + 1, offset, b"".join(pending)


def bounded_text(chunks: Iterator[bytes], max_bytes: int) -> tuple[bytes, bool]:
    """(the first max_bytes bytes of the chunks, whether there are more); nothing past the
    first byte over max_bytes is read."""
    kept: list[bytes] = []
    size = 0
    for chunk in chunks:
        kept.append(chunk[: max_bytes - size])
        size += len(kept[-1])
        if len(chunk) > len(kept[-1]):
            return b"".join(kept), True
    return b"".join(kept), False


def utf8_prefix(data: bytes) -> bytes:
    """`data` without an incomplete UTF-8 character at its end (a cut made at a byte count)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        decoder.decode(data, final=False)
    except UnicodeDecodeError:
        return data  # invalid before the end: refused when it is decoded
    buffered = decoder.getstate()[0]
    return data[: len(data) - len(buffered)] if buffered else data
