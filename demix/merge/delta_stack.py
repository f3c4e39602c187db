"""In-memory proxies: deltas computed once, each proxy written in place into one model."""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from demix.checkpoint import MODEL_KIND, RELATIVE_DELTA_NORM, TensorIndex
from demix.errors import ModelError
from demix.merge.methods import MergeMethod, make_method
from demix.merge.methods.base import DEFAULT_CHUNK


def chunk_slices(total: int, chunk: int) -> list[slice]:
    """[0, total) cut into consecutive slices of `chunk` entries (the last one shorter)."""
    return [slice(start, min(total, start + chunk)) for start in range(0, total, chunk)]


class ChunkMerge:
    """out = base + the merged delta, for one chunk of the flat buffers (any device).

    Weighted-sum methods add each delta row with its coefficient into `out` while it is in
    cache; the TIES family runs the method's combination (the sign election) on the chunk.
    """

    def __init__(self, method: MergeMethod, weights: np.ndarray, out: torch.Tensor):
        self.method = method
        if method.weighted_sum:
            self.coefficients = [float(a) for a in method.sum_coefficients(weights)]
        else:
            self.weights = torch.as_tensor(weights, dtype=out.dtype, device=out.device)

    def __call__(self, base: torch.Tensor, deltas: torch.Tensor, out: torch.Tensor) -> None:
        if self.method.weighted_sum:
            a = self.coefficients
            torch.add(base, deltas[0], alpha=a[0], out=out)
            for k in range(1, len(a)):
                out.add_(deltas[k], alpha=a[k])
        else:
            self.method.combine(deltas.to(out.dtype), self.weights, out)
            out.add_(base)


class DeviceDeltas:
    """The base and the deltas on the proxy's device: each proxy is merged from them in place.

    On the CPU a weighted sum runs in `chunk`-entry chunks (each output chunk stays in cache
    while every delta's chunk is added: about the copy floor, where one addmv over the whole
    model took 1.5x it); on CUDA in one pass (one addmv when the deltas have the proxy's dtype).
    The TIES family runs in chunks everywhere, so its scratch stays within K x chunk entries.
    """

    where = "device"

    def __init__(self, total: int, k: int, dtype, delta_dtype, device, chunk: int):
        self.base = torch.empty(total, dtype=dtype, device=device)
        self.deltas = torch.empty((k, total), dtype=delta_dtype, device=device)
        self.chunk = chunk

    def write(self, merge: ChunkMerge, flat: torch.Tensor) -> None:
        whole = flat.is_cuda and merge.method.weighted_sum
        if whole and self.deltas.dtype == flat.dtype:
            vector = torch.tensor(merge.coefficients, dtype=flat.dtype, device=flat.device)
            torch.addmv(self.base, self.deltas.t(), vector, out=flat)
            return
        for part in chunk_slices(flat.numel(), flat.numel() if whole else self.chunk):
            merge(self.base[part], self.deltas[:, part], flat[part])


class HostDeltas:
    """The base and the deltas in host memory, page-locked when the proxy is on CUDA; each proxy
    is streamed to the device `chunk` entries at a time.

    Two staging slots on the device: while one chunk is merged from one slot, the next chunk's
    base and deltas are copied into the other (copies on a side CUDA stream, merges on the
    current stream, ordered by events). On a CPU the same code runs in order: the staging slots
    are separate CPU buffers and the events do nothing.
    """

    where = "host"

    def __init__(self, total: int, k: int, dtype, delta_dtype, device, chunk: int):
        self.base = torch.empty(total, dtype=dtype)
        self.deltas = torch.empty((k, total), dtype=delta_dtype)
        if torch.device(device).type == "cuda":
            page_lock(self, self.base, self.deltas)
        self.chunk = min(chunk, total)
        self.staging = [
            (
                torch.empty(self.chunk, dtype=dtype, device=device),
                torch.empty((k, self.chunk), dtype=delta_dtype, device=device),
            )
            for _ in range(2)
        ]

    def write(self, merge: ChunkMerge, flat: torch.Tensor) -> None:
        lanes = Lanes(flat.device)
        for i, part in enumerate(chunk_slices(flat.numel(), self.chunk)):
            slot, n = i % 2, part.stop - part.start
            base, deltas = self.staging[slot][0][:n], self.staging[slot][1][:, :n]
            with lanes.copying(slot):
                base.copy_(self.base[part], non_blocking=True)
                for k in range(len(deltas)):  # row by row: each source row is contiguous
                    deltas[k].copy_(self.deltas[k, part], non_blocking=True)
            merge(base, deltas, flat[part])
            lanes.merged(slot)


class Lanes:
    """Copies on a side CUDA stream, merges on the current one, for two staging slots: a slot is
    copied into once the merge that last read it is done, and merged from once its copy is done.
    On a CPU device everything runs in order on this thread."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.compute = torch.cuda.current_stream(device)
            self.copy = torch.cuda.Stream(device)
            self.copy.wait_stream(self.compute)  # the previous proxy's merges read the slots
            self.copied = [torch.cuda.Event(), torch.cuda.Event()]
            self.read = [torch.cuda.Event(), torch.cuda.Event()]

    @contextmanager
    def copying(self, slot: int):
        if not self.cuda:
            yield
            return
        with torch.cuda.stream(self.copy):
            self.copy.wait_event(self.read[slot])  # no-op until the slot's first merge
            yield
            self.copied[slot].record(self.copy)
        self.compute.wait_event(self.copied[slot])

    def merged(self, slot: int) -> None:
        if self.cuda:
            self.read[slot].record(self.compute)


def page_lock(owner, *tensors: torch.Tensor) -> None:
    """Page-lock CPU tensors in place for asynchronous copies to CUDA, for as long as `owner`
    lives (cudaHostRegister: torch's pinned allocator would round each allocation up to a power
    of two, up to twice the bytes). Raises ModelError when the memory cannot be locked."""
    cudart = torch.cuda.cudart()
    locked: list[torch.Tensor] = []

    def unlock(tensors: list[torch.Tensor]) -> None:
        torch.cuda.synchronize()  # no copy from them may still be in flight
        for t in tensors:
            cudart.cudaHostUnregister(t.data_ptr())

    weakref.finalize(owner, unlock, locked)
    for t in tensors:
        error = int(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0))
        if error:
            raise ModelError(
                f"could not page-lock {t.nbytes / 1e9:.1f} GB of host memory for the deltas "
                f"(cudaError {error}); free host memory, "
                "or set merge.delta_dtype: bfloat16 or fewer components"
            )
        locked.append(t)


STORAGES = {"device": DeviceDeltas, "host": HostDeltas}


class DeltaStack:
    """Holds the base and the prepared deltas of all parameters of `model` as flat buffers.

    The model's parameters are re-pointed to views of one flat buffer, so `write(w)` makes the
    whole model the merge of the components with weights `w` in one call, in place, nothing
    allocated per proxy but the TIES family's chunk scratch (K x `chunk` entries). Deltas are
    prepared once (TIES's trim and DARE's drop do not depend on the weights).
    `delta_device`: "device" keeps the base and the deltas on the model's device (DeviceDeltas),
    "host" in host memory, streamed to the device for each proxy (HostDeltas); demix.merge.plan
    decides which before anything is loaded. `delta_dtype=torch.bfloat16` halves the deltas'
    memory (about 3 significant digits per delta entry; the base and the proxy stay in the
    model's dtype). Buffers (e.g. rotary frequencies) are not merged: they are equal by
    construction.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        base: str | Path,
        components: list[str | Path],
        method: MergeMethod | str = "linear",
        delta_dtype: torch.dtype | None = None,
        chunk: int = DEFAULT_CHUNK,
        delta_device: str = "device",
    ):
        if not components:
            raise ModelError("DeltaStack needs at least one component model")
        if delta_device not in STORAGES:
            raise ModelError(
                f"delta_device must be one of {sorted(STORAGES)}, not {delta_device!r}"
            )
        self.model, self.method = model, make_method(method)
        params = list(model.named_parameters())
        dtype, device = params[0][1].dtype, params[0][1].device
        mixed = [n for n, p in params if p.dtype != dtype or p.device != device]
        if mixed:
            raise ModelError(
                f"DeltaStack needs every parameter in one dtype on one device; {mixed[0]} is "
                f"not {dtype} on {device}"
            )
        # The proxy first: the parameters become views of one flat buffer, which frees the
        # model's own storage before the base and the deltas are allocated.
        total = sum(p.numel() for _, p in params)
        self.flat = torch.empty(total, dtype=dtype, device=device)
        parts, offset = [], 0
        for name, param in params:
            part = slice(offset, offset + param.numel())
            offset = part.stop
            self.flat[part].copy_(param.detach().reshape(-1))
            param.data = self.flat[part].view_as(param)
            parts.append((name, param.shape, part))
        self.store = STORAGES[delta_device](
            total, len(components), dtype, delta_dtype or dtype, device, chunk
        )
        self.base, self.deltas = self.store.base, self.store.deltas
        base_index = TensorIndex(base)
        indexes = [TensorIndex(c) for c in components]
        base_sq, delta_sq = 0.0, np.zeros(len(components))
        for name, shape, part in parts:
            b = base_index.get(name).float()
            if b.shape != shape:
                raise ModelError(
                    f"{base}: tensor {name} has shape {tuple(b.shape)}, model has {tuple(shape)}"
                )
            for k, index in enumerate(indexes):
                t = index.get(name)
                if t.shape != shape:
                    raise ModelError(
                        f"{index.folder}: tensor {name} has shape {tuple(t.shape)}, base has {tuple(shape)}"
                    )
                delta = t.reshape(-1).float() - b.reshape(-1)
                delta_sq[k] += float(delta.double().pow(2).sum())
                self.deltas[k, part].copy_(self.method.prepare(delta, k, name))
            base_sq += float(b.double().pow(2).sum())
            self.base[part].copy_(b.reshape(-1))
            for index in (base_index, *indexes):  # copied: drop the mapped pages again
                index.release(name)
        self.relative_norms = np.sqrt(delta_sq / base_sq)

    @property
    def num_components(self) -> int:
        return len(self.relative_norms)

    @property
    def delta_device(self) -> str:
        """Where the base and the deltas live: "device" or "host"."""
        return self.store.where

    @torch.no_grad()
    def write(self, weights) -> torch.nn.Module:
        """Make `model` the merge with component weights `weights`; returns the model.

        Raises MixtureError for weights the method refuses, ModelError for a wrong count.
        """
        c = self.method.check_weights(weights)
        if len(c) != self.num_components:
            raise ModelError(f"expected {self.num_components} component weights, got {len(c)}")
        self.store.write(ChunkMerge(self.method, c, self.flat), self.flat)
        return self.model


def relative_delta_norms(base: str | Path, components: list[str | Path]) -> list[float]:
    """||theta_i - base|| / ||base|| per component, streamed tensor by tensor from disk."""
    base_index = TensorIndex(base)
    indexes = [TensorIndex(c) for c in components]
    base_sq, delta_sq = 0.0, np.zeros(len(components))
    for name in base_index.names():
        b = base_index.get(name).double()
        base_sq += float(b.pow(2).sum())
        for k, index in enumerate(indexes):
            delta_sq[k] += float((index.get(name).double() - b).pow(2).sum())
            index.release(name)
        base_index.release(name)
    return np.sqrt(delta_sq / base_sq).tolist()


def record_relative_delta_norm(model: str | Path, init: str | Path) -> float | None:
    """Write the model's relative_delta_norms against `init` (every weight) into its manifest
    as `relative_delta_norm`, so that a reader needs the manifest only, not the weights; return
    it. Kept when already there. Under `accelerate launch` only the main process (RANK 0)
    writes; the others return None.

    Raises ModelError or DataError for an unreadable model or manifest.
    """
    from demix.storage import MANIFEST, atomic_write_json, read_manifest

    if os.environ.get("RANK", "0") != "0":
        return None
    manifest = read_manifest(model, MODEL_KIND)
    if manifest.get(RELATIVE_DELTA_NORM) is None:
        fields = {k: v for k, v in manifest.items() if k != "files"}  # the file list last
        fields[RELATIVE_DELTA_NORM] = relative_delta_norms(init, [model])[0]
        manifest = {**fields, "files": manifest["files"]}
        atomic_write_json(Path(model) / MANIFEST, manifest)
    return manifest[RELATIVE_DELTA_NORM]
