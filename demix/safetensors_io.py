"""Zero-copy safetensors reading and streaming safetensors writing, without torch.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length, a
JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}
padded with spaces to a multiple of 8, then the tensors' bytes back to back.

`MappedSafetensors` maps a file once and hands out numpy arrays (or torch tensors) that are views
of the page cache (no copy, no per-tensor open); `release` drops a tensor's pages from this
process again, so peak memory does not grow with the bytes read. Headers are validated before any
view is made: a file that is not safetensors, or whose offsets point outside it, is a one-line
ModelError.

`SafetensorsStreamWriter` writes shards whose layout is planned up front from the tensors'
names, shapes and dtypes, so each merged tensor goes to disk as soon as it is computed: written
and sha256-hashed on a background thread (file writes and hashing release the GIL) while the
next tensor is merged, with at most `depth` tensors in flight.

Nothing here imports torch: numpy has no bfloat16, so a BF16 tensor is read (and may be written)
as a uint16 array of its bit patterns; `tensor()` gives the torch view when torch is wanted.
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

import numpy as np

from demix.errors import ModelError

# safetensors dtype name -> the numpy dtype its bytes are read as (BF16: its uint16 bit patterns)
NUMPY_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# safetensors dtype name -> how torch and numpy spell it
SPELLED = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_NAMES = {spelled: name for name, spelled in SPELLED.items()}
MAX_HEADER_BYTES = 100 * 1024**2  # the limit safetensors itself applies
# Bytes before a released range that are released with it. A read fault maps the pages around it
# (the fault-around window, 64 KiB by default, or a whole large folio of the page cache, up to
# 2 MiB): without this, every range's tail is mapped again by the read of the next range and
# stays mapped (measured: a 134M-parameter merge read in 1 MiB blocks kept 330 MiB mapped).
RELEASE_BEHIND = 2 * 1024**2


def dtype_name(dtype) -> str:
    """The safetensors name ("F32", "BF16", ...) of a dtype given as that name, as a torch or
    numpy dtype, or spelled ("bfloat16", "torch.float16"); a numpy uint16 is BF16 (bit
    patterns). ValueError for dtypes safetensors files here cannot hold."""
    if isinstance(dtype, str) and dtype in NUMPY_DTYPES:
        return dtype
    spelled = str(np.dtype(dtype) if isinstance(dtype, type) else dtype)
    if isinstance(dtype, np.dtype | type) and spelled == "uint16":
        return "BF16"
    name = _NAMES.get(spelled.removeprefix("torch."))
    if name is None:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors")
    return name


def torch_dtype(name: str):
    """The torch dtype of a safetensors dtype name (imports torch)."""
    import torch

    return getattr(torch, SPELLED[name])


def _no_duplicate_keys(pairs: list) -> dict:
    """A JSON object with each key once (the library refuses a duplicate field).

    Raises ValueError naming the duplicate key.
    """
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r} in the header")
        out[key] = value
    return out


def _int_list(value) -> bool:
    """Whether `value` is a JSON array of integers below 2**64 (negative ones are refused
    later, as offsets outside the file)."""
    return isinstance(value, list) and all(
        isinstance(x, int) and not isinstance(x, bool) and x < 2**64 for x in value
    )


def _overflows(shape: tuple[int, ...], itemsize: int) -> bool:
    """Whether the byte size of `shape`, multiplied out left to right as the library does,
    passes 2**64 at any step (the library refuses it even when a later dimension is 0)."""
    size = 1
    for dim in (*shape, itemsize):
        size *= dim
        if size >= 2**64:
            return True
    return False


class MappedSafetensors:
    """One safetensors file, memory-mapped once; `array(name)` is a zero-copy numpy view.

    The header is checked as the safetensors library checks it before any view is made: a
    JSON object, each tensor's dtype, shape and offsets consistent, the tensors' bytes back to
    back from the end of the header to the end of the file.
    Raises ModelError naming the file and what is wrong.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                length = self._header_length(f.read(8), size)
                header = json.loads(f.read(length), object_pairs_hook=_no_duplicate_keys)
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except ModelError:
            raise
        except RecursionError:
            raise ModelError(
                f"{self.path}: not a readable safetensors file (header nested too deeply)"
            ) from None
        except (OSError, ValueError, struct.error) as err:
            reason = getattr(err, "strerror", None) or " ".join(str(err).split())
            raise ModelError(f"{self.path}: not a readable safetensors file ({reason})") from None
        self.data_start = 8 + length
        # name -> (safetensors dtype name, shape, begin, end), offsets relative to the data
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        if not isinstance(header, dict):
            raise ModelError(f"{self.path}: safetensors header is not a JSON object")
        metadata = header.get("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ModelError(
                f"{self.path}: safetensors __metadata__ is not a mapping of strings to strings"
            )
        for name, info in header.items():
            if name != "__metadata__":
                self.entries[name] = self._check(name, info, size - self.data_start)
        self._check_coverage(size - self.data_start)

    def _header_length(self, first: bytes, size: int) -> int:
        """The header length the file's first 8 bytes give, checked against the file's size.

        Raises ModelError saying why the file cannot be a safetensors file.
        """
        hint = ""
        if first[:1] == b"\x80" or first[:4] == b"PK\x03\x04":
            hint = "; it looks like a pickle (torch.save) file, and DeMix loads safetensors only"
        if size < 8:
            raise ModelError(
                f"{self.path}: not a readable safetensors file ({size} bytes, shorter than the "
                f"8-byte header length){hint}"
            )
        length = struct.unpack("<Q", first)[0]
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise ModelError(
                f"{self.path}: not a readable safetensors file (header length {length} does not "
                f"fit the file of {size} bytes){hint}"
            )
        return length

    def _check(self, name: str, info, data_bytes: int) -> tuple:
        """(dtype, shape, begin, end) of one header entry.

        Raises ModelError naming the tensor of a malformed entry or one outside the file.
        """
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ModelError(
                f"{self.path}: tensor {name!r} has an unsupported or malformed header entry "
                "(expected an object with dtype, shape and data_offsets)"
            )
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in NUMPY_DTYPES:
            raise ModelError(
                f"{self.path}: tensor {name!r} has an unsupported or malformed header entry "
                f"(dtype {repr(dtype)[:40]} is not one of {', '.join(NUMPY_DTYPES)})"
            )
        # The library reads shape as a sequence of usize and offsets as a pair of usize: a
        # JSON array, never an object, a string or a float; an empty object is no scalar shape.
        if not _int_list(shape) or not (_int_list(offsets) and len(offsets) == 2):
            raise ModelError(
                f"{self.path}: tensor {name!r} has an unsupported or malformed header entry "
                "(shape must be an array of non-negative integers, data_offsets an array of two)"
            )
        itemsize = NUMPY_DTYPES[dtype].itemsize
        shape, (begin, end) = tuple(shape), offsets
        if min(shape, default=0) >= 0 and _overflows(shape, itemsize):
            raise ModelError(
                f"{self.path}: tensor {name!r} has a shape {list(shape)} whose byte size "
                "overflows 64 bits"
            )
        if 0 <= begin <= end and end > data_bytes:
            raise ModelError(
                f"{self.path}: tensor {name!r} has offsets outside the file (it ends at data byte "
                f"{end}, the file holds {data_bytes}); the file is truncated or corrupt"
            )
        if (
            min(shape, default=0) < 0
            or not 0 <= begin <= end
            or end - begin != math.prod(shape) * itemsize
        ):
            raise ModelError(
                f"{self.path}: tensor {name!r} has offsets outside the file (its offsets "
                f"[{begin}, {end}] do not hold its shape {list(shape)} of {dtype})"
            )
        return dtype, shape, begin, end

    def _check_coverage(self, data_bytes: int) -> None:
        """The tensors' bytes lie back to back and end where the file ends.

        Raises ModelError naming the first gap, overlap or trailing bytes.
        """
        position, previous = 0, None
        for name, (_, _, begin, end) in sorted(self.entries.items(), key=lambda e: e[1][2:]):
            if begin != position:
                what = "overlap" if begin < position else "leave a gap between them"
                after = f"{previous!r} and {name!r}" if previous else f"the header and {name!r}"
                raise ModelError(f"{self.path}: the bytes of {after} {what}; the file is corrupt")
            position, previous = end, name
        if position != data_bytes:
            raise ModelError(
                f"{self.path}: {data_bytes - position} bytes after the last tensor; the file is "
                "corrupt or was written incompletely"
            )

    def names(self) -> list[str]:
        return list(self.entries)

    def array(self, name: str) -> np.ndarray:
        """A numpy view of the mapped file (BF16 as its uint16 bit patterns; copy-on-write:
        writing to it never changes the file)."""
        dtype, shape, begin, end = self.entries[name]
        np_dtype = NUMPY_DTYPES[dtype]
        if end == begin:
            return np.empty(shape, dtype=np_dtype)
        flat = np.frombuffer(
            self._map,
            dtype=np_dtype,
            count=(end - begin) // np_dtype.itemsize,
            offset=self.data_start + begin,
        )
        return flat.reshape(shape)

    def tensor(self, name: str):
        """The same view as a torch tensor of the stored dtype (imports torch)."""
        import torch

        view = torch.from_numpy(self.array(name))
        return view.view(torch.bfloat16) if self.entries[name][0] == "BF16" else view

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Drop the pages of elements [start, stop) of tensor `name` from this process.

        Views stay valid: a later read maps the pages from the file again. Pages that the range
        only partly covers are dropped too, and so are the RELEASE_BEHIND bytes before it: a read
        makes the kernel map the pages around it (fault-around), so reading the start of one
        range maps the end of the range released before it again. Dropping a page costs at most
        a re-read, never a wrong value.
        """
        dtype, shape, begin, end = self.entries[name]
        itemsize = NUMPY_DTYPES[dtype].itemsize
        first = self.data_start + begin + start * itemsize - RELEASE_BEHIND
        last = self.data_start + (end if stop is None else begin + stop * itemsize)
        page = mmap.PAGESIZE
        first, last = max(0, first // page * page), min(-(-last // page) * page, len(self._map))
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * NUMPY_DTYPES[dtype].itemsize


def _header(entries: list[tuple[str, tuple[int, ...], str]]) -> tuple[bytes, int]:
    """The padded header bytes of a shard holding `entries` in order, and its data size."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = _nbytes(shape, dtype)
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def _as_bytes(data) -> memoryview | bytes:
    """The bytes of a numpy array or torch tensor in C order (no copy when contiguous)."""
    if isinstance(data, np.ndarray):
        flat = np.ascontiguousarray(data).reshape(-1)
        return memoryview(flat.view(np.uint8)) if flat.size else b""
    import torch  # a torch tensor was given: torch is imported already

    flat = data.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b""


class SafetensorsStreamWriter:
    """Writes tensors, in a planned order, into numbered shards as soon as each is given.

    `plan` lists (name, shape, dtype) in write order, dtypes as `dtype_name` accepts them;
    shards are cut greedily at `shard_bytes`. `write(name, data)` must follow the plan; data is a
    numpy array (BF16 as uint16 bit patterns) or a torch tensor. `finish()` waits for the last
    write, names the shards as Hugging Face does (a single `model.safetensors`, or
    `model-0000i-of-0000n` plus `model.safetensors.index.json`, written last) and returns
    {file: {"size", "sha256"}}.
    """

    def __init__(
        self,
        folder: Path,
        plan: list[tuple[str, tuple[int, ...], object]],
        shard_bytes: int,
        depth: int = 2,
    ):
        self.folder, self.depth = folder, depth
        self.shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            try:
                entry = (name, tuple(shape), dtype_name(dtype))
            except ValueError as err:
                raise ModelError(f"tensor {name!r}: {err}") from None
            nbytes = _nbytes(entry[1], entry[2])
            if self.shards[-1] and size + nbytes > shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(entry)
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

    def write(self, name: str, data) -> None:
        """Queue `data` (the planned shape and dtype) for writing.

        It must not change until `depth` more tensors have been queued (or `finish`): a caller
        may cycle through depth + 1 output buffers.
        """
        shard, (expected, shape, dtype) = self.order[self.position]
        try:
            given = dtype_name(data.dtype)
        except ValueError:
            given = str(data.dtype)
        if name != expected or tuple(data.shape) != shape or given != dtype:
            raise ValueError(
                f"write {name} {tuple(data.shape)} {given} does not follow the plan "
                f"({expected} {shape} {dtype})"
            )
        first = self.position == 0 or self.order[self.position - 1][0] != shard
        self.position += 1
        last = self.position == len(self.order) or self.order[self.position][0] != shard
        self._wait(self.depth - 1)
        view = _as_bytes(data)
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
