"""Zero-copy safetensors reading and streaming safetensors writing for the disk merge.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length, a
JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}
padded with spaces to a multiple of 8, then the tensors' bytes back to back.

`MappedSafetensors` maps a file once and hands out tensors that are views of the page cache (no
copy, no per-tensor open); `release` drops a tensor's pages from this process again, so peak
memory does not grow with the bytes read. Headers are validated before any view is made: a
file that is not safetensors, or whose offsets point outside it, is a one-line ModelError.

`SafetensorsStreamWriter` writes shards whose layout is planned up front from the tensors'
names, shapes and dtypes, so each merged tensor goes to disk as soon as it is computed: written
and sha256-hashed on a background thread (file writes and hashing release the GIL) while the
next tensor is merged, with at most `depth` tensors in flight.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from demix.errors import ModelError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024**2  # the limit safetensors itself applies


class MappedSafetensors:
    """One safetensors file, memory-mapped once; `tensor(name)` is a zero-copy view."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                length = struct.unpack("<Q", f.read(8))[0] if size >= 8 else None
                if length is None or not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
                    raise ValueError("no safetensors header")
                header = json.loads(f.read(length))
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError, struct.error) as err:
            raise ModelError(f"{self.path}: not a readable safetensors file ({err})") from None
        self.data_start = 8 + length
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        if not isinstance(header, dict):
            raise ModelError(f"{self.path}: safetensors header is not a JSON object")
        for name, info in header.items():
            if name != "__metadata__":
                self.entries[name] = self._check(name, info, size - self.data_start)

    def _check(self, name: str, info, data_bytes: int) -> tuple:
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(
                f"{self.path}: tensor {name!r} has an unsupported or malformed header entry"
            ) from None
        nbytes = math.prod(shape) * dtype.itemsize
        if (
            min(shape, default=0) < 0
            or not 0 <= begin <= end <= data_bytes
            or end - begin != nbytes
        ):
            raise ModelError(f"{self.path}: tensor {name!r} has offsets outside the file")
        return dtype, shape, begin, end

    def names(self) -> list[str]:
        return list(self.entries)

    def tensor(self, name: str) -> torch.Tensor:
        """A view of the mapped file (copy-on-write: writing to it never changes the file)."""
        dtype, shape, begin, end = self.entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(
            self._map,
            dtype=dtype,
            count=(end - begin) // dtype.itemsize,
            offset=self.data_start + begin,
        )
        return flat.view(shape)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Drop the pages of elements [start, stop) of tensor `name` from this process.

        Views stay valid: a later read maps the pages from the file again. Pages that the range
        only partly covers are dropped too (that costs at most a re-read, never a wrong value).
        """
        dtype, shape, begin, end = self.entries[name]
        first = self.data_start + begin + start * dtype.itemsize
        last = self.data_start + (end if stop is None else begin + stop * dtype.itemsize)
        page = mmap.PAGESIZE
        first, last = first // page * page, min(-(-last // page) * page, len(self._map))
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)


def _header(entries: list[tuple[str, tuple[int, ...], torch.dtype]]) -> tuple[bytes, int]:
    """The padded header bytes of a shard holding `entries` in order, and its data size."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        if dtype not in DTYPE_NAMES:
            raise ModelError(f"tensor {name!r}: dtype {dtype} cannot be written to safetensors")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offset


class SafetensorsStreamWriter:
    """Writes tensors, in a planned order, into numbered shards as soon as each is given.

    `plan` lists (name, shape, dtype) in write order; shards are cut greedily at `shard_bytes`.
    `write(name, tensor)` must follow the plan. `finish()` waits for the last write, names the
    shards as Hugging Face does (a single `model.safetensors`, or `model-0000i-of-0000n` plus
    `model.safetensors.index.json`, written last) and returns {file: {"size", "sha256"}}.
    """

    def __init__(
        self,
        folder: Path,
        plan: list[tuple[str, tuple[int, ...], torch.dtype]],
        shard_bytes: int,
        depth: int = 2,
    ):
        self.folder, self.depth = folder, depth
        self.shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = math.prod(shape) * dtype.itemsize
            if self.shards[-1] and size + nbytes > shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, tuple(shape), dtype))
            size += nbytes
        self.order = [(i, e) for i, shard in enumerate(self.shards) for e in shard]
        self.position = 0
        headers = [_header(shard) for shard in self.shards]
        self.headers = [header for header, _ in headers]
        self.sizes = [len(header) + data for header, data in headers]
        self.total_bytes = sum(data for _, data in headers)
        self.digests = [hashlib.sha256(header) for header in self.headers]
        self.handle = None
        # Writing and hashing each run on their own thread (both release the GIL).
        self.write_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="demix-write")
        self.hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="demix-hash")
        self.pending: list[tuple[Future, Future]] = []

    def _temporary(self, index: int) -> Path:
        return self.folder / f".shard-{index:05d}.safetensors"

    def _write(self, shard: int, first: bool, last: bool, data: memoryview) -> None:
        if first:
            self.handle = open(self._temporary(shard), "wb")  # noqa: SIM115 (closed below)
            self.handle.write(self.headers[shard])
        self.handle.write(data)
        if last:
            self.handle.close()

    def _wait(self, keep: int) -> None:
        """Wait until at most `keep` tensors are in flight; re-raises a failed write or hash."""
        while len(self.pending) > keep:
            for future in self.pending.pop(0):
                future.result()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Queue `tensor` (contiguous, the planned shape and dtype) for writing.

        The tensor must not change until `depth` more tensors have been queued (or `finish`):
        a caller may cycle through depth + 1 output buffers.
        """
        shard, (expected, shape, dtype) = self.order[self.position]
        if name != expected or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"write {name} {tuple(tensor.shape)} {tensor.dtype} does not follow the plan "
                f"({expected} {shape} {dtype})"
            )
        first = self.position == 0 or self.order[self.position - 1][0] != shard
        self.position += 1
        last = self.position == len(self.order) or self.order[self.position][0] != shard
        self._wait(self.depth - 1)
        data = tensor.contiguous()
        view = memoryview(data.reshape(-1).view(torch.uint8).numpy()) if data.numel() else b""
        self.pending.append(
            (
                self.write_pool.submit(self._write, shard, first, last, view),
                self.hash_pool.submit(self.digests[shard].update, view),
            )
        )

    def finish(self) -> dict[str, dict]:
        """Wait for the writes; name the shards, write the index last; return file hashes."""
        try:
            self._wait(0)
        finally:
            self.write_pool.shutdown(wait=True)
            self.hash_pool.shutdown(wait=True)
        if self.position != len(self.order):
            raise ValueError(f"{len(self.order) - self.position} planned tensors were not written")
        total = len(self.shards)
        names = (
            ["model.safetensors"]
            if total == 1
            else [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
        )
        hashes = {}
        for i, name in enumerate(names):
            os.replace(self._temporary(i), self.folder / name)
            hashes[name] = {"size": self.sizes[i], "sha256": self.digests[i].hexdigest()}
        if total > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {
                    entry[0]: name
                    for shard, name in zip(self.shards, names, strict=True)
                    for entry in shard
                },
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return hashes

    def abort(self) -> None:
        """Stop the writer threads after an error (the caller's staged folder is discarded)."""
        for futures in self.pending:
            for future in futures:
                future.cancel()
        self.write_pool.shutdown(wait=True)
        self.hash_pool.shutdown(wait=True)
        if self.handle is not None and not self.handle.closed:
            self.handle.close()
