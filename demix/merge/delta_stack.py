"""In-memory proxies: deltas computed once, each proxy written in place into one model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from demix.checkpoint import TensorIndex
from demix.errors import ModelError
from demix.merge.methods import MergeMethod, make_method
from demix.merge.methods.base import DEFAULT_CHUNK, combine_in_chunks


class DeltaStack:
    """Holds the base and the prepared deltas of all parameters of `model` as flat buffers.

    The model's parameters are re-pointed to views of one flat buffer, so `write(w)` makes the
    whole model the merge of the components with weights `w` in one call, in place: for
    weighted-sum methods (linear, task arithmetic, DARE linear) flat = base + D^T c over every
    parameter at once (in cache-sized chunks on the CPU, one matrix-vector product on CUDA),
    nothing allocated per proxy; for the TIES family the sign election runs in chunks of
    `chunk` entries, so its scratch memory is bounded by K x chunk whatever the model size.
    Deltas are prepared once (TIES's trim and DARE's drop do not depend on the weights).
    `delta_dtype=torch.bfloat16` halves the deltas' memory (about 3 significant digits per delta
    entry; the base and the proxy stay in the model's dtype). Buffers (e.g. rotary frequencies)
    are not merged: they are equal by construction.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        base: str | Path,
        components: list[str | Path],
        method: MergeMethod | str = "linear",
        delta_dtype: torch.dtype | None = None,
        chunk: int = DEFAULT_CHUNK,
    ):
        if not components:
            raise ModelError("DeltaStack needs at least one component model")
        self.model, self.method, self.chunk = model, make_method(method), chunk
        params = list(model.named_parameters())
        dtype, device = params[0][1].dtype, params[0][1].device
        mixed = [n for n, p in params if p.dtype != dtype or p.device != device]
        if mixed:
            raise ModelError(
                f"DeltaStack needs every parameter in one dtype on one device; {mixed[0]} is "
                f"not {dtype} on {device}"
            )
        base_index = TensorIndex(base)
        indexes = [TensorIndex(c) for c in components]
        total = sum(p.numel() for _, p in params)
        self.flat = torch.empty(total, dtype=dtype, device=device)
        self.base = torch.empty(total, dtype=dtype, device=device)
        self.deltas = torch.empty(
            (len(components), total), dtype=delta_dtype or dtype, device=device
        )
        base_sq, delta_sq = 0.0, np.zeros(len(components))
        offset = 0
        for name, param in params:
            part = slice(offset, offset + param.numel())
            offset = part.stop
            b = base_index.get(name).float()
            if b.shape != param.shape:
                raise ModelError(
                    f"{base}: tensor {name} has shape {tuple(b.shape)}, model has {tuple(param.shape)}"
                )
            for k, index in enumerate(indexes):
                t = index.get(name)
                if t.shape != param.shape:
                    raise ModelError(
                        f"{index.folder}: tensor {name} has shape {tuple(t.shape)}, base has {tuple(param.shape)}"
                    )
                delta = t.reshape(-1).float() - b.reshape(-1)
                delta_sq[k] += float(delta.double().pow(2).sum())
                self.deltas[k, part].copy_(self.method.prepare(delta, k, name))
            base_sq += float(b.double().pow(2).sum())
            self.base[part].copy_(b.reshape(-1))
            self.flat[part].copy_(param.detach().reshape(-1))
            param.data = self.flat[part].view_as(param)
            for index in (base_index, *indexes):  # copied: drop the mapped pages again
                index.release(name)
        self.relative_norms = np.sqrt(delta_sq / base_sq)

    @property
    def num_components(self) -> int:
        return len(self.relative_norms)

    @torch.no_grad()
    def write(self, weights) -> torch.nn.Module:
        """Make `model` the merge with component weights `weights`; returns the model.

        Raises MixtureError for weights the method refuses, ModelError for a wrong count.
        """
        c = self.method.check_weights(weights)
        if len(c) != self.num_components:
            raise ModelError(f"expected {self.num_components} component weights, got {len(c)}")
        flat, deltas = self.flat, self.deltas
        if self.method.weighted_sum:
            coefficients = self.method.sum_coefficients(c)
            if flat.is_cuda and deltas.dtype == flat.dtype:
                vector = torch.as_tensor(coefficients, dtype=flat.dtype, device=flat.device)
                torch.addmv(self.base, deltas.t(), vector, out=flat)
            else:
                self._axpy_in_chunks([float(a) for a in coefficients])
        else:
            w = torch.as_tensor(c, dtype=flat.dtype, device=flat.device)
            combine_in_chunks(self.method, deltas, w, flat, self.chunk)
            flat.add_(self.base)
        return self.model

    def _axpy_in_chunks(self, coefficients: list[float]) -> None:
        """flat = base + sum_k a_k deltas[k], `chunk` entries at a time on the CPU: the output
        chunk stays in cache while every delta's chunk is added (memory traffic of one read of
        each input and one write: about the copy floor, where one addmv over the whole model
        took 1.5x it), in one pass on CUDA. Low-precision deltas are read as they are."""
        flat, base, deltas = self.flat, self.base, self.deltas
        step = flat.numel() if flat.is_cuda else self.chunk
        for start in range(0, flat.numel(), step):
            part = slice(start, min(flat.numel(), start + step))
            out = flat[part]
            torch.add(base[part], deltas[0, part], alpha=coefficients[0], out=out)
            for k in range(1, len(coefficients)):
                out.add_(deltas[k, part], alpha=coefficients[k])


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
