"""Sampler, predictor, rounds, scores table and the resumable search loop (real LightGBM)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from demix.config import PredictorConfig, SamplerConfig, SearchConfig
from demix.errors import MixtureError, SearchError
from demix.search import (
    Predictor,
    ScoresTable,
    cross_val_predictions,
    final_selection,
    heldout_spearman,
    mixture_id,
    propose_round,
    round_proposals,
    run_search,
    sample_mixtures,
    select_final,
    uniform_mixture,
    validate_mixture,
)
from demix.search.objective import Objective
from demix.search.rounds import candidate_pool
from demix.search.sampler import to_grid

PRIOR = np.array([0.5, 0.3, 0.15, 0.05])
NAMES = ["a", "b", "c", "d"]
CFG = SamplerConfig()
UNITS = 5000  # 1 / CFG.grid
TARGET = np.array([0.3, 0.4, 0.2, 0.1])


def _units(x: np.ndarray) -> np.ndarray:
    return np.rint(np.asarray(x) * UNITS).astype(np.int64)


def _target_score(x: np.ndarray) -> np.ndarray:
    return -np.linalg.norm(np.atleast_2d(x) - TARGET, axis=1)


# ---------------------------------------------------------------- sampler


def test_samples_are_distinct_grid_points_of_the_simplex_within_caps():
    x = sample_mixtures(PRIOR, 2000, np.random.default_rng(0), CFG)
    units = _units(x)
    assert x.shape == (2000, 4)
    np.testing.assert_array_equal(x, units / UNITS)  # exactly on the grid
    assert (units.sum(axis=1) == UNITS).all()  # exact sum 1, in integer grid units
    assert (units >= 0).all()
    cap_units = np.floor(np.minimum(CFG.cap_factor * PRIOR, 1) * UNITS + 1e-9).astype(np.int64)
    assert (units <= cap_units).all()
    # the caps bind (the smallest dataset's cap, 4 * 0.05, is reached), so the check above bites
    assert units[:, 3].max() == cap_units[3]
    assert len({r.tobytes() for r in units}) == len(units)


def test_small_weights_are_zeroed():
    cfg = SamplerConfig(min_weight=1e-3)  # 5 grid units
    units = _units(sample_mixtures(PRIOR, 2000, np.random.default_rng(0), cfg))
    assert ((units == 0) | (units >= 5)).all()
    assert (units == 0).any()  # low Dirichlet scales make sparse rows


def test_rounding_never_lifts_an_entry_past_its_cap():
    w = np.array([[0.25, 0.25, 0.5]])
    # plain largest remainder on a 0.1 grid gives [3, 2, 5] (ties to the first); the cap says 2
    np.testing.assert_array_equal(to_grid(w, 0.1), [[3, 2, 5]])
    np.testing.assert_array_equal(to_grid(w, 0.1, np.array([2, 5, 5])), [[2, 3, 5]])


def test_sampling_is_seeded_and_excludes():
    a = sample_mixtures(PRIOR, 50, np.random.default_rng(1), CFG)
    b = sample_mixtures(PRIOR, 50, np.random.default_rng(1), CFG)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sample_mixtures(PRIOR, 50, np.random.default_rng(2), CFG))
    c = sample_mixtures(PRIOR, 50, np.random.default_rng(1), CFG, exclude=a[:10])
    assert not {r.tobytes() for r in _units(c)} & {r.tobytes() for r in _units(a[:10])}
    # the rows not excluded still come in the same order
    np.testing.assert_array_equal(c[:40], a[10:])


def test_exhausted_space_is_a_clear_error_or_a_smaller_pool():
    coarse = SamplerConfig(grid=0.1)
    two = np.array([0.5, 0.5])
    with pytest.raises(MixtureError, match="could only sample 11 distinct mixtures") as err:
        sample_mixtures(two, 20, np.random.default_rng(0), coarse)
    assert "\n" not in str(err.value)
    pool = sample_mixtures(two, 20, np.random.default_rng(0), coarse, allow_fewer=True)
    assert sorted(_units(pool)[:, 0] // 500) == list(range(11))  # every point of the 0.1 grid


@pytest.mark.parametrize(
    ("prior", "cfg", "expected"),
    [
        (np.array([0.5, 0.6]), CFG, "not on the simplex"),
        (np.array([0.5, np.nan]), CFG, "not on the simplex"),
        (PRIOR, SamplerConfig(grid=3e-4), "not a whole number"),
    ],
)
def test_sampler_rejects_bad_prior_and_grid(prior, cfg, expected):
    with pytest.raises(MixtureError, match=expected) as err:
        sample_mixtures(prior, 5, np.random.default_rng(0), cfg)
    assert "\n" not in str(err.value)


def test_uniform_mixture():
    np.testing.assert_array_equal(uniform_mixture(4), [0.25] * 4)


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({"a": 0.5, "zz": 0.5}, "unknown dataset"),
        ({"a": float("inf"), "b": 0}, "NaN or infinite"),
        ({"a": float("nan"), "b": 1}, "NaN or infinite"),
        ({"a": "half", "b": 0.5}, "not a number"),
        ({"a": 1.2, "b": -0.2}, "negative"),
        ({"a": 0.3, "b": 0.3}, "sum to 0.6"),
        ({"a": 0.5, "b": 0.500002}, "sum to 1.000002"),
    ],
)
def test_validate_mixture_errors_are_one_line(weights, expected):
    with pytest.raises(MixtureError, match=expected) as err:
        validate_mixture(weights, ["a", "b"])
    assert "\n" not in str(err.value)


def test_validate_mixture_fills_missing_with_zero_and_tolerates_1e_7():
    np.testing.assert_array_equal(validate_mixture({"b": 1.0}, ["a", "b"]), [0.0, 1.0])
    validate_mixture({"a": 0.5, "b": 0.5000001}, ["a", "b"])


# ---------------------------------------------------------------- predictor


def test_predictor_is_deterministic_and_learns():
    x = sample_mixtures(PRIOR, 60, np.random.default_rng(2), CFG)
    y = x[:, 0] - x[:, 1]
    cfg = PredictorConfig()
    fresh = sample_mixtures(PRIOR, 500, np.random.default_rng(3), CFG)
    p1 = Predictor(cfg, 0).fit(x, y).predict(fresh)
    p2 = Predictor(cfg, 0).fit(x, y).predict(fresh)
    np.testing.assert_array_equal(p1, p2)
    # predict runs on 2 threads; rows are independent, so one thread gives the same bits
    single = Predictor(cfg, 0).fit(x, y)
    np.testing.assert_array_equal(single.model.predict(fresh, num_threads=1), p1)
    rho = heldout_spearman(x, y, cfg, 0)
    assert rho > 0.8
    assert rho == heldout_spearman(x, y, cfg, 0)
    predicted, rho2 = cross_val_predictions(x, y, cfg, 0)
    assert rho2 == rho and np.isfinite(predicted).all()


def test_predictor_splits_with_a_first_round_of_8_rows():
    # with the configured min_child_samples=5, 8 rows would give constant trees
    x = sample_mixtures(PRIOR, 8, np.random.default_rng(0), CFG)
    fresh = sample_mixtures(PRIOR, 500, np.random.default_rng(1), CFG)
    predicted = Predictor(PredictorConfig(), 0).fit(x, x[:, 0] - x[:, 1]).predict(fresh)
    assert len(np.unique(predicted)) > 5
    truth = fresh[:, 0] - fresh[:, 1]
    assert np.corrcoef(predicted, truth)[0, 1] > 0.5


def test_heldout_spearman_needs_4_rows():
    x = sample_mixtures(PRIOR, 3, np.random.default_rng(0), CFG)
    assert np.isnan(heldout_spearman(x, x[:, 0], PredictorConfig(), 0))


# ---------------------------------------------------------------- rounds

SEARCH = SearchConfig(candidates=2000, top_k=16)


def _scored(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = sample_mixtures(PRIOR, n, np.random.default_rng(seed), CFG)
    return x, _target_score(x)


def test_round_zero_samples_without_the_predictor():
    first = propose_round(0, 8, PRIOR, np.zeros((0, 4)), np.zeros(0), SEARCH, seed=0)
    assert first.shape == (8, 4)
    np.testing.assert_array_equal(_units(first).sum(axis=1), UNITS)
    x, y = _scored(8, 7)
    np.testing.assert_array_equal(first, propose_round(0, 8, PRIOR, x[:0], y[:0], SEARCH, 0))


def _units_set(x: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in _units(x)}


def test_later_rounds_draw_their_proposals_from_the_predicted_top():
    x, y = _scored(24, 3)
    proposals = propose_round(1, 4, PRIOR, x, y, SEARCH, seed=0)
    # same inputs, same output, whatever ran in between
    np.random.default_rng(0).random(100)
    propose_round(2, 4, PRIOR, x, y, SEARCH, seed=0)
    np.testing.assert_array_equal(proposals, propose_round(1, 4, PRIOR, x, y, SEARCH, seed=0))

    pool = candidate_pool(1, PRIOR, x, SEARCH, seed=0)
    assert len(pool) == SEARCH.candidates
    predicted = Predictor(SEARCH.predictor, 0).fit(x, y).predict(pool)
    order = np.lexsort((np.arange(len(pool)), -predicted))
    top = pool[order[: SEARCH.top_k]]
    assert _units_set(proposals) <= _units_set(top)  # drawn from the predicted top 16 ...
    assert _units_set(proposals) != _units_set(pool[order[:4]])  # ... not its best 4
    proposed = Predictor(SEARCH.predictor, 0).fit(x, y).predict(proposals)
    assert (np.diff(proposed) <= 0).all()  # in predicted order
    assert not _units_set(proposals) & _units_set(x)
    assert _target_score(proposals).mean() > _target_score(pool).mean()
    # other seeds propose other mixtures
    draws = {_units(propose_round(1, 4, PRIOR, x, y, SEARCH, seed=s)).tobytes() for s in range(4)}
    assert len(draws) == 4


def test_a_top_no_larger_than_the_round_is_the_round():
    x, y = _scored(24, 3)
    cfg = SearchConfig(candidates=2000, top_k=2)
    pool = candidate_pool(1, PRIOR, x, cfg, seed=0)
    predicted = Predictor(cfg.predictor, 0).fit(x, y).predict(pool)
    best = pool[np.lexsort((np.arange(len(pool)), -predicted))[:4]]
    np.testing.assert_array_equal(propose_round(1, 4, PRIOR, x, y, cfg, seed=0), best)


def test_a_grid_smaller_than_the_candidate_count_still_proposes():
    # 101 points; proposals come from the predicted top 8
    cfg = SearchConfig(candidates=2000, top_k=8, sampler=SamplerConfig(grid=0.01))
    two = np.array([0.5, 0.5])
    x = propose_round(0, 8, two, np.zeros((0, 2)), np.zeros(0), cfg, 0)
    y = -np.abs(x[:, 0] - 0.7)
    pool = candidate_pool(1, two, x, cfg, 0)
    assert 50 < len(pool) <= 101 - 8
    proposals = propose_round(1, 4, two, x, y, cfg, 0)
    assert len(proposals) == 4 and np.abs(proposals[:, 0] - 0.7).mean() < np.abs(y).mean()


def test_select_final_is_a_deterministic_simplex_point_near_the_best():
    x, y = _scored(24, 4)
    m1, info = select_final(PRIOR, x, y, SEARCH, 0)
    m2, info2 = select_final(PRIOR, x, y, SEARCH, 0)
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(info.pop("pool"), info2.pop("pool"))
    assert info == info2
    assert m1.sum() == pytest.approx(1.0, abs=1e-12) and (m1 >= 0).all()
    assert set(info) >= {"predicted_score", "top_prediction", "predictor_spearman"}
    assert info["predictor_spearman"] > 0.5
    assert _target_score(m1)[0] > _target_score(uniform_mixture(4))[0]
    assert _target_score(m1)[0] > np.median(y)


def test_select_final_without_scores_is_a_clear_error():
    with pytest.raises(SearchError, match="no scored proxies"):
        select_final(PRIOR, np.zeros((0, 4)), np.zeros(0), SEARCH, 0)


# ---------------------------------------------------------------- scores table


def test_mixture_id_is_stable_and_grid_based():
    w = np.array([0.5, 0.3, 0.15, 0.05])
    assert (
        mixture_id(w)
        == "m-"
        + __import__("hashlib")
        .sha256(np.array([2500, 1500, 750, 250], dtype="<i8").tobytes())
        .hexdigest()[:12]
    )
    assert mixture_id(w + np.array([1e-9, -1e-9, 0, 0])) == mixture_id(w)
    assert mixture_id(np.array([0.5, 0.3, 0.05, 0.15])) != mixture_id(w)


def test_scores_table_drops_a_truncated_last_row(tmp_path):
    table = ScoresTable(tmp_path / "s.jsonl")
    assert table.rows() == [] and not table.has("x")
    table.append({"id": "x", "round": 0})
    with open(tmp_path / "s.jsonl", "a") as f:
        f.write('{"id": "y", "rou')
    with pytest.warns(UserWarning, match="truncated"):
        assert [r["id"] for r in table.rows()] == ["x"]
    table.append({"id": "z", "round": 0})
    assert [r["id"] for r in table.rows()] == ["x", "z"]
    assert table.has("z") and not table.has("y")


def test_scores_table_refuses_a_broken_middle_row(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": "x", "round": 0}\n{"id": broken\n{"id": "z", "round": 0}\n')
    with pytest.raises(SearchError, match=r"s\.jsonl:2: not a JSON row") as err:
        ScoresTable(path).rows()
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- search loop


class Interrupt(Exception):
    pass


def _evaluate(calls: list, fail_after: int | None = None):
    def evaluate(w: np.ndarray) -> dict:
        if fail_after is not None and len(calls) == fail_after:
            raise Interrupt
        calls.append(mixture_id(w))
        value = float(_target_score(w)[0])
        return {"t": {"metric": "m", "value": value, "stderr": 0.0, "higher_is_better": True}}

    return evaluate


# the paper's objective over one category of one task
OBJECTIVE = Objective.from_config("ranking", {"all": ["t"]}, None)


CONFIG = SearchConfig(n=8, rounds=3, candidates=2000, top_k=16)


def _search(path, calls: list, fail_after: int | None = None, seed: int = 0) -> dict:
    return run_search(
        NAMES,
        PRIOR,
        CONFIG,
        seed,
        _evaluate(calls, fail_after),
        OBJECTIVE,
        ScoresTable(path / "scores.jsonl"),
    )


@pytest.fixture(scope="module")
def full_search(tmp_path_factory):
    calls: list = []
    path = tmp_path_factory.mktemp("full")
    return _search(path, calls), calls, path


def test_search_finds_a_mixture_better_than_the_baselines(full_search):
    found, calls, path = full_search
    assert found["proxies_evaluated"] == 8 + 4 + 2 == len(calls) == len(set(calls))
    assert found["rounds"] == 3
    assert [row["round"] for row in found["history"]] == [0] * 8 + [1] * 4 + [2] * 2
    assert all(0 <= row["ranking_score"] <= 1 for row in found["history"])
    assert isinstance(found["predicted_score"], float)
    mixture = found["mixture"]
    assert mixture.sum() == pytest.approx(1.0, abs=1e-12) and (mixture >= 0).all()
    score = _target_score(mixture)[0]
    assert score > _target_score(uniform_mixture(4))[0]
    assert score > _target_score(PRIOR)[0]
    # the predictor's rounds beat the random first round
    observed = {row["id"]: _target_score(weights)[0] for row, weights in _rows(path)}
    first = [observed[row["id"]] for row in found["history"] if row["round"] == 0]
    later = [observed[row["id"]] for row in found["history"] if row["round"] > 0]
    assert np.mean(later) > np.mean(first)


def _rows(path):
    for row in ScoresTable(path / "scores.jsonl").rows():
        yield row, np.array([row["weights"][n] for n in NAMES])


@pytest.mark.parametrize("fail_after", [3, 10])
def test_an_interrupted_search_resumes_to_the_same_mixture(tmp_path, full_search, fail_after):
    full, _, _ = full_search
    before: list = []
    with pytest.raises(Interrupt):
        _search(tmp_path, before, fail_after=fail_after)
    assert len(before) == fail_after
    # a crash in the middle of writing a row leaves half a line behind
    with open(tmp_path / "scores.jsonl", "a") as f:
        f.write('{"id": "m-half", "rou')
    after: list = []
    with pytest.warns(UserWarning, match="truncated"):
        resumed = _search(tmp_path, after)
    assert len(before) + len(after) == resumed["proxies_evaluated"] == 14
    assert not set(before) & set(after)
    np.testing.assert_array_equal(resumed["mixture"], full["mixture"])
    assert [r["id"] for r in resumed["history"]] == [r["id"] for r in full["history"]]
    again: list = []
    _search(tmp_path, again)
    assert again == []  # a finished search evaluates nothing more


def test_rows_in_any_order_give_the_same_proposals_and_mixture(full_search):
    found, _, path = full_search
    rows = ScoresTable(path / "scores.jsonl").rows()
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    shuffled.append(json.loads(json.dumps(shuffled[0])))  # a duplicate, as a re-merged shard
    for r in (1, 2):
        a = round_proposals(r, rows, NAMES, PRIOR, CONFIG, 0, OBJECTIVE)
        b = round_proposals(r, shuffled, NAMES, PRIOR, CONFIG, 0, OBJECTIVE)
        assert a == b
        assert [p["id"] for p in a] == [row["id"] for row in rows if row["round"] == r]
    selected = final_selection(shuffled, NAMES, PRIOR, CONFIG, 0, OBJECTIVE)
    np.testing.assert_array_equal(selected["mixture"], found["mixture"])
    assert selected["proxies_evaluated"] == 14


def test_a_table_from_another_seed_is_refused(tmp_path):
    with pytest.raises(Interrupt):
        _search(tmp_path, [], fail_after=3)
    with pytest.raises(SearchError, match="not a proposal of this search") as err:
        _search(tmp_path, [], seed=1)
    assert "\n" not in str(err.value)
