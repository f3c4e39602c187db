"""Sampler, predictor, rounds and the resumable search loop (real LightGBM)."""

from __future__ import annotations

import numpy as np
import pytest

from demix.config import PredictorConfig, SamplerConfig, SearchConfig
from demix.errors import MixtureError
from demix.search import (
    Predictor,
    ScoresTable,
    cross_val_predictions,
    propose_round,
    run_search,
    sample_mixtures,
    select_final,
    validate_mixture,
)
from demix.search.results import mixture_id
from demix.search.sampler import to_grid

PRIOR = np.array([0.5, 0.3, 0.15, 0.05])
CFG = SamplerConfig()


def test_samples_lie_on_the_grid_and_the_simplex():
    x = sample_mixtures(PRIOR, 2000, np.random.default_rng(0), CFG)
    units = np.rint(x / CFG.grid).astype(np.int64)
    assert (units.sum(axis=1) == round(1 / CFG.grid)).all()
    np.testing.assert_allclose(units * CFG.grid, x, atol=1e-12)
    assert (x >= 0).all()
    assert ((x == 0) | (x >= CFG.min_weight)).all()
    assert (x <= np.minimum(CFG.cap_factor * PRIOR, 1) + CFG.grid).all()
    assert len({tuple(r) for r in units}) == len(units)


def test_sampling_is_seeded_and_excludes():
    a = sample_mixtures(PRIOR, 50, np.random.default_rng(1), CFG)
    b = sample_mixtures(PRIOR, 50, np.random.default_rng(1), CFG)
    np.testing.assert_array_equal(a, b)
    c = sample_mixtures(PRIOR, 50, np.random.default_rng(1), CFG, exclude=a[:10])
    assert not {tuple(r) for r in to_grid(c, CFG.grid)} & {
        tuple(r) for r in to_grid(a[:10], CFG.grid)
    }


def test_exhausted_space_is_a_clear_error():
    coarse = SamplerConfig(grid=0.5)
    with pytest.raises(MixtureError, match="distinct mixtures"):
        sample_mixtures(np.array([0.5, 0.5]), 10, np.random.default_rng(0), coarse)


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({"a": 0.5, "zz": 0.5}, "unknown"),
        ({"a": float("inf"), "b": 0}, "NaN or infinite"),
        ({"a": 1.2, "b": -0.2}, "negative"),
        ({"a": 0.3, "b": 0.3}, "sum to 0.6"),
    ],
)
def test_validate_mixture(weights, expected):
    with pytest.raises(MixtureError, match=expected):
        validate_mixture(weights, ["a", "b"])


def test_validate_mixture_fills_missing_with_zero():
    np.testing.assert_array_equal(validate_mixture({"b": 1.0}, ["a", "b"]), [0.0, 1.0])


def _target_score(x: np.ndarray) -> np.ndarray:
    return -np.linalg.norm(x - np.array([0.3, 0.4, 0.2, 0.1]), axis=1)


def test_predictor_is_deterministic_and_learns():
    x = sample_mixtures(PRIOR, 60, np.random.default_rng(2), CFG)
    y = x[:, 0] - x[:, 1]
    cfg = PredictorConfig()
    p1 = Predictor(cfg, 0).fit(x, y).predict(x)
    p2 = Predictor(cfg, 0).fit(x, y).predict(x)
    np.testing.assert_array_equal(p1, p2)
    _, rho = cross_val_predictions(x, y, cfg, 0)
    assert rho > 0.8


def test_later_rounds_propose_predicted_best():
    cfg = SearchConfig(candidates=2000)
    x = sample_mixtures(PRIOR, 24, np.random.default_rng(3), CFG)
    y = _target_score(x)
    proposals = propose_round(1, 4, PRIOR, x, y, cfg, seed=0)
    assert proposals.shape == (4, 4)
    np.testing.assert_array_equal(proposals, propose_round(1, 4, PRIOR, x, y, cfg, seed=0))
    random_pick = sample_mixtures(PRIOR, 200, np.random.default_rng(9), CFG)
    assert _target_score(proposals).mean() > _target_score(random_pick).mean()


def test_select_final_is_a_deterministic_simplex_point():
    cfg = SearchConfig(candidates=2000, top_k=16)
    x = sample_mixtures(PRIOR, 24, np.random.default_rng(4), CFG)
    y = _target_score(x)
    m1, info = select_final(PRIOR, x, y, cfg, 0)
    m2, _ = select_final(PRIOR, x, y, cfg, 0)
    np.testing.assert_array_equal(m1, m2)
    assert m1.sum() == pytest.approx(1.0) and (m1 >= 0).all()
    assert info["predictor_spearman"] is not None


class Interrupt(Exception):
    pass


def _search(tmp_path, calls: list, fail_after: int | None = None):
    cfg = SearchConfig(n=8, rounds=3, candidates=2000, top_k=16)

    def evaluate(w):
        if fail_after is not None and len(calls) == fail_after:
            raise Interrupt
        calls.append(mixture_id(w))
        return {"t": {"value": float(_target_score(w[None])[0]), "higher_is_better": True}}

    def score(results):
        return [r["t"]["value"] for r in results]

    return run_search(
        ["a", "b", "c", "d"],
        PRIOR,
        cfg,
        0,
        evaluate,
        score,
        ScoresTable(tmp_path / "scores.jsonl"),
        log=lambda _: None,
    )


def test_search_finds_better_than_uniform_and_resumes(tmp_path):
    calls: list = []
    full = _search(tmp_path / "full", calls)
    assert full["proxies_evaluated"] == 8 + 4 + 2 == len(calls)
    found = _target_score(full["mixture"][None])[0]
    assert found > _target_score(np.full((1, 4), 0.25))[0] and found > _target_score(PRIOR[None])[0]

    calls_b: list = []
    with pytest.raises(Interrupt):
        _search(tmp_path / "resumed", calls_b, fail_after=10)
    calls_c: list = []
    resumed = _search(tmp_path / "resumed", calls_c)
    assert len(calls_b) + len(calls_c) == 14
    assert not set(calls_b) & set(calls_c)
    np.testing.assert_array_equal(resumed["mixture"], full["mixture"])


def test_scores_table_drops_a_truncated_last_row(tmp_path):
    table = ScoresTable(tmp_path / "s.jsonl")
    table.append({"id": "x", "round": 0})
    with open(tmp_path / "s.jsonl", "a") as f:
        f.write('{"id": "y", "rou')
    with pytest.warns(UserWarning, match="truncated"):
        assert [r["id"] for r in table.rows()] == ["x"]
    table.append({"id": "z", "round": 0})
    assert [r["id"] for r in table.rows()] == ["x", "z"]
