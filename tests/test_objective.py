"""search.objective: the paper's ranking objective and the noise-normalised one; the predictor
choice of search.predictor.kind: auto."""

from __future__ import annotations

import numpy as np
import pytest

from demix.config import PredictorConfig, SearchConfig
from demix.errors import TaskError
from demix.search import final_selection
from demix.search.objective import Objective, paired_noise, pool_percentiles
from demix.search.predictor import choose_predictor
from demix.search.sampler import sample_mixtures

NAMES = ["x", "y", "z"]
PRIOR = np.array([0.4, 0.35, 0.25])
CATEGORIES = {"A": ["a"], "B": ["b"]}
CONFIG = SearchConfig(n=8, rounds=2, candidates=3000, top_k=32)


def _task(value: float, stderr: float, higher: bool = True) -> dict:
    return {"metric": "m", "value": value, "stderr": stderr, "higher_is_better": higher}


def _rows(scale_a: float = 1.0) -> list[dict]:
    """Scored proxies whose task a rewards dataset x and task b rewards dataset y (a loss)."""
    mixtures = sample_mixtures(PRIOR, 24, np.random.default_rng(3), CONFIG.sampler)
    rows = []
    for i, w in enumerate(mixtures):
        rows.append(
            {
                "id": f"m{i}",
                "round": 0,
                "weights": dict(zip(NAMES, w.tolist(), strict=True)),
                "tasks": {
                    "a": _task(scale_a * (0.3 + w[0]), 0.05),
                    # a loss: lower is better, falls with the weight of y
                    "b": _task(2.0 - 0.5 * w[1], 0.05, higher=False),
                },
            }
        )
    return rows


def _chosen(kind: str, rows: list[dict]) -> np.ndarray:
    objective = Objective.from_config(kind, CATEGORIES, None)
    return final_selection(rows, NAMES, PRIOR, CONFIG, 0, objective)["mixture"]


def test_rescaling_one_category_changes_the_choice_only_under_normalized():
    """Ranking sees only ranks across the pool: scaling category A's effects by 10 leaves the
    chosen mixture as it was. Normalized weighs effects by their noise: A's effects, now 10x
    larger against the same standard errors, pull the mixture towards dataset x."""
    plain, scaled = _rows(), _rows(scale_a=10.0)
    np.testing.assert_allclose(_chosen("ranking", plain), _chosen("ranking", scaled), atol=1e-9)
    before, after = _chosen("normalized", plain), _chosen("normalized", scaled)
    assert after[0] > before[0] + 0.05, (before, after)


def test_ranking_targets_are_per_category_and_oriented():
    rows = _rows()
    objective = Objective.from_config("ranking", CATEGORIES, None)
    targets = objective.targets([r["tasks"] for r in rows])
    assert targets.shape == (len(rows), 2) and objective.columns == ["A", "B"]
    w = np.array([[r["weights"][n] for n in NAMES] for r in rows])
    # a loss is negated: the target of B rises with the weight of y
    assert np.corrcoef(targets[:, 1], w[:, 1])[0, 1] > 0.99
    assert np.corrcoef(targets[:, 0], w[:, 0])[0, 1] > 0.99


def test_ranking_combines_percentiles_across_the_pool_with_category_weights():
    predicted = np.array([[3.0, 0.0], [1.0, 2.0], [2.0, 1.0]])
    only_a = Objective.from_config("ranking", CATEGORIES, {"A": 1.0, "B": 0.0})
    np.testing.assert_allclose(only_a.combine(predicted), [1.0, 0.0, 0.5])
    equal = Objective.from_config("ranking", CATEGORIES, None)
    np.testing.assert_allclose(equal.combine(predicted), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(pool_percentiles(np.array([[5.0]])), [[0.5]])


def test_normalized_noise_is_the_paired_standard_error_of_a_difference():
    """Large document effects shared by every proxy cancel in a paired difference."""
    rng = np.random.default_rng(0)
    docs = 400
    difficulty = rng.normal(0, 1.0, docs)  # shared by every proxy
    results = []
    for shift in (0.0, 0.01, 0.02):
        per_doc = difficulty + shift + rng.normal(0, 0.05, docs)
        results.append(
            {
                "t": {
                    **_task(float(per_doc.mean()), per_doc.std() / np.sqrt(docs)),
                    "per_doc": per_doc.tolist(),
                }
            }
        )
    paired = paired_noise(results, "t")
    assert paired == pytest.approx(np.sqrt(2) * 0.05 / np.sqrt(docs), rel=0.15)
    unpaired = paired_noise(
        [{"t": {k: v for k, v in r["t"].items() if k != "per_doc"}} for r in results], "t"
    )
    assert unpaired > 10 * paired


def test_unknown_objective_and_weights_are_refused():
    with pytest.raises(TaskError, match="search.objective"):
        Objective.from_config("median", CATEGORIES, None)
    with pytest.raises(TaskError, match="names no category"):
        Objective.from_config("ranking", CATEGORIES, {"C": 1.0})


def test_auto_predictor_picks_by_cross_validated_spearman():
    """On few rows of a linear response Ridge ranks held-out rows better than 300 trees."""
    x = sample_mixtures(PRIOR, 10, np.random.default_rng(1), CONFIG.sampler)
    y = (x @ np.array([1.0, -0.5, 0.2]))[:, None]
    chosen, info = choose_predictor(x, y, PredictorConfig(kind="auto"), 0, lambda p: p[:, 0])
    assert chosen.kind == info["kind"] == "ridge"
    assert "lightgbm" in info["why"] and "ridge" in info["why"]
    fixed, info = choose_predictor(x, y, PredictorConfig(), 0, lambda p: p[:, 0])
    assert fixed.kind == "lightgbm" and info["why"] == "search.predictor.kind"
