"""What every merge method is: a per-delta preparation and a combination of the prepared deltas.

A merge writes theta = base + combine(prepare(theta_1 - base), ..., prepare(theta_K - base); w).
`prepare` never depends on the weights (TIES's trim, DARE's drop), so the search prepares each
delta once and builds every proxy from the prepared deltas; the disk merge prepares each tensor
as it streams. Methods whose combination is a weighted sum (`weighted_sum = True`) can stream
components one at a time and build proxies with one matrix-vector product per tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from demix.errors import MixtureError

if TYPE_CHECKING:
    import torch


def finite_weights(weights: Sequence[float], method: str) -> np.ndarray:
    """Weights as float64; MixtureError when empty or any weight is NaN or infinite."""
    c = np.asarray(weights, dtype=np.float64).reshape(-1)
    if c.size == 0:
        raise MixtureError(f"{method} merge needs at least one component weight")
    if not np.all(np.isfinite(c)):
        raise MixtureError(f"{method} merge weights {c.tolist()} contain NaN or inf")
    return c


def tensor_generator(seed: int, component: int, tensor: str) -> torch.Generator:
    """A CPU generator for one (component, tensor) pair, independent of the order tensors are
    visited in, of the device and of the engine (disk merge or in-memory proxies)."""
    import torch

    digest = hashlib.sha256(f"{seed}\0{component}\0{tensor}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass(frozen=True)
class MergeMethod:
    """Base class: the merged delta is the weighted sum of the deltas, times `scale` (lambda)
    for the methods that have one. Subclasses are frozen dataclasses whose fields are the
    method's parameters."""

    name: ClassVar[str]
    citation: ClassVar[str]
    weighted_sum: ClassVar[bool] = True
    prepares: ClassVar[bool] = False  # whether `prepare` changes deltas

    def check_weights(self, weights: Sequence[float]) -> np.ndarray:
        """The component weights as float64, or MixtureError when the method cannot use them."""
        return finite_weights(weights, self.name)

    def prepare(self, delta: torch.Tensor, component: int, tensor: str) -> torch.Tensor:
        """The delta as the combination sees it, modified in place and returned (1-D or any
        shape; the result must not depend on the shape)."""
        return delta

    def sum_coefficients(self, weights: np.ndarray) -> np.ndarray:
        """Coefficients of the prepared deltas when the combination is a weighted sum."""
        return getattr(self, "scale", 1.0) * weights

    def combine(self, deltas: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
        """Write the merged delta of `deltas` (K x n, prepared) into `out` (n).

        `weights` are already checked. The default is the weighted sum; other methods override.
        """
        import torch

        coefficients = torch.as_tensor(
            self.sum_coefficients(weights.double().cpu().numpy()),
            dtype=deltas.dtype,
            device=deltas.device,
        )
        torch.mv(deltas.t(), coefficients, out=out)

    def describe(self) -> dict:
        """The method and its parameters, for manifests and reports."""
        return {"name": self.name, **asdict(self)}


DEFAULT_CHUNK = 1 << 20


def combine_in_chunks(
    method: MergeMethod,
    deltas: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
) -> None:
    """`method.combine` over `chunk` entries at a time (in `out`'s dtype), so that a method's
    temporaries stay within K x chunk entries whatever the tensor size."""
    for start in range(0, out.numel(), chunk):
        end = min(start + chunk, out.numel())
        method.combine(deltas[:, start:end].to(out.dtype), weights, out[start:end])
