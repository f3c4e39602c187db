"""Rounds of the search: sample, then propose the predictor's best; select the final mixture."""

from __future__ import annotations

import numpy as np

from demix.config import SearchConfig
from demix.search.predictor import Predictor, cross_val_predictions
from demix.search.sampler import sample_mixtures

FINAL_ROUND = 1_000_000  # rng stream of the final selection, apart from every round's


def _best(pred: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest predictions; ties broken by position (deterministic)."""
    return np.lexsort((np.arange(len(pred)), -pred))[:k]


def propose_round(
    round_index: int,
    size: int,
    prior: np.ndarray,
    scored_X: np.ndarray,
    scored_y: np.ndarray,
    cfg: SearchConfig,
    seed: int,
) -> np.ndarray:
    """Round 0: `size` sampled mixtures. Later: the predicted best of cfg.candidates fresh ones.

    Depends only on its arguments (rng seeded from seed and round), so a rerun proposes the same.
    """
    rng = np.random.default_rng([seed, round_index])
    scored_X = np.asarray(scored_X, dtype=np.float64).reshape(-1, len(prior))
    if round_index == 0 or len(scored_X) < 2:
        return sample_mixtures(prior, size, rng, cfg.sampler, exclude=scored_X)
    candidates = sample_mixtures(prior, cfg.candidates, rng, cfg.sampler, exclude=scored_X)
    predicted = Predictor(cfg.predictor, seed).fit(scored_X, scored_y).predict(candidates)
    return candidates[_best(predicted, size)]


def select_final(
    prior: np.ndarray, scored_X: np.ndarray, scored_y: np.ndarray, cfg: SearchConfig, seed: int
) -> tuple[np.ndarray, dict]:
    """Mean of the top_k predicted mixtures among fresh candidates and the scored ones."""
    rng = np.random.default_rng([seed, FINAL_ROUND])
    scored_X = np.asarray(scored_X, dtype=np.float64)
    predictor = Predictor(cfg.predictor, seed).fit(scored_X, scored_y)
    pool = np.vstack([sample_mixtures(prior, cfg.candidates, rng, cfg.sampler), scored_X])
    predicted = predictor.predict(pool)
    top = _best(predicted, cfg.top_k)
    mixture = pool[top].mean(axis=0)
    mixture /= mixture.sum()
    _, rho = cross_val_predictions(scored_X, scored_y, cfg.predictor, seed)
    info = {
        "predicted_score": float(predictor.predict(mixture[None])[0]),
        "top_prediction": float(predicted[top[0]]),
        "predictor_spearman": None if np.isnan(rho) else round(rho, 4),
        "best_observed": float(np.max(scored_y)),
    }
    return mixture, info
