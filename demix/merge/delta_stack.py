"""In-memory proxies: deltas computed once, each proxy written in place into one model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from demix.errors import ModelError
from demix.merge.methods import check_linear_weights
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


class DeltaStack:
    """Holds base and stacked deltas (theta_i - base) per parameter of `model`.

    `write(c)` sets every parameter of `model` to base + sum_i c_i delta_i in place: one matmul
    into the parameter's own storage plus one add; nothing is allocated per proxy and nothing
    touches disk. Buffers (e.g. rotary frequencies) are not merged: they are equal by construction.
    """

    def __init__(self, model: torch.nn.Module, base: str | Path, components: list[str | Path]):
        if not components:
            raise ModelError("DeltaStack needs at least one component model")
        self.model = model
        base_index = TensorIndex(base)
        indexes = [TensorIndex(c) for c in components]
        self.params: list[tuple[str, torch.nn.Parameter]] = list(model.named_parameters())
        self.base: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        base_sq = 0.0
        delta_sq = np.zeros(len(components))
        for name, param in self.params:
            b = base_index.get(name).to(param.dtype)
            if b.shape != param.shape:
                raise ModelError(
                    f"{base}: tensor {name} has shape {tuple(b.shape)}, model has {tuple(param.shape)}"
                )
            stack = torch.empty(
                (len(components), param.numel()), dtype=param.dtype, device=param.device
            )
            for k, index in enumerate(indexes):
                t = index.get(name)
                if t.shape != param.shape:
                    raise ModelError(
                        f"{index.folder}: tensor {name} has shape {tuple(t.shape)}, base has {tuple(param.shape)}"
                    )
                stack[k].copy_(t.reshape(-1).to(param.dtype) - b.reshape(-1))
                delta_sq[k] += float(stack[k].double().pow(2).sum())
            base_sq += float(b.double().pow(2).sum())
            self.base[name] = b.reshape(-1).to(param.device)
            self.deltas[name] = stack
        self.relative_norms = np.sqrt(delta_sq / base_sq)

    @property
    def num_components(self) -> int:
        return len(self.relative_norms)

    @torch.no_grad()
    def write(self, weights) -> torch.nn.Module:
        """Make `model` the linear merge with component weights `weights` (summing to 1)."""
        c = check_linear_weights(weights)
        if len(c) != self.num_components:
            raise ModelError(f"expected {self.num_components} component weights, got {len(c)}")
        for name, param in self.params:
            vec = torch.as_tensor(c, dtype=param.dtype, device=param.device)
            flat = param.view(-1)
            torch.mv(self.deltas[name].t(), vec, out=flat)
            flat.add_(self.base[name])
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
    return np.sqrt(delta_sq / base_sq).tolist()
