"""Ranking score of models from their evaluation results (percentile ranks, category means).

Direction: every value is first *oriented* so that higher is better: accuracies stay as they are,
loss-like metrics (`bits_per_byte`, held-out `loss`, anything with higher_is_better False) are
negated. Per task, a model's percentile rank among the compared models is its 0-based rank by
oriented value (ties share their average rank) divided by n - 1, so the worst model gets 0, the
best 1, and a lone model 0.5. A category's score is the mean of its tasks' percentile ranks; the
ranking score is the mean of the category scores, so every category weighs the same however many
tasks it has.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata

from demix.errors import TaskError


def oriented(result: dict[str, Any]) -> float:
    """A task result's value with higher = better (loss-like metrics negated)."""
    value = float(result["value"])
    return value if result["higher_is_better"] else -value


def oriented_values(result: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Flatten one model's evaluation result into {task: oriented value} (for tables)."""
    return {task: oriented(task_result) for task, task_result in result.items()}


def percentile_ranks(values: list[float] | np.ndarray) -> np.ndarray:
    """Percentile rank of each value among all: average 0-based rank of ties / (n - 1); n=1 -> 0.5."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 1:
        return np.array([0.5])
    # A failed evaluation (NaN) ranks below every real value rather than poisoning the ranking.
    array = np.where(np.isnan(array), -np.inf, array)
    return (rankdata(array, method="average") - 1.0) / (array.size - 1)


def score_models(
    results: list[dict[str, dict[str, Any]]], categories: dict[str, list[str]]
) -> list[dict[str, Any]]:
    """Score each model's result against the others: [{"categories": {c: score}, "ranking_score"}].

    Raises TaskError when a result lacks a task named in categories.
    """
    if not results:
        return []
    tasks = list(dict.fromkeys(t for names in categories.values() for t in names))
    ranks: dict[str, np.ndarray] = {}
    for task in tasks:
        for index, result in enumerate(results):
            if task not in result:
                raise TaskError(
                    f"result {index} has no task {task!r}; evaluate every model on the same "
                    f"evaluate.categories"
                )
        ranks[task] = percentile_ranks([oriented(result[task]) for result in results])
    scored = []
    for index in range(len(results)):
        category_scores = {
            category: float(np.mean([ranks[task][index] for task in names]))
            for category, names in categories.items()
        }
        scored.append(
            {
                "categories": category_scores,
                "ranking_score": float(np.mean(list(category_scores.values()))),
            }
        )
    return scored
