"""Weights-only regressions as a search's last step: the same scored proxies, the same pool and
top-k mean as the search's own selection (rounds.select_final), with the predictor replaced by
a least-squares fit on the mixture weights (linear, or Scheffe quadratic: w_i and w_i w_j).

A linear fit's optimum on the simplex is a vertex; a quadratic one can be interior. They answer
"what does a regression on the weights alone choose from the same proxies?", the cheap
alternative a search by model proxies has to beat.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from demix.config import SearchConfig
from demix.errors import SearchError
from demix.ranking import scheffe_quadratic
from demix.search.rounds import FINAL_ROUND, _rng, _scored, best_indices
from demix.search.sampler import sample_mixtures

FITS = ("linear", "quadratic")


def weight_features(weights: np.ndarray, kind: str) -> np.ndarray:
    """The regression's terms of mixtures [n, D]: the weights (they sum to 1: an implicit
    intercept) or the Scheffe quadratic terms.

    Raises ValueError for a kind that is not one of FITS.
    """
    if kind == "linear":
        return np.asarray(weights, dtype=np.float64)
    if kind == "quadratic":
        return scheffe_quadratic(weights)
    raise ValueError(f"weights-only fit {kind!r} is not one of {list(FITS)}")


def fit_weights(weights: np.ndarray, targets: np.ndarray, kind: str) -> np.ndarray:
    """Least-squares coefficients [terms, k] of each target column on the weights' terms
    (minimum-norm where the terms outnumber the rows or are collinear)."""
    coef, *_ = np.linalg.lstsq(weight_features(weights, kind), targets, rcond=None)
    return coef


def fit_selection(
    prior: np.ndarray,
    scored_X: np.ndarray,
    scored_y: np.ndarray,
    cfg: SearchConfig,
    seed: int,
    kind: str,
    combine: Callable[[np.ndarray], np.ndarray],
    floor: np.ndarray | None = None,
    cap: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Mean of the top_k mixtures of the pool by a weights-only fit's prediction.

    The pool is select_final's (the same seeded fresh candidates and the scored rows under
    `cap`); `combine` turns the fitted columns into the objective (as in the search).
    info: kind, predicted_score (of the mixture, combined with the pool), best_observed.
    Raises SearchError without scored rows with finite targets.
    """
    prior = np.asarray(prior, dtype=np.float64)
    X, y = _scored(prior, scored_X, scored_y)
    if len(X) == 0:
        raise SearchError("no scored proxies to fit the weights on; the search scored none")
    fresh = sample_mixtures(
        prior,
        cfg.candidates,
        _rng(seed, FINAL_ROUND),
        cfg.sampler,
        exclude=X,
        allow_fewer=True,
        floor=floor,
        cap=cap,
    )
    pool = np.vstack([fresh, X if cap is None else X[(X - cap <= 1e-9).all(axis=1)]])
    coef = fit_weights(X, y, kind)
    predicted = weight_features(pool, kind) @ coef
    top = best_indices(combine(predicted), cfg.top_k)
    mixture = pool[top].mean(axis=0)
    mixture /= mixture.sum()
    with_mixture = np.vstack([predicted, weight_features(mixture[None], kind) @ coef])
    return mixture, {
        "kind": kind,
        "predicted_score": float(combine(with_mixture)[-1]),
        "best_observed": float(np.max(combine(y))),
    }
