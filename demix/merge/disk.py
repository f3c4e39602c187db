"""Write one merged model to disk, streaming tensor by tensor from (sharded) safetensors.

Memory holds the output shard being filled plus, per tensor, one component tensor at a time for
the weighted-sum methods (linear, task arithmetic, DARE linear) and one per component for the TIES
family, whose sign election needs all of them at once. Output shards are flushed at `shard_bytes`;
the HF index (`model.safetensors.index.json`) is written after the last shard, the manifest last.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from demix.errors import MixtureError
from demix.merge.delta_stack import TensorIndex
from demix.merge.methods import MergeMethod, make_method
from demix.merge.methods.base import combine_in_chunks
from demix.model import MODEL_KIND, check_compatible, copy_model_files
from demix.storage import staged_dir, write_manifest

DEFAULT_SHARD_BYTES = 2 * 1024**3


class ShardWriter:
    """Collects tensors and writes them as numbered safetensors shards of bounded size."""

    def __init__(self, folder: Path, shard_bytes: int):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str], int]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f".shard-{len(self.written):05d}.safetensors"
        save_file(self.pending, path, metadata={"format": "pt"})
        self.written.append((path, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Name the shards as Hugging Face does and write the index last; return file names."""
        self.flush()
        if len(self.written) == 1:
            os.replace(self.written[0][0], self.folder / "model.safetensors")
            return ["model.safetensors"]
        total = len(self.written)
        weight_map, names = {}, []
        for i, (path, tensors, _) in enumerate(self.written, start=1):
            name = f"model-{i:05d}-of-{total:05d}.safetensors"
            os.replace(path, self.folder / name)
            names.append(name)
            weight_map.update(dict.fromkeys(tensors, name))
        index = {
            "metadata": {"total_size": sum(size for *_, size in self.written)},
            "weight_map": weight_map,
        }
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


def merge_tensor(
    method: MergeMethod,
    name: str,
    base: torch.Tensor,
    components: Iterable[torch.Tensor],
    weights: np.ndarray,
) -> torch.Tensor:
    """The merge of one tensor, in float32. `components` is consumed one tensor at a time.

    Nothing tensor-sized is allocated per component: a weighted sum without preparation is
    accumulated as (1 - sum a) base + sum a_i theta_i straight from each loaded tensor (for
    linear, sum a = 1 and this is the weighted average itself); prepared deltas go through one
    scratch buffer (weighted sums) or their row of the K x n stack (the TIES family).
    """
    b = base.float()
    if method.weighted_sum:
        coefficients = method.sum_coefficients(weights)
        if method.prepares:  # base + sum a_i prepare(theta_i - base)
            merged, scratch = b.clone(), torch.empty_like(b)
        else:  # (1 - sum a) base + sum a_i theta_i
            merged, scratch = b * float(1.0 - coefficients.sum()), None
        for k, (t, a) in enumerate(zip(components, coefficients, strict=True)):
            if scratch is None:
                merged.add_(t, alpha=float(a))
            else:
                torch.sub(t, b, out=scratch)
                merged.add_(method.prepare(scratch, k, name), alpha=float(a))
        return merged
    flat = b.reshape(-1)
    deltas = torch.empty((len(weights), flat.numel()), dtype=torch.float32)
    for k, t in enumerate(components):
        torch.sub(t.reshape(-1), flat, out=deltas[k])
        method.prepare(deltas[k], k, name)
    merged = torch.empty(flat.numel(), dtype=torch.float32)
    combine_in_chunks(method, deltas, torch.as_tensor(weights, dtype=torch.float32), merged)
    return merged.add_(flat).view(b.shape)


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
    with staged_dir(out) as tmp:
        writer = ShardWriter(tmp, shard_bytes)
        for name in base_index.names():
            b = base_index.get(name)
            # a generator: methods that can stream components hold one of them at a time
            merged = merge_tensor(method, name, b, (ix.get(name) for ix in indexes), c)
            writer.add(name, merged.to(dtype or b.dtype).contiguous())
        files = writer.finish()
        copy_model_files(base, tmp)
        manifest = write_manifest(
            tmp,
            MODEL_KIND,
            role="merged",
            method=method.describe(),
            component_weights=c.tolist(),
            components=[str(c) for c in components],
            base=str(base),
            weight_files=files,
            **manifest_fields,
        )
    return manifest
