"""Rounds of the search: sample, then propose from the predicted top; select the final mixture.

An intermediate round, as in the authors' code (train_predictor.py, select_best_samples), ranks
a fresh candidate pool by the predictor and draws its `size` proposals at random, without
replacement, from the predicted top. Their released code shows only the final call (the mean
of the top 1,280 of 200,000), not how large their intermediate top is; here it is the same
search.top_k the final mixture averages over, or the top `size` when top_k is smaller. Drawing
rather than taking the very best keeps a round from spending every proxy on the one narrow
region that a predictor fitted on a handful of points happens to favour.

Each call draws from its own rngs, default_rng([seed, round_index, stream]) with one stream for
the candidates and one for the draw from the top, so its result depends only on its arguments,
never on what ran before it in the process.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from demix.config import PredictorConfig, SearchConfig
from demix.errors import MixtureError, SearchError
from demix.search.predictor import Predictor, choose_predictor, cross_validated, seed_entropy
from demix.search.sampler import sample_mixtures

# Predictions [m, k] of the k regression targets -> one objective value per candidate [m].
Combine = Callable[[np.ndarray], np.ndarray]

CANDIDATES_STREAM = 0
PROPOSALS_STREAM = 1
FINAL_ROUND = 1_000_000  # the final selection's rng, apart from every round's


def _rng(seed: int, round_index: int, stream: int = CANDIDATES_STREAM) -> np.random.Generator:
    return np.random.default_rng([seed_entropy(seed), round_index, stream])


def best_indices(predicted: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest predictions; ties go to the earlier index (deterministic)."""
    return np.lexsort((np.arange(len(predicted)), -predicted))[:k]


def first_column(predicted: np.ndarray) -> np.ndarray:
    """The combination of a single regression target: the target itself."""
    return np.asarray(predicted)[:, 0]


def _scored(prior: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scored rows as arrays [n, D] and targets [n, k]; rows without finite targets dropped."""
    X = np.asarray(X, dtype=np.float64).reshape(-1, len(prior))
    y = np.asarray(y, dtype=np.float64)
    y = y.reshape(len(y), 1) if y.ndim == 1 else y.reshape(len(y), y.shape[-1])
    if len(X) != len(y):
        raise ValueError(f"{len(X)} scored mixtures but {len(y)} scores")
    keep = np.isfinite(y).all(axis=1) if y.shape[1] else np.ones(len(y), dtype=bool)
    return X[keep], y[keep]


def fit_predictors(
    X: np.ndarray, Y: np.ndarray, cfg: PredictorConfig, seed: int
) -> list[Predictor]:
    """One regressor per target column of Y [n, k]."""
    return [Predictor(cfg, seed).fit(X, Y[:, j]) for j in range(Y.shape[1])]


def predict_all(predictors: list[Predictor], pool: np.ndarray) -> np.ndarray:
    """Predictions [m, k] of each regressor over the pool."""
    return np.column_stack([p.predict(pool) for p in predictors])


def candidate_pool(
    round_index: int,
    prior: np.ndarray,
    scored_X: np.ndarray,
    cfg: SearchConfig,
    seed: int,
    size: int = 0,
    floor: np.ndarray | None = None,
    cap: np.ndarray | None = None,
) -> np.ndarray:
    """The fresh candidates a round ranks: max(cfg.candidates, size) of them, none scored, each
    above `floor` and under `cap` (see sample_mixtures; None: the whole simplex).

    Fewer only when the grid holds fewer unscored mixtures.
    """
    exclude = np.asarray(scored_X, dtype=np.float64).reshape(-1, len(prior))
    return sample_mixtures(
        prior,
        max(cfg.candidates, size),
        _rng(seed, round_index),
        cfg.sampler,
        exclude=exclude,
        allow_fewer=True,
        floor=floor,
        cap=cap,
    )


def propose_round(
    round_index: int,
    size: int,
    prior: np.ndarray,
    scored_X: np.ndarray,
    scored_y: np.ndarray,
    cfg: SearchConfig,
    seed: int,
    combine: Combine = first_column,
    floor: np.ndarray | None = None,
    cap: np.ndarray | None = None,
) -> np.ndarray:
    """Round 0: `size` sampled mixtures. Later: `size` drawn from the predicted top of the pool.

    `scored_y`: the scored rows' regression targets, [n] or [n, k] (one regressor each);
    `combine` turns the k predictions of a candidate into the objective it is ranked by.
    The pool is cfg.candidates fresh mixtures (none scored); the predicted top is its
    max(cfg.top_k, size) best predictions, and the proposals, in predicted order, are a seeded
    draw without replacement from it. A later round with fewer than 2 scored rows has nothing
    to learn from and samples like round 0. Every mixture sampled lies above `floor` and under
    `cap` (see sample_mixtures; None: the whole simplex), so every proposal does.
    Raises MixtureError when the space holds fewer than `size` unscored mixtures.
    """
    prior = np.asarray(prior, dtype=np.float64)
    X, y = _scored(prior, scored_X, scored_y)
    if round_index == 0 or len(X) < 2:
        exclude = np.asarray(scored_X, dtype=np.float64).reshape(-1, len(prior))
        rng = _rng(seed, round_index)
        return sample_mixtures(prior, size, rng, cfg.sampler, exclude=exclude, floor=floor, cap=cap)
    candidates = candidate_pool(round_index, prior, scored_X, cfg, seed, size, floor, cap)
    if len(candidates) < size:
        raise MixtureError(
            f"round {round_index}: only {len(candidates)} unscored mixtures left on the grid, "
            f"{size} needed; lower search.n or refine search.sampler.grid"
        )
    predictor = choose_predictor(X, y, cfg.predictor, seed, combine)[0]
    predicted = combine(predict_all(fit_predictors(X, y, predictor, seed), candidates))
    top = best_indices(predicted, max(cfg.top_k, size))
    drawn = _rng(seed, round_index, PROPOSALS_STREAM).choice(len(top), size, replace=False)
    return candidates[top[np.sort(drawn)]]


def select_final(
    prior: np.ndarray,
    scored_X: np.ndarray,
    scored_y: np.ndarray,
    cfg: SearchConfig,
    seed: int,
    combine: Combine = first_column,
    floor: np.ndarray | None = None,
    cap: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Mean of the top_k predicted mixtures among cfg.candidates fresh ones and the scored ones.

    `scored_y`, `combine`, `floor` and `cap` as in propose_round. The mixture is under `cap`:
    every row of the pool is (fresh ones are sampled under it; scored ones over it, from a
    search under other caps, are left out of the pool), a cap bounds each weight on its own so
    a mean of rows under it is under it too, and renormalising that mean (of rows summing to 1
    on the grid) moves it by float rounding only. info: predicted_score (of the returned
    mixture, combined with the pool's predictions), top_prediction, predictor_spearman
    (cross-validated; None below 4 rows), best_observed, predictor (the regressor used and why),
    pool (the candidates ranked, [m, D]: an array, for the caller to summarise).
    Raises SearchError when no row has a finite score.
    """
    prior = np.asarray(prior, dtype=np.float64)
    X, y = _scored(prior, scored_X, scored_y)
    if len(X) == 0:
        raise SearchError(
            "no scored proxies to select a mixture from; run the search rounds first "
            "(search.rounds >= 1) and check the scores table is not empty"
        )
    rng = _rng(seed, FINAL_ROUND)
    fresh = sample_mixtures(
        prior, cfg.candidates, rng, cfg.sampler, exclude=X, allow_fewer=True, floor=floor, cap=cap
    )
    pool = np.vstack([fresh, X if cap is None else X[(X - cap <= 1e-9).all(axis=1)]])
    predictor, choice = choose_predictor(X, y, cfg.predictor, seed, combine)
    predictors = fit_predictors(X, y, predictor, seed)
    pool_predictions = predict_all(predictors, pool)
    predicted = combine(pool_predictions)
    top = best_indices(predicted, cfg.top_k)
    mixture = pool[top].mean(axis=0)
    mixture /= mixture.sum()
    rho = cross_validated(X, y, predictor, seed, combine)
    with_mixture = np.vstack([pool_predictions, predict_all(predictors, mixture[None])])
    info = {
        "predicted_score": float(combine(with_mixture)[-1]),
        "top_prediction": float(predicted[top[0]]),
        "predictor_spearman": None if np.isnan(rho) else round(rho, 4),
        "best_observed": float(np.max(combine(y))),
        "predictor": choice,
        "pool": pool,
    }
    return mixture, info
