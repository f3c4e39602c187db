"""Linear merge, the default: theta = base + sum_i w_i (theta_i - base) with sum_i w_i = 1.

With weights summing to 1 this is the weighted average sum_i w_i theta_i of Wortsman et al. 2022,
"Model soups: averaging weights of multiple fine-tuned models improves accuracy without
increasing inference time" (arXiv:2203.05482). Weights may be negative (the data-to-component
mapping produces them) but must sum to 1, so that merging identical components gives that
component and the proxy of a mixture is a point on the components' affine hull.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from demix.errors import MixtureError
from demix.merge.methods.base import MergeMethod, finite_weights


def check_sum_to_one(weights: Sequence[float], method: str = "linear") -> np.ndarray:
    """Finite weights that sum to 1 within 1e-6; MixtureError otherwise."""
    c = finite_weights(weights, method)
    if abs(c.sum() - 1.0) > 1e-6:
        raise MixtureError(
            f"{method} merge weights must sum to 1, got {c.sum():.8f} ({c.tolist()}); "
            f"use task_arithmetic for weights that do not"
        )
    return c


@dataclass(frozen=True)
class Linear(MergeMethod):
    """Weighted average of the components (a weighted sum of deltas with weights summing to 1)."""

    name: ClassVar[str] = "linear"
    citation: ClassVar[str] = "Wortsman et al. 2022, Model soups, arXiv:2203.05482"

    def check_weights(self, weights: Sequence[float]) -> np.ndarray:
        return check_sum_to_one(weights, self.name)
