"""Rank statistics, bootstrap intervals over mixtures and the weights-only fits: what the
fidelity check (demix.fidelity), the improvement report and the decision share, below them all.

See demix.fidelity for what each statistic means in the protocol: rho and its top quarter,
regret, the percentile bootstrap over mixtures (the same draws for every predictor), paired
differences with a verdict, and the leave-one-out linear and Scheffe quadratic fits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import combinations
from typing import Any

import numpy as np
from scipy.stats import rankdata

from demix.verdict import LEVEL, RESAMPLES, percentile_interval, verdict

# --- rank statistics, along the last axis (one value per leading index) ---


def spearman_rows(a, b) -> np.ndarray:
    """Spearman rho along the last axis (average ranks for ties); NaN where there are fewer than
    3 points or a side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape[-1] < 3:
        return np.full(a.shape[:-1], np.nan)
    ra, rb = rankdata(a, axis=-1), rankdata(b, axis=-1)
    ra -= ra.mean(axis=-1, keepdims=True)
    rb -= rb.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((ra * ra).sum(axis=-1) * (rb * rb).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.clip((ra * rb).sum(axis=-1) / denominator, -1.0, 1.0)
    constant = (np.ptp(a, axis=-1) == 0) | (np.ptp(b, axis=-1) == 0)
    return np.where(constant, np.nan, rho)


def spearman(a, b) -> float:
    """Spearman rho; NaN with fewer than 3 points or a constant side."""
    return float(spearman_rows(a, b))


def top_quarter_rows(predicted, reference) -> np.ndarray:
    """spearman_rows on the best quarter by reference (at least 3) of each row."""
    predicted = np.asarray(predicted, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    k = max(3, math.ceil(reference.shape[-1] / 4))
    top = np.argsort(-reference, axis=-1, kind="stable")[..., :k]
    return spearman_rows(
        np.take_along_axis(predicted, top, axis=-1), np.take_along_axis(reference, top, axis=-1)
    )


def top_quarter_spearman(predicted, reference) -> float:
    """rho on the best quarter of mixtures by reference score (at least 3 of them)."""
    return float(top_quarter_rows(predicted, reference))


def regret(predicted, reference) -> float:
    """Best reference score minus the reference score of the predicted best mixture."""
    reference = np.asarray(reference, dtype=np.float64)
    return float(reference.max() - reference[int(np.argmax(predicted))])


# --- bootstrap over mixtures ---


def resample_rows(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """[resamples, n] mixture indices drawn with replacement from default_rng(seed)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_ci(replicates, level: float = LEVEL) -> list[float]:
    """[low, high] percentile interval of the defined (finite) replicates; NaN ones are dropped,
    [NaN, NaN] when none is left."""
    replicates = np.asarray(replicates, dtype=np.float64)
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return [float("nan"), float("nan")]
    return list(percentile_interval(finite, level))


def bootstrap_ci(
    statistic: Callable[..., np.ndarray],
    *arrays,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> list[float]:
    """Percentile interval of `statistic(*arrays)` over the mixtures resampled with replacement.

    arrays: one row per mixture on their first axis, e.g. (predicted, reference), all resampled
    with the same indices (resample_rows(R, resamples, seed)). statistic gets them with a leading
    resample axis, [B, R, ...], and returns B values (the mixture axis counts from the end, as
    in spearman_rows). Resamples where the statistic is NaN (undefined, e.g. rho with a constant
    side) are dropped before the interval is read off.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
    index = resample_rows(len(arrays[0]), resamples, seed)
    return percentile_ci(statistic(*(a[index] for a in arrays)), level)


def difference(value: float, replicates, level: float = LEVEL) -> dict[str, Any]:
    """{"diff", "ci_low", "ci_high", "verdict"} of a difference and its bootstrap replicates;
    verdict better | worse | inconclusive (also when the interval is undefined)."""
    low, high = percentile_ci(replicates, level)
    undefined = math.isnan(low) or math.isnan(high)
    return {
        "diff": float(value),
        "ci_low": low,
        "ci_high": high,
        "verdict": "inconclusive" if undefined else verdict(low, high),
    }


def paired_difference(
    statistic: Callable[..., np.ndarray],
    first,
    second,
    reference,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, Any]:
    """statistic(first, reference) - statistic(second, reference), e.g. rho(proxy) - rho(fit),
    with an interval from the same resampled mixtures for both terms (see bootstrap_ci)."""

    def diff(a, b, r):
        return statistic(a, r) - statistic(b, r)

    arrays = [np.asarray(x, dtype=np.float64) for x in (first, second, reference)]
    index = resample_rows(len(arrays[0]), resamples, seed)
    return difference(float(diff(*arrays)), diff(*(a[index] for a in arrays)), level)


# --- weights-only predictors ---


def scheffe_quadratic(weights: np.ndarray) -> np.ndarray:
    """Scheffe quadratic terms [R, D + D (D - 1) / 2]: w_i, then w_i w_j for i < j."""
    weights = np.asarray(weights, dtype=np.float64)
    pairs = [weights[:, i] * weights[:, j] for i, j in combinations(range(weights.shape[1]), 2)]
    return np.column_stack([weights, *pairs]) if pairs else weights


def loo_predictions(features: np.ndarray, target) -> np.ndarray:
    """Leave-one-out predictions of a least-squares fit of `target` on `features` (no intercept).

    Where the terms outnumber the other mixtures or are collinear (at a vertex every w_i w_j is
    0), lstsq returns the minimum-norm solution, so no ridge is needed.
    """
    features = np.asarray(features, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    out = np.empty_like(target)
    for i in range(target.size):
        keep = np.arange(target.size) != i
        coef, *_ = np.linalg.lstsq(features[keep], target[keep], rcond=None)
        out[i] = features[i] @ coef
    return out


def loo_linear_predictions(weights: np.ndarray, target) -> np.ndarray:
    """Leave-one-out linear fit on the weights (they sum to 1: an implicit intercept)."""
    return loo_predictions(weights, target)


def loo_quadratic_predictions(weights: np.ndarray, target) -> np.ndarray:
    """Leave-one-out Scheffe quadratic fit on the weights (exact for any quadratic target)."""
    return loo_predictions(scheffe_quadratic(weights), target)


# --- ranking metrics with intervals ---


def ranking_metrics(
    predicted, reference, index: np.ndarray | None = None, level: float = LEVEL
) -> dict[str, Any]:
    """rho, rho_top_quarter, regret; with `index` (resample_rows) also rho_ci and
    rho_top_quarter_ci."""
    predicted = np.asarray(predicted, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    out: dict[str, Any] = {
        "rho": spearman(predicted, reference),
        "rho_top_quarter": top_quarter_spearman(predicted, reference),
        "regret": regret(predicted, reference),
    }
    if index is not None:
        out["rho_ci"] = percentile_ci(spearman_rows(predicted[index], reference[index]), level)
        out["rho_top_quarter_ci"] = percentile_ci(
            top_quarter_rows(predicted[index], reference[index]), level
        )
    return out
