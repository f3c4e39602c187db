"""How well merged proxies stand in for models trained on a mixture, against a trivial predictor.

Scores are oriented so that higher is better (demix.evaluate.scoring). For a set of mixtures with
a merged proxy and a trained reference each:
- Spearman rho between proxy and reference scores, per category and for the aggregate ranking
  score the search selects with; rho on the best quarter of mixtures by reference (at least 3);
- regret: the best reference score minus the reference score of the mixture the proxies rank
  first (0 = the proxies pick the truly best mixture);
- capability recovery (CRR): per task, sum of proxy values / sum of reference values for metrics
  where higher is better and sum of reference / sum of proxy for loss-like ones, so that 1 means
  the proxies perform like the trained models and < 1 that they fall short, whichever the
  direction; averaged over the tasks of a category, then over categories.
The same rho, top-quarter rho and regret are always reported for two trivial predictors that see
only the mixture weights: a leave-one-out least-squares fit of the reference score on the
weights, and, for a category named like a dataset, that dataset's weight. Per-domain rho is
easy to get from weights alone; a proxy is only informative where it beats these.

Per task, the signal-to-noise ratio of the references (standard deviation of a task's reference
values across mixtures / their mean standard error) tells whether the task separates the
mixtures at all: a task below 1 (e.g. multiple choice at chance for a small model) only adds
noise to every rank-based score, for proxies and references alike.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from demix.evaluate.scoring import score_models

AGGREGATE = "aggregate"


def spearman(a, b) -> float:
    """Spearman rho; NaN with fewer than 3 points or a constant side."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def top_quarter_spearman(predicted, reference) -> float:
    """rho on the best quarter of mixtures by reference score (at least 3 of them)."""
    reference = np.asarray(reference, dtype=np.float64)
    k = max(3, math.ceil(reference.size / 4))
    top = np.argsort(-reference, kind="stable")[:k]
    return spearman(np.asarray(predicted)[top], reference[top])


def regret(predicted, reference) -> float:
    """Best reference score minus the reference score of the predicted best mixture."""
    reference = np.asarray(reference, dtype=np.float64)
    return float(reference.max() - reference[int(np.argmax(predicted))])


def loo_linear_predictions(weights: np.ndarray, target) -> np.ndarray:
    """Leave-one-out predictions of a least-squares fit of `target` on the mixture weights.

    Mixture weights sum to 1, so the fit has an implicit intercept.
    """
    weights = np.asarray(weights, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    out = np.empty_like(target)
    for i in range(target.size):
        keep = np.arange(target.size) != i
        coef, *_ = np.linalg.lstsq(weights[keep], target[keep], rcond=None)
        out[i] = weights[i] @ coef
    return out


def task_signal(
    proxy_results: list[dict], reference_results: list[dict], tasks: list[str]
) -> dict[str, dict[str, float]]:
    """Per task: rho proxy vs reference values, and the references' spread, stderr and SNR.

    spread = sample standard deviation of the reference values across mixtures; stderr = mean of
    the references' finite standard errors (NaN when none); snr = spread / stderr.
    """
    out = {}
    for task in tasks:
        proxy = np.array([float(r[task]["value"]) for r in proxy_results])
        reference = np.array([float(r[task]["value"]) for r in reference_results])
        errors = [r[task].get("stderr") for r in reference_results]
        errors = [float(e) for e in errors if e is not None and math.isfinite(float(e))]
        spread = float(np.std(reference, ddof=1)) if reference.size > 1 else float("nan")
        stderr = float(np.mean(errors)) if errors else float("nan")
        out[task] = {
            "rho": spearman(proxy, reference),
            "spread": spread,
            "stderr": stderr,
            "snr": spread / stderr if stderr > 0 else float("nan"),
        }
    return out


def ranking_metrics(predicted, reference) -> dict[str, float]:
    return {
        "rho": spearman(predicted, reference),
        "rho_top_quarter": top_quarter_spearman(predicted, reference),
        "regret": regret(predicted, reference),
    }


def capability_recovery(
    proxy_results: list[dict], reference_results: list[dict], categories: dict[str, list[str]]
) -> dict[str, float]:
    """CRR per category and their mean (key "mean"); see the module docstring for the convention."""
    per_category = {}
    for category, tasks in categories.items():
        ratios = []
        for task in tasks:
            proxy = sum(float(r[task]["value"]) for r in proxy_results)
            reference = sum(float(r[task]["value"]) for r in reference_results)
            higher_is_better = reference_results[0][task]["higher_is_better"]
            numerator, denominator = (proxy, reference) if higher_is_better else (reference, proxy)
            ratios.append(numerator / denominator if denominator else float("nan"))
        per_category[category] = float(np.mean(ratios))
    per_category["mean"] = float(np.mean(list(per_category.values())))
    return per_category


def fidelity(
    names: list[str],
    weights: np.ndarray,
    proxy_results: list[dict[str, Any]],
    reference_results: list[dict[str, Any]],
    categories: dict[str, list[str]],
) -> dict[str, Any]:
    """Every fidelity number for mixtures `weights` [R, D] (see the module docstring).

    Returns {"categories": {category | "aggregate": {"proxy": {...}, "trivial_linear": {...},
    "trivial_weight": {...} | None, "proxy_beats_trivial": bool}}, "crr": {...}, "n": R,
    "tasks": {task: task_signal entry}, "proxy_scores": {...}, "reference_scores": {...}}.
    """
    weights = np.asarray(weights, dtype=np.float64)
    proxy = score_models(proxy_results, categories)
    reference = score_models(reference_results, categories)

    def column(scored: list[dict], category: str) -> np.ndarray:
        if category == AGGREGATE:
            return np.array([s["ranking_score"] for s in scored])
        return np.array([s["categories"][category] for s in scored])

    out: dict[str, Any] = {}
    for category in [*categories, AGGREGATE]:
        p, r = column(proxy, category), column(reference, category)
        entry = {
            "proxy": ranking_metrics(p, r),
            "trivial_linear": ranking_metrics(loo_linear_predictions(weights, r), r),
            "trivial_weight": (
                ranking_metrics(weights[:, names.index(category)], r) if category in names else None
            ),
        }
        trivial_rhos = [
            entry[k]["rho"] for k in ("trivial_linear", "trivial_weight") if entry[k] is not None
        ]
        entry["proxy_beats_trivial"] = bool(
            entry["proxy"]["rho"] > max(trivial_rhos)
        )  # NaN compares False: an undefined rho never counts as beating anything
        out[category] = entry
    return {
        "n": int(len(weights)),
        "categories": out,
        "crr": capability_recovery(proxy_results, reference_results, categories),
        "tasks": task_signal(
            proxy_results, reference_results, list(dict.fromkeys(sum(categories.values(), [])))
        ),
        "proxy_scores": {c: column(proxy, c).tolist() for c in [*categories, AGGREGATE]},
        "reference_scores": {c: column(reference, c).tolist() for c in [*categories, AGGREGATE]},
    }
