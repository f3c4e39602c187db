"""Write one merged model to disk, streaming tensor by tensor from (sharded) safetensors.

Inputs are memory-mapped once per file and read without copies; each input tensor's pages are
dropped from the process once merged. Output shards are planned up front (names, shapes, dtypes
are known from the base), so each merged tensor is written and hashed on a background thread
while the next one is merged; the HF index (`model.safetensors.index.json`) is written after the
last shard, the manifest (with the hashes computed while writing) last.

The weighted-sum methods without a per-delta preparation (linear, task arithmetic) run on numpy
alone: `import torch` costs about a second, more than the merge of a 100M-parameter model. Each
output tensor is one fused pass over cache-sized chunks (every component's chunk is added while
the output chunk stays in cache), accumulated in fp32 whatever the input dtypes, and written in
the output dtype from the same chunk. They hold no tensor-sized memory per component: at most
three output tensors are in flight, in buffers that are reused. The methods that prepare deltas
(DARE) or elect signs (TIES) go through torch (`demix.merge.prepared`); the TIES family holds one
delta per component for the tensor being merged, as its sign election needs all of them at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from demix.checkpoint import MODEL_KIND, TensorIndex, check_compatible, copy_model_files
from demix.errors import MixtureError, ModelError
from demix.merge.methods import MergeMethod, make_method
from demix.progress import Progress, progress
from demix.safetensors_io import FLOAT_DTYPES, NUMPY_DTYPES, SafetensorsStreamWriter, dtype_name
from demix.storage import staged_dir, write_manifest

DEFAULT_SHARD_BYTES = 2 * 1024**3
# Entries per chunk of the fused weighted sum: the output chunk stays in cache while every
# component's chunk is added to it (one pass over memory instead of one per component).
SUM_CHUNK = 1 << 15
# Entries per block: after each block, the inputs' pages of it are released.
SUM_BLOCK = 1 << 19
# A base coefficient (1 - sum a) below this is float rounding of weights that sum to 1: its term
# would change no fp32 output value, so it is skipped rather than read.
NEGLIGIBLE = 1e-9

# (flat input view, coefficient, safetensors dtype name of the view)
Term = tuple[np.ndarray, float, str]
Release = Callable[[int, int, int], None]


def bf16_bits_to_float32(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """fp32 values of bf16 bit patterns (uint16), exactly (a bf16 is the top half of an fp32)."""
    np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def float32_to_bf16_bits(
    values: np.ndarray, out: np.ndarray, scratch: np.ndarray, nan: np.ndarray
) -> np.ndarray:
    """bf16 bit patterns (uint16) of fp32 `values`, rounded to nearest even as torch rounds
    (infinities and overflow to inf kept, NaN as the quiet NaN 0x7FC0). `scratch` (uint32) and
    `nan` (bool) are work arrays of the same length."""
    u = values.view(np.uint32)
    np.right_shift(u, 16, out=scratch)
    np.bitwise_and(scratch, 1, out=scratch)
    scratch += 0x7FFF
    scratch += u  # wraps only for NaNs, which are replaced below
    np.right_shift(scratch, 16, out=scratch)
    np.copyto(out, scratch, casting="unsafe")
    np.isnan(values, out=nan)
    if nan.any():
        out[nan] = 0x7FC0
    return out


class WeightedSum:
    """out = sum_k a_k x_k over flat inputs of any stored dtype, accumulated in fp32 chunk by
    chunk and written in the output's dtype; work arrays are allocated once per merge."""

    def __init__(self, chunk: int = SUM_CHUNK, block: int = SUM_BLOCK):
        self.chunk, self.block = chunk, block
        self.acc = np.empty(chunk, np.float32)
        self.tmp = np.empty(chunk, np.float32)
        self.bits = np.empty(chunk, np.uint32)
        self.nan = np.empty(chunk, np.bool_)

    def _add(self, acc: np.ndarray, x: np.ndarray, a: float, dtype: str, first: bool) -> None:
        """acc = a x (first) or acc += a x, in fp32."""
        m = len(acc)
        if dtype == "BF16":
            x = bf16_bits_to_float32(x, self.tmp[:m])
        if first:
            np.multiply(x, a, out=acc, dtype=np.float32)
        else:
            np.multiply(x, a, out=self.tmp[:m], dtype=np.float32)
            np.add(acc, self.tmp[:m], out=acc)

    def _store(self, acc: np.ndarray, out: np.ndarray, out_dtype: str) -> None:
        m = len(acc)
        if out_dtype == "BF16":
            float32_to_bf16_bits(acc, out, self.bits[:m], self.nan[:m])
        else:  # F16 and F64 rounded as IEEE casts round; integer tensors truncated, like torch
            np.copyto(out, acc, casting="unsafe")

    def __call__(
        self, terms: Sequence[Term], out: np.ndarray, out_dtype: str, release: Release
    ) -> np.ndarray:
        """Fill `out` (flat, numpy dtype of `out_dtype`); after each block of entries,
        release(k, start, stop) for every term k."""
        n = out.size
        direct = out_dtype == "F32"
        for block_start in range(0, n, self.block):
            block_stop = min(n, block_start + self.block)
            for start in range(block_start, block_stop, self.chunk):
                stop = min(block_stop, start + self.chunk)
                acc = out[start:stop] if direct else self.acc[: stop - start]
                for k, (x, a, dtype) in enumerate(terms):
                    self._add(acc, x[start:stop], a, dtype, first=k == 0)
                if not direct:
                    self._store(acc, out[start:stop], out_dtype)
            for k in range(len(terms)):
                release(k, block_start, block_stop)
        return out


def _stream_weighted_sum(
    coefficients: np.ndarray,
    base: TensorIndex,
    components: list[TensorIndex],
    plan: list[tuple[str, tuple[int, ...], str]],
    writer: SafetensorsStreamWriter,
) -> None:
    """(1 - sum a) base + sum a_k theta_k per tensor (for linear, sum a = 1: the weighted
    average itself, the base not read) into `writer`, numpy only."""
    rest = float(1.0 - coefficients.sum())
    sources: list[tuple[TensorIndex, float]] = list(
        zip(components, map(float, coefficients), strict=True)
    )
    if abs(rest) > NEGLIGIBLE or not sources:
        sources.append((base, rest))
    weighted_sum = WeightedSum()
    # The writer holds up to `depth` queued tensors: depth + 1 output buffers cycle safely.
    largest = max((math.prod(s) * NUMPY_DTYPES[d].itemsize for _, s, d in plan), default=0)
    buffers = [np.empty(largest, np.uint8) for _ in range(writer.depth + 1)]
    for name, shape, out_dtype in plan:
        terms = [(index.array(name).reshape(-1), a, index.dtype(name)) for index, a in sources]
        n = math.prod(shape)
        np_dtype = NUMPY_DTYPES[out_dtype]
        out = buffers[writer.position % len(buffers)][: n * np_dtype.itemsize].view(np_dtype)

        def release(k: int, start: int, stop: int, name: str = name) -> None:
            sources[k][0].release(name, start, stop)

        weighted_sum(terms, out, out_dtype, release)
        base.release(name)
        writer.write(name, out.reshape(shape))


def output_dtype(dtype) -> str | None:
    """The safetensors name of a requested output dtype (None: each tensor keeps the base's);
    ModelError for anything but a float dtype."""
    if dtype is None:
        return None
    try:
        name = dtype_name(dtype)
    except ValueError:
        name = None
    if name not in FLOAT_DTYPES:
        raise ModelError(
            f"merge output dtype {dtype}: expected one of float32, bfloat16, float16, float64"
        )
    return name


class _Counted:
    """A stream writer counting each tensor written in a progress (merging a large model)."""

    def __init__(self, writer: SafetensorsStreamWriter, bar: Progress):
        self.writer, self.bar = writer, bar

    def write(self, name: str, data) -> None:
        """Write the tensor `name`, then count it."""
        self.writer.write(name, data)
        self.bar.update()

    def __getattr__(self, attribute: str):
        return getattr(self.writer, attribute)  # depth, position: the writer's own


def merge_to_disk(
    base: str | Path,
    components: list[str | Path],
    weights,
    out: str | Path,
    method: MergeMethod | str = "linear",
    dtype=None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    **manifest_fields,
) -> dict:
    """Merge `components` onto `base` with component weights; save an HF folder atomically.

    `method` is a MergeMethod or a method name with default parameters. `dtype` is the output
    dtype ("float32", "bfloat16", "float16", a torch or numpy dtype; default: the base's, per
    tensor); computation is fp32 whatever the input dtypes. Raises ModelError for incompatible
    models and MixtureError for weights the method refuses, before writing anything.
    """
    base = Path(base)
    method = make_method(method)
    c = method.check_weights(weights)
    if len(c) != len(components):
        raise MixtureError(f"{len(c)} merge weights for {len(components)} components")
    requested = output_dtype(dtype)
    check_compatible(base, components)
    base_index = TensorIndex(base)
    indexes = [TensorIndex(c) for c in components]
    plan = [
        (name, base_index.shape(name), requested or base_index.dtype(name))
        for name in base_index.names()
    ]
    with staged_dir(out) as tmp:
        writer = SafetensorsStreamWriter(tmp, plan, shard_bytes)
        try:
            with progress(len(plan), f"merge {Path(out).name}", "tensor") as bar:
                counted = _Counted(writer, bar)
                if method.weighted_sum and not method.prepares:
                    coefficients = method.sum_coefficients(c)
                    _stream_weighted_sum(coefficients, base_index, indexes, plan, counted)
                else:
                    from demix.merge.prepared import stream_prepared

                    stream_prepared(method, c, base_index, indexes, plan, counted)
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
