"""What the search learns and maximises (`search.objective`).

Every task value is first oriented so that higher is better (loss-like metrics negated, see
demix.evaluate.scoring.oriented). Then:

- `ranking` (the paper's, the authors' train_predictor.py): one regressor per category, fitted
  on the evaluated proxies' raw category score; its predictions over the candidate pool are
  percentile-ranked ACROSS THE POOL per category, and the objective is the mean of those ranks
  weighted by `evaluate.category_weights`. A category's score is the mean of its tasks after each
  task is standardised across the evaluated proxies (an affine map per task, so tasks of
  different scales, an accuracy and a held-out loss, weigh alike; a category of one task is
  regressed on its raw score up to scale). Because only ranks across the pool reach the
  objective, multiplying a category's scores by any factor changes nothing: the objective is
  blind to effect size between categories.
- `normalized`: one regressor on a single score: each task's deviation from the evaluated
  proxies' mean divided by its NOISE, the typical standard error of a paired difference between
  two proxies (every proxy is scored on the same documents; from the per-document scores when
  the results carry them, else from the reported standard errors), averaged per category and
  weighted by the category weights. A category whose proxies differ by many standard errors
  weighs more than one whose differences are inside the noise.

`Objective.targets(results)` gives the regression targets [n, k]; `combine(predicted)` turns
predictions [m, k] over a pool into one score per candidate; `observed(results)` is the same
score among the evaluated proxies themselves (plots, history, the best observed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from demix.config import EvaluateConfig, SearchConfig
from demix.errors import TaskError
from demix.evaluate.scoring import oriented
from demix.statistics import pooled_paired_stderr

OBJECTIVES = ("ranking", "normalized")


def _task_matrix(results: list[dict[str, dict[str, Any]]], tasks: list[str]) -> np.ndarray:
    """Oriented values [n rows, tasks]; TaskError naming a row without a task."""
    out = np.empty((len(results), len(tasks)))
    for i, result in enumerate(results):
        for j, task in enumerate(tasks):
            if task not in result:
                raise TaskError(
                    f"result {i} has no task {task!r}; evaluate every proxy on the same "
                    "evaluate.categories"
                )
            out[i, j] = oriented(result[task])
    return out


def _standardised(column: np.ndarray) -> np.ndarray:
    """A task's values across rows as z-scores (zeros when they do not vary)."""
    spread = np.std(column)
    if not np.isfinite(spread) or spread == 0:
        return np.zeros_like(column)
    return (column - np.mean(column)) / spread


def paired_noise(results: list[dict[str, dict[str, Any]]], task: str) -> float:
    """The typical standard error of a paired difference between two of these proxies on `task`.

    From per-document scores (`per_doc`, the same documents in the same order for every proxy):
    pooled_paired_stderr over the P proxies. Without per-document scores (or with
    fewer than 2 proxies): sqrt(2) times the root mean square of the reported standard errors
    (unpaired, larger). Never below 1e-12.
    """
    per_doc = [r[task].get("per_doc") for r in results]
    if len(results) >= 2 and all(p is not None and len(p) >= 2 for p in per_doc):
        lengths = {len(p) for p in per_doc}
        if len(lengths) == 1:
            sign = 1.0 if results[0][task]["higher_is_better"] else -1.0
            docs = sign * np.asarray(per_doc, dtype=np.float64)
            return max(pooled_paired_stderr(docs), 1e-12)
    stderrs = np.array([float(r[task].get("stderr") or 0.0) for r in results])
    stderrs = stderrs[np.isfinite(stderrs)]
    rms = float(np.sqrt(np.mean(stderrs**2))) if stderrs.size else 0.0
    return max(math.sqrt(2.0) * rms, 1e-12)


def pool_percentiles(predicted: np.ndarray) -> np.ndarray:
    """Each column's values as percentile ranks among the rows (ties averaged; 0.5 for one row)."""
    predicted = np.asarray(predicted, dtype=np.float64)
    if len(predicted) == 1:
        return np.full_like(predicted, 0.5)
    ranks = np.apply_along_axis(rankdata, 0, predicted, method="average")
    return (ranks - 1.0) / (len(predicted) - 1)


@dataclass(frozen=True)
class Objective:
    """`search.objective` over `evaluate.categories` with category weights (summing to 1)."""

    kind: str
    categories: dict[str, list[str]]
    weights: dict[str, float]

    @classmethod
    def from_config(cls, kind: str, categories: dict[str, list[str]], weights: dict | None):
        """The objective of a run; equal category weights unless given.

        Raises TaskError for an unknown objective or weights that name no category.
        """
        if kind not in OBJECTIVES:
            raise TaskError(f"search.objective {kind!r} is not one of {list(OBJECTIVES)}")
        raw = {c: float((weights or {}).get(c, 1.0)) for c in categories}
        unknown = sorted(set(weights or {}) - set(categories))
        if unknown:
            raise TaskError(f"evaluate.category_weights names no category: {unknown}")
        total = sum(raw.values())
        if not total > 0:
            raise TaskError("evaluate.category_weights must have a positive sum")
        return cls(kind, dict(categories), {c: w / total for c, w in raw.items()})

    @property
    def columns(self) -> list[str]:
        """The names of the regression targets (categories, or the one normalised score)."""
        return list(self.categories) if self.kind == "ranking" else ["normalized"]

    def targets(self, results: list[dict[str, dict[str, Any]]]) -> np.ndarray:
        """Regression targets [n, len(columns)] of evaluated proxies (all scored alike)."""
        if not results:
            return np.zeros((0, len(self.columns)))
        out = []
        for tasks in self.categories.values():
            values = _task_matrix(results, tasks)
            if self.kind == "ranking":
                z = np.column_stack([_standardised(values[:, j]) for j in range(len(tasks))])
            else:
                noise = np.array([paired_noise(results, t) for t in tasks])
                z = (values - values.mean(axis=0)) / noise
            out.append(z.mean(axis=1))
        categories = np.column_stack(out)
        if self.kind == "ranking":
            return categories
        weights = np.array([self.weights[c] for c in self.categories])
        return (categories @ weights)[:, None]

    def combine(self, predicted: np.ndarray) -> np.ndarray:
        """One objective value per candidate from predictions [m, len(columns)]."""
        predicted = np.asarray(predicted, dtype=np.float64).reshape(len(predicted), -1)
        if self.kind == "normalized":
            return predicted[:, 0]
        weights = np.array([self.weights[c] for c in self.categories])
        return pool_percentiles(predicted) @ weights

    def observed(self, results: list[dict[str, dict[str, Any]]]) -> np.ndarray:
        """The objective of each evaluated proxy among the evaluated ones."""
        if not results:
            return np.zeros(0)
        return self.combine(self.targets(results))


def search_objective(search: SearchConfig, evaluate: EvaluateConfig) -> Objective:
    """The search's objective (`search.objective` over `evaluate.categories` and their
    weights)."""
    return Objective.from_config(search.objective, evaluate.categories, evaluate.category_weights)
