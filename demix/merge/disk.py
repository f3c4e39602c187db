"""Write one merged model to disk, streaming tensor by tensor from (sharded) safetensors.

Inputs are memory-mapped once per file and read without copies; each input tensor's pages are
dropped from the process once merged. Output shards are planned up front (names, shapes, dtypes
are known from the base), so each merged tensor is written and hashed on a background thread
while the next one is merged; the HF index (`model.safetensors.index.json`) is written after the
last shard, the manifest (with the hashes computed while writing) last.

Memory: the weighted-sum methods (linear, task arithmetic, DARE linear) hold one output tensor
per tensor in flight (at most three) and read the components in cache-sized chunks; the TIES
family holds one delta per component for the tensor being merged, as its sign election needs
all of them at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from demix.errors import MixtureError
from demix.merge.delta_stack import TensorIndex
from demix.merge.methods import MergeMethod, make_method
from demix.merge.methods.base import combine_in_chunks
from demix.merge.safetensors_io import SafetensorsStreamWriter
from demix.model import MODEL_KIND, check_compatible, copy_model_files
from demix.storage import staged_dir, write_manifest

DEFAULT_SHARD_BYTES = 2 * 1024**3
# Entries per chunk of the fused weighted sum: the output chunk stays in cache while every
# component's chunk is added to it (one pass over memory instead of one per component).
SUM_CHUNK = 1 << 15
# Entries per block: after each block, the inputs' pages of it are released (see merge_tensor).
SUM_BLOCK = 1 << 21
# A base coefficient (1 - sum a) below this is float rounding of weights that sum to 1: its term
# would change no fp32 output value, so it is skipped rather than read.
NEGLIGIBLE = 1e-9


Release = Callable[[int | None, int, int], None]


def _weighted_sum(
    terms: Sequence[tuple[torch.Tensor, float]],
    out: torch.Tensor,
    release: Release | None = None,
    chunk: int = SUM_CHUNK,
    block: int = SUM_BLOCK,
) -> torch.Tensor:
    """out = sum a * t over (t, a) in `terms` (flat fp32 views), chunk by chunk; after each
    block, release(k, start, stop) for every term k."""
    n = out.numel()
    for block_start in range(0, n, block):
        block_stop = min(n, block_start + block)
        for start in range(block_start, block_stop, chunk):
            stop = min(block_stop, start + chunk)
            part = out[start:stop]
            first, a = terms[0]
            if first.dtype == torch.float32:
                torch.mul(first[start:stop], a, out=part)
            else:  # upcast first: a multiply with out= would round in the input's dtype
                part.copy_(first[start:stop]).mul_(a)
            for t, a in terms[1:]:
                part.add_(t[start:stop], alpha=a)
        if release is not None:
            for k in range(len(terms)):
                release(k, block_start, block_stop)
    return out


def merge_tensor(
    method: MergeMethod,
    name: str,
    base: torch.Tensor,
    components: Sequence[torch.Tensor],
    weights: np.ndarray,
    release: Release | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The merge of one tensor, in float32 (inputs are read, never changed).

    Nothing tensor-sized is allocated per component for a weighted sum without preparation: it
    is (1 - sum a) base + sum a_i theta_i computed in one chunked pass (for linear, sum a = 1
    and this is the weighted average itself). Prepared deltas go through one scratch buffer
    (weighted sums) or their row of the K x n stack (the TIES family).
    `release(k, start, stop)` is told when elements [start, stop) of component k (None: the
    base) are no longer needed, so memory-mapped inputs can drop their pages as the merge goes.
    `out` (fp32, at least base.numel() entries) receives a weighted sum without preparation, so
    a caller can reuse output buffers instead of faulting in fresh memory per tensor.
    """
    shape = base.shape
    done = release or (lambda k, start, stop: None)
    if method.weighted_sum and not method.prepares:
        # Inputs in any float dtype are read as they are; the sum is accumulated in fp32.
        coefficients = method.sum_coefficients(weights)
        terms = [(t.reshape(-1), float(a)) for t, a in zip(components, coefficients, strict=True)]
        owners: list[int | None] = list(range(len(terms)))
        rest = float(1.0 - coefficients.sum())
        if abs(rest) > NEGLIGIBLE or not terms:
            terms.append((base.reshape(-1), rest))
            owners.append(None)
        target = (
            torch.empty(base.numel(), dtype=torch.float32) if out is None else out[: base.numel()]
        )
        merged = _weighted_sum(
            terms,
            target,
            lambda i, start, stop: done(owners[i], start, stop),
        )
        done(None, 0, base.numel())
        return merged.view(shape)
    b = base.float().reshape(-1)
    if method.weighted_sum:  # base + sum a_i prepare(theta_i - base)
        merged, scratch = b.clone(), torch.empty_like(b)
        coefficients = method.sum_coefficients(weights)
        for k, (t, a) in enumerate(zip(components, coefficients, strict=True)):
            torch.sub(t.reshape(-1), b, out=scratch)
            merged.add_(method.prepare(scratch, k, name), alpha=float(a))
            done(k, 0, b.numel())
        done(None, 0, b.numel())
        return merged.view(shape)
    deltas = torch.empty((len(weights), b.numel()), dtype=torch.float32)
    for k, t in enumerate(components):
        torch.sub(t.reshape(-1), b, out=deltas[k])
        method.prepare(deltas[k], k, name)
        done(k, 0, b.numel())
    done(None, 0, b.numel())
    merged = torch.empty(b.numel(), dtype=torch.float32)
    combine_in_chunks(method, deltas, torch.as_tensor(weights, dtype=torch.float32), merged)
    return merged.add_(b).view(shape)


def merge_to_disk(
    base: str | Path,
    components: list[str | Path],
    weights,
    out: str | Path,
    method: MergeMethod | str = "linear",
    dtype: torch.dtype | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    **manifest_fields,
) -> dict:
    """Merge `components` onto `base` with component weights; save an HF folder atomically.

    `method` is a MergeMethod or a method name with default parameters. `dtype` is the output
    dtype (default: the base's, per tensor); computation is fp32. Raises ModelError for
    incompatible models and MixtureError for weights the method refuses, before writing anything.
    """
    base = Path(base)
    method = make_method(method)
    c = method.check_weights(weights)
    if len(c) != len(components):
        raise MixtureError(f"{len(c)} merge weights for {len(components)} components")
    check_compatible(base, components)
    base_index = TensorIndex(base)
    indexes = [TensorIndex(c) for c in components]
    names = base_index.names()
    plan = []
    for name in names:
        b = base_index.get(name)
        plan.append((name, tuple(b.shape), dtype or b.dtype))
    largest = max((math.prod(shape) for _, shape, _ in plan), default=0)
    with staged_dir(out) as tmp:
        writer = SafetensorsStreamWriter(tmp, plan, shard_bytes)
        # The writer holds up to `depth` queued tensors: depth + 1 buffers cycle safely. Only
        # the plain weighted sum writes into them (the other paths allocate their own).
        reuse = method.weighted_sum and not method.prepares
        slots = writer.depth + 1 if reuse else 0
        buffers = [torch.empty(largest, dtype=torch.float32) for _ in range(slots)]
        try:
            for name, (_, _, out_dtype) in zip(names, plan, strict=True):
                b = base_index.get(name)

                def release(k: int | None, start: int, stop: int, name: str = name) -> None:
                    (base_index if k is None else indexes[k]).release(name, start, stop)

                buffer = buffers[writer.position % slots] if buffers else None
                components_of = [ix.get(name) for ix in indexes]
                merged = merge_tensor(method, name, b, components_of, c, release, buffer)
                writer.write(name, merged if merged.dtype == out_dtype else merged.to(out_dtype))
            hashes = writer.finish()
        except BaseException:
            writer.abort()
            raise
        copy_model_files(base, tmp)
        manifest = write_manifest(
            tmp,
            MODEL_KIND,
            role="merged",
            method=method.describe(),
            component_weights=c.tolist(),
            components=[str(c) for c in components],
            base=str(base),
            weight_files=sorted(hashes),
            known_files=hashes,
            **manifest_fields,
        )
    return manifest
