"""The regressor from a mixture to a search target: LightGBM (the paper's) or Ridge, seeded and
deterministic. `search.predictor.kind: auto` picks per fit by cross-validated Spearman.

Small data: the search fits on as few as `search.n` rows (8 by default), and the cross-validation
on fewer. LightGBM grows a split only when both children hold min_child_samples rows, so with
the configured 5 and 8 rows every tree is a constant and every candidate gets the same
prediction. The effective min_child_samples is therefore min(configured, max(1, rows // 4)),
and min_data_in_bin is 1 so that a handful of rows still give more than a couple of bins.
From 20 rows on, the configured value applies unchanged.
"""

from __future__ import annotations

import os

import lightgbm as lgb
import numpy as np
from scipy.stats import spearmanr

from demix.config import PredictorConfig

PREDICT_THREADS = min(2, os.cpu_count() or 1)
# Fold assignment of the cross-validation: an rng stream apart from every round's.
CV_STREAM = 2_000_000


def seed_entropy(seed: int) -> int:
    """A run seed as non-negative entropy for numpy (which refuses negative seeds)."""
    return int(seed) % 2**63


def effective_min_child_samples(cfg: PredictorConfig, rows: int) -> int:
    """min_child_samples lowered for a few rows, so that trees can split at all."""
    return min(cfg.min_child_samples, max(1, rows // 4))


class Predictor:
    """gbdt regressor mixture -> score; two fits on the same data predict bit-identically."""

    def __init__(self, cfg: PredictorConfig, seed: int):
        self.cfg = cfg
        self.seed = seed
        self.model: lgb.LGBMRegressor | None = None

    def fit(self, X: np.ndarray, y: np.ndarray) -> Predictor:
        """Fit on rows X [n, D] and scores y [n]; returns self.

        Raises ValueError for mismatched shapes, no rows, or non-finite scores.
        """
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if X.ndim != 2 or y.shape != (len(X),) or len(X) == 0:
            raise ValueError(f"fit needs X [n, D] and y [n] with n >= 1, got {X.shape}, {y.shape}")
        if not np.all(np.isfinite(y)):
            raise ValueError("fit needs finite scores; drop the rows whose score is NaN or inf")
        if self.cfg.kind == "ridge":
            from sklearn.linear_model import Ridge

            self.model = Ridge(alpha=self.cfg.ridge_alpha).fit(X, y)
            return self
        self.model = lgb.LGBMRegressor(
            boosting_type="gbdt",
            n_estimators=self.cfg.num_iterations,
            learning_rate=self.cfg.learning_rate,
            num_leaves=self.cfg.num_leaves,
            min_child_samples=effective_min_child_samples(self.cfg, len(X)),
            min_data_in_bin=1,
            random_state=int(self.seed) % 2**31,
            deterministic=True,
            force_row_wise=True,
            # Fit on one thread: on a busy 2-core machine LightGBM's OpenMP threads spin against
            # each other (300 tiny parallel steps) and a 200-row fit took 10 s instead of 0.07 s.
            n_jobs=1,
            verbose=-1,
        )
        self.model.fit(X, y)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted scores of rows X [n, D].

        Raises RuntimeError before fit.
        """
        if self.model is None:
            raise RuntimeError("Predictor.predict called before fit")
        X = np.asarray(X, dtype=np.float64)
        if len(X) == 0:
            return np.zeros(0)
        if self.cfg.kind == "ridge":
            return self.model.predict(X)
        # One large parallel step halves predicting 100k candidates; rows are independent, so the
        # result is bit-identical to one thread.
        return self.model.predict(X, num_threads=PREDICT_THREADS)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rho of two samples; nan when either side is constant."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")  # a constant side has no ranking to compare
    rho = spearmanr(a, b).statistic
    return float(rho) if np.isfinite(rho) else float("nan")


def cross_val_predictions(
    X: np.ndarray, y: np.ndarray, cfg: PredictorConfig, seed: int, folds: int = 5
) -> tuple[np.ndarray, float]:
    """Out-of-fold predictions and their Spearman with y (nan with fewer than 4 rows).

    Folds are a seeded permutation of the rows cut into min(folds, n) parts, so the same rows
    in the same order always get the same folds.
    """
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(y)
    predicted = np.full(n, np.nan)
    if n < 4:
        return predicted, float("nan")
    fold = np.random.default_rng([seed_entropy(seed), CV_STREAM]).permutation(n) % min(folds, n)
    for k in range(min(folds, n)):
        held = fold == k
        predicted[held] = Predictor(cfg, seed).fit(X[~held], y[~held]).predict(X[held])
    return predicted, spearman(predicted, y)


def heldout_spearman(
    X: np.ndarray, y: np.ndarray, cfg: PredictorConfig, seed: int, folds: int = 5
) -> float:
    """k-fold cross-validated Spearman between predictions and observed scores (nan if n < 4)."""
    return cross_val_predictions(X, y, cfg, seed, folds)[1]


def cross_validated(
    X: np.ndarray, Y: np.ndarray, cfg: PredictorConfig, seed: int, combine
) -> float:
    """Spearman between the combined out-of-fold predictions of each target column of Y [n, k]
    and the combined observed targets (nan below 4 rows)."""
    if Y.shape[1] == 1:
        return cross_val_predictions(X, Y[:, 0], cfg, seed)[1]
    folds = np.column_stack(
        [cross_val_predictions(X, Y[:, j], cfg, seed)[0] for j in range(Y.shape[1])]
    )
    if np.isnan(folds).any():
        return float("nan")
    return spearman(combine(folds), combine(Y))


def choose_predictor(
    X: np.ndarray, Y: np.ndarray, cfg: PredictorConfig, seed: int, combine
) -> tuple[PredictorConfig, dict]:
    """The regressor to fit: cfg's kind, or with `auto` the one (lightgbm or ridge) whose
    cross-validated Spearman on these rows is higher (lightgbm on ties and below 4 rows).
    Returns its config and {"kind", "why"} for the report."""
    if cfg.kind != "auto":
        return cfg, {"kind": cfg.kind, "why": "search.predictor.kind"}
    rhos = {
        kind: cross_validated(X, Y, cfg.model_copy(update={"kind": kind}), seed, combine)
        for kind in ("lightgbm", "ridge")
    }
    finite = {k: v for k, v in rhos.items() if np.isfinite(v)}
    kind = "ridge" if finite.get("ridge", -np.inf) > finite.get("lightgbm", -np.inf) else "lightgbm"
    why = "cross-validated Spearman " + ", ".join(
        f"{k} {v:.3f}" if np.isfinite(v) else f"{k} n/a" for k, v in rhos.items()
    )
    return cfg.model_copy(update={"kind": kind}), {"kind": kind, "why": why}
