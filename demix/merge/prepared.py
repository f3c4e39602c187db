"""The disk merge of methods that prepare each delta (DARE's drop) or elect signs across them
(TIES), tensor by tensor, in torch (their preparations are torch code shared with the in-memory
proxies, so both engines draw the same masks)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from demix.checkpoint import TensorIndex
from demix.merge.methods import MergeMethod
from demix.merge.methods.base import combine_in_chunks
from demix.safetensors_io import SafetensorsStreamWriter, torch_dtype


def merge_tensor(
    method: MergeMethod,
    name: str,
    base: torch.Tensor,
    components: Sequence[torch.Tensor],
    weights: np.ndarray,
    done: Callable[[int | None], None] = lambda k: None,
) -> torch.Tensor:
    """The merge of one tensor in float32 (inputs are read, never changed); `done(k)` is told
    when component k (None: the base) is no longer needed.

    Weighted sums go through one scratch buffer (base + sum a_i prepare(theta_i - base)); the
    TIES family fills its row of a K x n stack per component and combines in chunks.
    """
    shape = base.shape
    b = base.float().reshape(-1)
    if method.weighted_sum:
        merged, scratch = b.clone(), torch.empty_like(b)
        coefficients = method.sum_coefficients(weights)
        for k, (t, a) in enumerate(zip(components, coefficients, strict=True)):
            torch.sub(t.reshape(-1), b, out=scratch)
            merged.add_(method.prepare(scratch, k, name), alpha=float(a))
            done(k)
        done(None)
        return merged.view(shape)
    deltas = torch.empty((len(weights), b.numel()), dtype=torch.float32)
    for k, t in enumerate(components):
        torch.sub(t.reshape(-1), b, out=deltas[k])
        method.prepare(deltas[k], k, name)
        done(k)
    done(None)
    merged = torch.empty(b.numel(), dtype=torch.float32)
    combine_in_chunks(method, deltas, torch.as_tensor(weights, dtype=torch.float32), merged)
    return merged.add_(b).view(shape)


def stream_prepared(
    method: MergeMethod,
    weights: np.ndarray,
    base: TensorIndex,
    components: list[TensorIndex],
    plan: list[tuple[str, tuple[int, ...], str]],
    writer: SafetensorsStreamWriter,
) -> None:
    """Every planned tensor merged with `method` into `writer`, inputs released as they go."""
    for name, _, out_dtype in plan:

        def done(k: int | None, name: str = name) -> None:
            (base if k is None else components[k]).release(name)

        merged = merge_tensor(
            method, name, base.get(name), [ix.get(name) for ix in components], weights, done
        )
        writer.write(name, merged.to(torch_dtype(out_dtype)))
