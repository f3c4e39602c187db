"""LightGBM regressor from a mixture to its ranking score, seeded and deterministic."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
from scipy.stats import spearmanr

from demix.config import PredictorConfig


class Predictor:
    """gbdt regressor; with a few dozen rows, min_child_samples must be small (default 5) or
    LightGBM grows constant trees."""

    def __init__(self, cfg: PredictorConfig, seed: int):
        self.model = lgb.LGBMRegressor(
            boosting_type="gbdt",
            n_estimators=cfg.num_iterations,
            learning_rate=cfg.learning_rate,
            num_leaves=cfg.num_leaves,
            min_child_samples=cfg.min_child_samples,
            min_data_in_bin=1,
            random_state=seed,
            deterministic=True,
            force_row_wise=True,
            n_jobs=1,
            verbose=-1,
        )

    def fit(self, X: np.ndarray, y: np.ndarray) -> Predictor:
        self.model.fit(np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.model.predict(np.asarray(X, dtype=np.float64))


def cross_val_predictions(
    X: np.ndarray, y: np.ndarray, cfg: PredictorConfig, seed: int, folds: int = 5
) -> tuple[np.ndarray, float]:
    """Out-of-fold predictions (deterministic folds) and their Spearman with y (nan if < 4 rows)."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(y)
    predicted = np.full(n, np.nan)
    if n < 4:
        return predicted, float("nan")
    fold = np.random.default_rng([seed, 7]).permutation(n) % min(folds, n)
    for k in np.unique(fold):
        train = fold != k
        predicted[~train] = Predictor(cfg, seed).fit(X[train], y[train]).predict(X[~train])
    rho = spearmanr(predicted, y).statistic
    return predicted, float(rho) if np.isfinite(rho) else float("nan")
