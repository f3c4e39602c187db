"""In-memory proxies: deltas computed once, each proxy written in place into one model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from demix.errors import ModelError
from demix.merge.methods import MergeMethod, make_method
from demix.merge.methods.base import DEFAULT_CHUNK, combine_in_chunks
from demix.model import safetensors_files


class TensorIndex:
    """Lazy per-tensor access to a (possibly sharded) safetensors model folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.location: dict[str, Path] = {}
        for f in safetensors_files(self.folder):
            with safe_open(f, framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    self.location[name] = f

    def names(self) -> list[str]:
        return list(self.location)

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor. Raises ModelError when the model has no tensor of that name."""
        if name not in self.location:
            raise ModelError(f"{self.folder}: no tensor named {name}")
        with safe_open(self.location[name], framework="pt") as st:
            return st.get_tensor(name)


SUM_BLOCK = 1 << 18


class DeltaStack:
    """Holds the base and the prepared deltas of every parameter of `model`, stacked per tensor.

    `write(w)` makes every parameter of `model` the merge of the components with weights `w`, in
    place: for weighted-sum methods (linear, task arithmetic, DARE linear) one matrix-vector
    product into the parameter's own storage plus one add, nothing allocated per proxy; for the
    TIES family the sign election runs in chunks of `chunk` entries, so its scratch memory is
    bounded by K x chunk whatever the model size. Deltas are prepared once (TIES's trim and DARE's
    drop do not depend on the weights). `delta_dtype=torch.bfloat16` halves the deltas' memory
    (about 3 significant digits per delta entry; the base and the proxy stay in the model's dtype).
    Buffers (e.g. rotary frequencies) are not merged: they are equal by construction.
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
        base_index = TensorIndex(base)
        indexes = [TensorIndex(c) for c in components]
        self.params: list[tuple[str, torch.nn.Parameter]] = list(model.named_parameters())
        self.base: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        base_sq = 0.0
        delta_sq = np.zeros(len(components))
        for name, param in self.params:
            b = base_index.get(name).float()
            if b.shape != param.shape:
                raise ModelError(
                    f"{base}: tensor {name} has shape {tuple(b.shape)}, model has {tuple(param.shape)}"
                )
            stack = torch.empty(
                (len(components), param.numel()),
                dtype=delta_dtype or param.dtype,
                device=param.device,
            )
            for k, index in enumerate(indexes):
                t = index.get(name)
                if t.shape != param.shape:
                    raise ModelError(
                        f"{index.folder}: tensor {name} has shape {tuple(t.shape)}, base has {tuple(param.shape)}"
                    )
                delta = t.reshape(-1).float() - b.reshape(-1)
                delta_sq[k] += float(delta.double().pow(2).sum())
                stack[k].copy_(self.method.prepare(delta, k, name))
            base_sq += float(b.double().pow(2).sum())
            self.base[name] = b.reshape(-1).to(param.device, param.dtype)
            self.deltas[name] = stack
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
        if self.method.weighted_sum:
            self._write_sum(self.method.sum_coefficients(c))
        else:
            self._write_chunked(c)
        return self.model

    def _write_sum(self, coefficients: np.ndarray) -> None:
        vectors: dict[tuple, torch.Tensor] = {}
        for name, param in self.params:
            flat, deltas = param.view(-1), self.deltas[name]
            if deltas.dtype == flat.dtype:
                key = (deltas.dtype, deltas.device)
                if key not in vectors:
                    vectors[key] = torch.as_tensor(coefficients, dtype=key[0], device=key[1])
                base = self.base[name]
                # base + D^T c in one pass per block; blocks of SUM_BLOCK entries keep the
                # output block in cache while the K delta rows stream through
                for start in range(0, flat.numel(), SUM_BLOCK):
                    end = start + SUM_BLOCK
                    torch.addmv(
                        base[start:end], deltas[:, start:end].t(), vectors[key], out=flat[start:end]
                    )
            else:  # low-precision deltas: accumulate into the fp32 parameter, no temporary
                flat.copy_(self.base[name])
                for k, a in enumerate(coefficients):
                    flat.add_(deltas[k], alpha=float(a))

    def _write_chunked(self, weights: np.ndarray) -> None:
        for name, param in self.params:
            flat = param.view(-1)
            w = torch.as_tensor(weights, dtype=flat.dtype, device=flat.device)
            combine_in_chunks(self.method, self.deltas[name], w, flat, self.chunk)
            flat.add_(self.base[name])


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
    return np.sqrt(delta_sq / base_sq).tolist()
