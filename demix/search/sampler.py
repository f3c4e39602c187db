"""Mixture sampler over the simplex, as in the authors' code.

w ~ Dirichlet(s * p^power) with p the token prior and s drawn from log-spaced scales; each
dataset capped at min(cap_factor * p, 1); weights under min_weight zeroed; rounded to a grid
(exactly, in integer grid units); duplicates removed.
"""

from __future__ import annotations

import math

import numpy as np

from demix.config import SamplerConfig
from demix.errors import MixtureError


def _cap(w: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Clip rows to `cap`, moving the excess to uncapped entries in proportion, until feasible."""
    w = w.copy()
    for _ in range(w.shape[1]):
        over = w > cap
        if not over.any():
            break
        excess = np.where(over, w - cap, 0.0).sum(axis=1, keepdims=True)
        w = np.minimum(w, cap)
        free = np.where(w < cap, w, 0.0)
        total = free.sum(axis=1, keepdims=True)
        share = np.divide(free, total, out=np.zeros_like(free), where=total > 0)
        w = w + excess * share
    return w


def to_grid(w: np.ndarray, grid: float) -> np.ndarray:
    """Round rows to integer grid units that sum exactly to 1/grid (largest remainder)."""
    units = round(1 / grid)
    scaled = w * units
    base = np.floor(scaled).astype(np.int64)
    missing = units - base.sum(axis=1)
    order = np.argsort(-(scaled - base), axis=1, kind="stable")
    rows = np.arange(len(w))[:, None]
    bump = np.arange(w.shape[1])[None, :] < missing[:, None]
    base[rows, order] += bump.astype(np.int64)
    return base


def sample_mixtures(
    prior: np.ndarray,
    n: int,
    rng: np.random.Generator,
    cfg: SamplerConfig,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """n distinct mixtures [n, D] on the grid, none of them in `exclude`.

    Raises MixtureError when n distinct mixtures cannot be found (space exhausted).
    """
    prior = np.asarray(prior, dtype=np.float64)
    units = round(1 / cfg.grid)
    alpha = np.power(np.maximum(prior, 1e-12), cfg.power)
    scales = np.logspace(math.log10(cfg.scale_min), math.log10(cfg.scale_max), cfg.num_scales)
    cap = np.minimum(cfg.cap_factor * prior, 1.0)
    if cap.sum() < 1:
        cap = np.ones_like(cap)  # caps that cannot hold a mixture are dropped
    seen = (
        {tuple(r) for r in to_grid(np.atleast_2d(exclude), cfg.grid)}
        if exclude is not None and len(exclude)
        else set()
    )
    out: list[np.ndarray] = []
    for _ in range(50):
        batch = max(64, 2 * (n - len(out)))
        s = rng.choice(scales, size=batch)
        w = rng.gamma(s[:, None] * alpha[None, :])
        w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
        w = np.where(w < cfg.min_weight, 0.0, w)
        w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
        w = _cap(w, cap)
        for row in to_grid(w, cfg.grid):
            key = tuple(row)
            if key in seen or row.sum() != units:
                continue
            seen.add(key)
            out.append(row)
            if len(out) == n:
                return np.stack(out) / units
    raise MixtureError(
        f"could only sample {len(out)} distinct mixtures of {n}; lower search.n or search.candidates"
    )


def uniform_mixture(d: int) -> np.ndarray:
    """The uniform mixture over d datasets."""
    return np.full(d, 1.0 / d)


def validate_mixture(weights: dict[str, float], names: list[str]) -> np.ndarray:
    """A {dataset: weight} mapping as a simplex point in `names` order; missing names are 0.

    Raises MixtureError for unknown names, NaN/inf, negative weights or a sum off 1 by > 1e-6.
    """
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise MixtureError(f"mixture names unknown dataset(s) {unknown}; known: {names}")
    w = np.array([float(weights.get(n, 0.0)) for n in names])
    if not np.all(np.isfinite(w)):
        bad = [n for n, x in zip(names, w, strict=True) if not math.isfinite(x)]
        raise MixtureError(f"mixture weight of {bad} is NaN or infinite")
    if (w < 0).any():
        bad = {n: x for n, x in zip(names, w, strict=True) if x < 0}
        raise MixtureError(f"mixture has negative weights {bad}; weights must be >= 0")
    if abs(w.sum() - 1) > 1e-6:
        raise MixtureError(f"mixture weights sum to {w.sum():.8f}, not 1 (within 1e-6)")
    return w
