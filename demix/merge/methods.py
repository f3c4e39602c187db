"""Merge methods behind a tiny registry.

linear (task arithmetic with the weights as scales; Ilharco et al. 2023, "Editing Models with
Task Arithmetic"): theta = base + sum_i c_i (theta_i - base). With sum c = 1 this equals
sum_i c_i theta_i, the weighted average of Wortsman et al. 2022 ("Model soups"). Weights may be
negative (the data-to-component mapping can produce them) but must sum to 1 so that a mixture
of identical components is that component.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from demix.errors import MixtureError


def check_linear_weights(weights: Sequence[float]) -> np.ndarray:
    """Finite weights that sum to 1 within 1e-6.

    Raises MixtureError otherwise.
    """
    c = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(c)):
        raise MixtureError(f"merge weights {c.tolist()} contain NaN or inf")
    if abs(c.sum() - 1.0) > 1e-6:
        raise MixtureError(f"linear merge weights must sum to 1, got {c.sum():.8f} ({c.tolist()})")
    return c


def linear_merge(
    base: torch.Tensor, components: Iterable[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """base + sum_i w_i (component_i - base), computed in float32.

    `components` is consumed one tensor at a time, so a generator keeps memory independent of
    the number of components.
    """
    c = check_linear_weights(weights)
    b = base.float()
    acc = b.clone()
    for w, t in zip(c, components, strict=True):
        acc.add_(t.float() - b, alpha=float(w))
    return acc


METHODS: dict[str, Callable] = {"linear": linear_merge}
