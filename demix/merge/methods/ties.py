"""TIES merging: trim, elect sign, disjoint merge.

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023,
arXiv:2306.01708):
1. trim: keep the `density` fraction of each delta's entries with the largest magnitude (at
   least one per tensor), zero the rest;
2. elect: per parameter, the sign of sum_i w_i delta_i (ties go to +);
3. disjoint merge: average the weighted deltas that agree with the elected sign, dividing by the
   sum of the agreeing entries' weights (with equal weights, the paper's disjoint mean);
then theta = base + lambda * merged. Weights must be non-negative (the disjoint mean is a weighted
mean) and not all zero. These are the semantics of mergekit's `ties` method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from demix.errors import MixtureError
from demix.merge.methods.base import MergeMethod, finite_weights

if TYPE_CHECKING:
    import torch


def check_nonnegative(weights: Sequence[float], method: str) -> np.ndarray:
    """Finite, non-negative weights that are not all zero; MixtureError otherwise."""
    c = finite_weights(weights, method)
    if (c < 0).any() or not (c > 0).any():
        raise MixtureError(
            f"{method} merge needs non-negative component weights, not all zero, got {c.tolist()}; "
            f"negative weights come from the data-to-component mapping for a mixture outside the "
            f"components' hull (use merge.weights: hull or component, or the linear or "
            f"task_arithmetic method)"
        )
    return c


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the max(1, int(density * n)) largest-magnitude entries of `delta`, in place."""
    import torch

    n = delta.numel()
    if density >= 1.0 or n == 0:
        return delta
    k = max(1, int(density * n))
    flat = delta.view(-1)
    keep = torch.topk(flat.abs(), k, sorted=False).indices
    kept = flat[keep].clone()
    flat.zero_()
    flat[keep] = kept
    return delta


def elect_and_merge(
    deltas: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, normalize: bool
) -> None:
    """Sign election and disjoint merge of `deltas` (K x n) into `out` (n).

    The weighted deltas agreeing with the sign of their sum are summed; with `normalize`, divided
    by the sum of their weights (entries where none agree stay 0).
    """
    import torch

    w = weights.to(deltas.dtype).view(-1, 1)
    weighted = deltas * w
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = (torch.sign(weighted) == elected).to(deltas.dtype)
    torch.sum(weighted.mul_(agree), dim=0, out=out)
    if normalize:
        divisor = (agree.mul_(w)).sum(dim=0)
        divisor[divisor == 0] = 1.0
        out.div_(divisor)


@dataclass(frozen=True)
class Ties(MergeMethod):
    """Trim to `density`, elect signs, weighted disjoint mean, scale by lambda."""

    name: ClassVar[str] = "ties"
    citation: ClassVar[str] = "Yadav et al. 2023, TIES-Merging, arXiv:2306.01708"
    weighted_sum: ClassVar[bool] = False
    prepares: ClassVar[bool] = True
    scale: float = 1.0
    density: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise MixtureError(f"ties density must be in (0, 1], got {self.density}")

    def check_weights(self, weights: Sequence[float]) -> np.ndarray:
        return check_nonnegative(weights, self.name)

    def prepare(self, delta: torch.Tensor, component: int, tensor: str) -> torch.Tensor:
        return trim_to_density(delta, self.density)

    def combine(self, deltas: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
        elect_and_merge(deltas, weights, out, normalize=True)
        if self.scale != 1.0:
            out.mul_(self.scale)
