"""DARE: drop each delta entry with probability p and rescale the survivors by 1 / (1 - p).

Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch" (ICML 2024, arXiv:2311.03099). The rescale keeps every delta's expectation, so
E[DARE merge] = the merge without dropping. Two combinations, as in mergekit:
- dare_linear: task arithmetic of the dropped deltas, base + lambda * sum_i w_i delta'_i;
- dare_ties: TIES's sign election on the dropped deltas, summing the agreeing weighted deltas
  without dividing by their weights (the rescale already keeps the expected magnitude).

Masks are seeded per (merge.seed, component, tensor name) from a CPU generator: the same
mixture gives the same proxy on CPU and CUDA, from the disk merge and in memory, whatever the
order tensors are read in. mergekit draws its masks from torch's global generator in its own
tensor order and rescales to keep each tensor's L1 norm instead of by 1 / (1 - p), so the two
agree in distribution, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from demix.errors import MixtureError
from demix.merge.methods.base import MergeMethod, tensor_generator
from demix.merge.methods.ties import check_nonnegative, elect_and_merge

if TYPE_CHECKING:
    import torch


def drop_and_rescale(
    delta: torch.Tensor, drop_rate: float, generator: torch.Generator
) -> torch.Tensor:
    """Zero each entry with probability `drop_rate`, scale the rest by 1 / (1 - drop_rate); in place.

    The mask is drawn on the CPU (reproducible across devices) and moved to the delta's device.
    """
    import torch

    if drop_rate == 0.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) >= drop_rate
    return delta.mul_(keep.to(delta.device)).div_(1.0 - drop_rate)


@dataclass(frozen=True)
class DareLinear(MergeMethod):
    """Drop-and-rescale each delta, then task arithmetic."""

    name: ClassVar[str] = "dare_linear"
    citation: ClassVar[str] = (
        "Yu et al. 2024, Language Models are Super Mario (DARE), arXiv:2311.03099"
    )
    prepares: ClassVar[bool] = True
    scale: float = 1.0
    drop_rate: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_rate < 1.0:
            raise MixtureError(f"{self.name} drop_rate must be in [0, 1), got {self.drop_rate}")

    def prepare(self, delta: torch.Tensor, component: int, tensor: str) -> torch.Tensor:
        return drop_and_rescale(
            delta, self.drop_rate, tensor_generator(self.seed, component, tensor)
        )


@dataclass(frozen=True)
class DareTies(DareLinear):
    """Drop-and-rescale each delta, then TIES's sign election and disjoint sum."""

    name: ClassVar[str] = "dare_ties"
    weighted_sum: ClassVar[bool] = False

    def check_weights(self, weights: Sequence[float]) -> np.ndarray:
        return check_nonnegative(weights, self.name)

    def combine(self, deltas: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
        elect_and_merge(deltas, weights, out, normalize=False)
        if self.scale != 1.0:
            out.mul_(self.scale)
