"""Mixture sampler over the simplex, as in the authors' code (iterative_sample/sample.py).

w ~ Dirichlet(s * q) with q = p^power / sum(p^power) the RENORMALISED tempered token prior p
and s drawn uniformly from `num_scales` log-spaced values in [scale_min, scale_max]; each
dataset capped at min(cap_factor * p, 1) (caps from the untempered prior) with the excess moved
to the uncapped datasets in proportion; weights under min_weight zeroed; rounded to the grid;
duplicates and excluded rows removed. Defaults are the authors' (0.7; 15 in [0.5, 5]; 4p;
2e-4; 2e-4).

Where this differs from their code, on purpose:
- caps hold exactly: their one pass in dataset order can lift an entry capped earlier back over
  its cap when a later one's excess is spread, and so can renormalising after zeroing; here the
  excess is spread until no entry is over (and again after zeroing). This one matters: with
  their 7-dataset prior 28% of their rows break a cap and a dataset capped at 0.108 has 2.45x
  the weight variance it has here (benchmarks/sampler_caps.py);
- rows lie exactly on the grid: integer grid units summing to 1/grid (largest remainder, never
  above a cap) where theirs are np.round then renormalised, slightly off the grid;
- a pool is the first n distinct rows in draw order, where they draw 512,000 rows, dedupe and
  keep n of the distinct ones at random. Rows that repeat (at and near the vertices) are 4-9%
  of the draws, and deduping more draws removes more of them, so their distribution depends on
  the draws per row kept (2.56 for their pool of 200,000, 1,000 for a first round of 512).
  Against their pool, a dataset's weight variance differs by up to 1% with their 7-dataset
  prior and up to 4% with the 4-dataset prior of tests/test_sampler.py (measured on 3 seeds).
A rounded row that still breaks a rule (possible only in corner cases) is drawn again rather
than repaired. With a `floor` (merge.weights: hull) the same draws are carried into the part of
the simplex above it, and a `cap` (search.max_epochs) bounds each weight of every row from
above, under the cap_factor caps (see sample_mixtures).
"""

from __future__ import annotations

import math

import numpy as np

from demix.config import SamplerConfig
from demix.errors import MixtureError
from demix.mixtures import validate_mixture as validate_mixture  # its home: demix.mixtures

# Sampling stops when the rows found stop growing: the space (or the part of it the Dirichlet
# reaches) is exhausted. Both bounds keep a hopeless request from spinning.
MAX_ATTEMPTS = 50
MAX_BARREN_ATTEMPTS = 3


def grid_units(grid: float) -> int:
    """Grid units in a whole mixture (1/grid), checking that the grid divides 1.

    Raises MixtureError when 1/grid is not an integer.
    """
    units = round(1 / grid)
    if abs(units * grid - 1) > 1e-9:
        raise MixtureError(
            f"search.sampler.grid={grid}: 1/grid={1 / grid:.6g} is not a whole number; "
            f"use a grid such as 2e-4 or 1e-3"
        )
    return units


def _cap(w: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Clip rows to `cap`, moving the excess to the entries under their cap until none is over.

    The excess goes in proportion to the receiving weights; a row whose uncapped entries are all
    zero takes it in proportion to their room left instead. Every pass caps one more entry, so
    D passes suffice. Needs cap.sum() >= 1.
    """
    w = w.copy()
    for _ in range(w.shape[1]):
        over = w > cap
        if not over.any():
            break
        excess = np.where(over, w - cap, 0.0).sum(axis=1, keepdims=True)
        w = np.minimum(w, cap)
        under = w < cap
        share = np.where(under, w, 0.0)
        total = share.sum(axis=1, keepdims=True)
        room = np.where(under, cap - w, 0.0)
        share = np.where(total > 0, share, room)
        total = share.sum(axis=1, keepdims=True)
        w = w + excess * np.divide(share, total, out=np.zeros_like(share), where=total > 0)
    return w


def to_grid(w: np.ndarray, grid: float, cap_units: np.ndarray | None = None) -> np.ndarray:
    """Round rows to integer grid units summing exactly to 1/grid (largest remainder).

    With `cap_units`, no entry is rounded up past its cap. Raises MixtureError for a bad grid.
    """
    return to_units(w, grid_units(grid), cap_units)


def to_units(w: np.ndarray, units: int, cap_units: np.ndarray | None = None) -> np.ndarray:
    """Round rows to integers summing exactly to `units` (largest remainder), as to_grid."""
    w = np.atleast_2d(np.asarray(w, dtype=np.float64))
    scaled = w * units
    base = np.floor(scaled).astype(np.int64)
    remainder = scaled - base
    if cap_units is not None:
        over = base > cap_units[None, :]
        base = np.where(over, cap_units[None, :], base)
        # an entry at its cap can take no unit; any other can, the largest remainder first
        remainder = np.where(base >= cap_units[None, :], -np.inf, remainder)
    missing = units - base.sum(axis=1)
    order = np.argsort(-remainder, axis=1, kind="stable")
    rows = np.arange(len(w))[:, None]
    bump = np.arange(w.shape[1])[None, :] < missing[:, None]
    bump &= np.isfinite(np.take_along_axis(remainder, order, axis=1))
    base[rows, order] += bump.astype(np.int64)
    return base


def tempered_prior(prior: np.ndarray, power: float) -> np.ndarray:
    """The Dirichlet base measure q = p^power / sum(p^power), renormalised as the authors do."""
    q = np.power(np.maximum(np.asarray(prior, dtype=np.float64), 1e-12), power)
    return q / q.sum()


def _check_prior(prior: np.ndarray) -> np.ndarray:
    prior = np.asarray(prior, dtype=np.float64)
    if prior.ndim != 1 or prior.size == 0:
        raise MixtureError(f"token prior has shape {prior.shape}; expected one weight per dataset")
    if not np.all(np.isfinite(prior)) or (prior < 0).any() or abs(prior.sum() - 1) > 1e-6:
        raise MixtureError(
            f"token prior {prior.tolist()} is not on the simplex; check the dataset manifest's "
            f"token_prior"
        )
    return prior


def floor_units(floor: np.ndarray | None, d: int, units: int) -> np.ndarray:
    """A floor in grid units, each entry rounded up (none: zeros).

    Raises MixtureError for a floor that is negative or leaves no grid unit free.
    """
    if floor is None:
        return np.zeros(d, dtype=np.int64)
    floor = np.asarray(floor, dtype=np.float64)
    if floor.shape != (d,) or not np.all(np.isfinite(floor)) or (floor < 0).any():
        raise MixtureError(f"mixture floor {floor.tolist()} is not {d} weights >= 0")
    low = np.ceil(floor * units - 1e-9).astype(np.int64)
    if low.sum() >= units:
        raise MixtureError(
            f"a mixture floor of {floor.sum():.6g} leaves no grid unit free on a grid of "
            f"{1 / units:g}; refine search.sampler.grid or lower train.general_ratio"
        )
    return low


def cap_headroom(cap: np.ndarray | None, low: np.ndarray, units: int) -> np.ndarray:
    """The most grid units of w (a row less its floor `low`) each entry may take so that the row
    stays at or under `cap` (None: every free unit).

    Raises MixtureError for a cap under the floor or caps that cannot hold a whole mixture.
    """
    free = units - int(low.sum())
    if cap is None:
        return np.full(len(low), free, dtype=np.int64)
    top = np.floor(np.clip(np.asarray(cap, dtype=np.float64), 0, 1) * units + 1e-9)
    top = top.astype(np.int64)
    if top.shape != low.shape:
        raise MixtureError(f"mixture cap {np.asarray(cap).tolist()} is not {len(low)} weights")
    if (top < low).any():
        raise MixtureError(
            f"mixture caps {(top / units).tolist()} lie under the floor {(low / units).tolist()} "
            f"on the grid of {1 / units:g}; raise search.max_epochs"
        )
    if top.sum() < units:
        raise MixtureError(
            f"mixture caps {(top / units).tolist()} sum to {top.sum() / units:g} on the grid of "
            f"{1 / units:g}, under 1; raise search.max_epochs"
        )
    return np.minimum(top - low, free)


def sample_mixtures(
    prior: np.ndarray,
    n: int,
    rng: np.random.Generator,
    cfg: SamplerConfig,
    exclude: np.ndarray | None = None,
    *,
    allow_fewer: bool = False,
    floor: np.ndarray | None = None,
    cap: np.ndarray | None = None,
) -> np.ndarray:
    """n distinct mixtures [n, D] on the grid, none of them in `exclude`, in the order drawn.

    With allow_fewer, a space that runs out returns the rows found (a candidate pool).
    With `floor` (weights summing under 1), every row is floor + (1 - sum(floor)) w with w
    drawn by the rules above (caps and minimum weight apply to w), rounded so that no entry
    falls under its floor: the sampler's own draws, carried into the part of the simplex above
    the floor (merge.weights: hull, where w are the component weights).
    With `cap` [D], no entry of a row exceeds its cap (rounded down to the grid): w is capped
    at the smaller of its cap_factor cap and what `cap` leaves above the floor. cap_factor caps
    that cannot hold a whole mixture are dropped; `cap`s are never dropped.
    Raises MixtureError for a prior off the simplex, a bad grid, floor or cap (under the floor,
    or summing under 1), or a space with fewer than n distinct mixtures (unless allow_fewer).
    """
    prior = _check_prior(prior)
    d = prior.size
    units = grid_units(cfg.grid)
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    low = floor_units(floor, d, units)
    free = units - int(low.sum())  # the grid units w is drawn in (all of them without a floor)
    # a dataset with no tokens gets a vanishing Dirichlet parameter and a zero cap: never drawn
    alpha = tempered_prior(prior, cfg.power)
    scales = np.logspace(math.log10(cfg.scale_min), math.log10(cfg.scale_max), cfg.num_scales)
    hard = cap_headroom(cap, low, units)  # what `cap` leaves each entry of w
    soft = np.minimum(cfg.cap_factor * prior, 1.0)
    cap = np.minimum(soft, hard / free)
    caps = np.minimum(np.floor(soft * free + 1e-9).astype(np.int64), hard)
    if caps.sum() < free:
        # cap_factor caps that cannot hold a whole mixture (with `cap`'s) are dropped
        cap, caps = hard / free, hard
    min_units = math.ceil(cfg.min_weight * free - 1e-9)
    seen: set[bytes] = set()
    if exclude is not None and len(exclude):
        exclude = np.asarray(exclude, dtype=np.float64).reshape(-1, d)
        seen = {row.tobytes() for row in to_grid(exclude, cfg.grid)}
    out: list[np.ndarray] = []
    barren = 0
    for _ in range(MAX_ATTEMPTS):
        if len(out) >= n or barren >= MAX_BARREN_ATTEMPTS:
            break
        batch = max(64, 2 * (n - len(out)))
        s = rng.choice(scales, size=batch)
        w = rng.gamma(s[:, None] * alpha[None, :])
        w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
        w = _cap(w, cap)
        w = np.where(w < cfg.min_weight, 0.0, w)
        w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
        # renormalising after zeroing can lift a capped entry a little over its cap
        grid_rows = to_units(_cap(w, cap), free, caps)
        valid = (grid_rows.sum(axis=1) == free) & (grid_rows <= caps).all(axis=1)
        valid &= ((grid_rows == 0) | (grid_rows >= min_units)).all(axis=1)
        found = len(out)
        for row in grid_rows[valid] + low:
            key = row.tobytes()
            if key in seen:
                continue
            seen.add(key)
            out.append(row)
            if len(out) == n:
                break
        barren = barren + 1 if len(out) == found else 0
    if len(out) < n and not allow_fewer:
        raise MixtureError(
            f"could only sample {len(out)} distinct mixtures of the {n} asked on a grid of "
            f"{cfg.grid} over {d} datasets; lower search.n or search.candidates, or refine "
            f"search.sampler.grid"
        )
    return np.stack(out).astype(np.float64) / units if out else np.zeros((0, d))


def uniform_mixture(d: int) -> np.ndarray:
    """The uniform mixture over d datasets."""
    return np.full(d, 1.0 / d)
