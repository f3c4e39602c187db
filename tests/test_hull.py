"""merge.weights: hull: the search stays where every component weight c = M^-1 d is >= 0; the
selection reports how far the chosen mixture and its pool extrapolate; validate splits fidelity
into mixtures inside and outside the hull."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest

from demix.config import SearchConfig, parse_config
from demix.fidelity import fidelity
from demix.mixtures import (
    Mixing,
    in_hull,
    negative_share,
    prior_vector,
)
from demix.search import ScoresTable, mixture_id, propose_round, run_search, sample_mixtures
from demix.search.objective import Objective
from demix.search.rounds import candidate_pool
from demix.stages import describe_selection
from demix.stages.validate import fidelity_by_hull

from .conftest import smoke_config_dict

NAMES = ["general", "code", "math"]  # the smoke config's datasets, general named
DATA = SimpleNamespace(names=NAMES, token_prior={"general": 0.6, "code": 0.3, "math": 0.1})
SEARCH = SearchConfig(n=8, rounds=2, candidates=2000, top_k=16)


def _mixing(config) -> Mixing:
    return Mixing.of(config.data, config.train, config.merge, DATA)


def _config(tmp_path, weights: str, general: str | None = "general", **merge):
    raw = smoke_config_dict(tmp_path)
    raw["data"]["general"] = general
    raw["merge"] = {"weights": weights, **merge}
    return parse_config(raw)


@pytest.mark.parametrize("general", ["general", "math", None])
def test_hull_pools_never_extrapolate_and_data_pools_do(tmp_path, general):
    hull = _config(tmp_path, "hull", general)
    data = _config(tmp_path, "data", general)
    floor = _mixing(hull).floor
    assert _mixing(data).floor is None
    prior = prior_vector(DATA)
    for seed in range(8):
        for size in (1, 40, 3000):
            rows = sample_mixtures(
                prior, size, np.random.default_rng(seed), SEARCH.sampler, floor=floor
            )
            assert rows.shape == (size, 3)
            np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-12)
            assert _mixing(hull).merge_weights(rows).min() >= -1e-9
            assert negative_share(_mixing(hull).merge_weights(rows)) == 0.0
            # on the data grid and distinct, like any pool
            units = np.rint(rows / SEARCH.sampler.grid)
            np.testing.assert_allclose(rows, units * SEARCH.sampler.grid, atol=1e-12)
            assert len({mixture_id(r) for r in rows}) == size
    # without the floor the same sampler draws mixtures that need negative component weights
    pool = sample_mixtures(prior, 3000, np.random.default_rng(0), SEARCH.sampler)
    assert negative_share(_mixing(data).merge_weights(pool)) > 0.3
    # a round's pool and its proposals stay inside too
    scored = sample_mixtures(prior, 8, np.random.default_rng(9), SEARCH.sampler, floor=floor)
    pool = candidate_pool(1, prior, scored, SEARCH, 0, floor=floor)
    assert _mixing(hull).merge_weights(pool).min() >= -1e-9
    scores = -np.abs(scored[:, 1] - 0.3)
    proposed = propose_round(1, 4, prior, scored, scores, SEARCH, 0, floor=floor)
    assert _mixing(hull).merge_weights(proposed).min() >= -1e-9


def test_the_default_mapping_merges_with_the_data_mixture(tmp_path):
    """Without merge.weights the proxy of mixture d merges the components with c = d (the
    authors' mapping, the one that measured best): never a negative weight, the whole simplex
    searched; `data` gives another proxy for the same mixture."""
    raw = smoke_config_dict(tmp_path)
    raw.pop("merge", None)
    default = parse_config(raw)
    assert default.merge.weights == "component"
    pool = sample_mixtures(prior_vector(DATA), 500, np.random.default_rng(0), SEARCH.sampler)
    np.testing.assert_array_equal(_mixing(default).merge_weights(pool), pool)
    assert negative_share(_mixing(default).merge_weights(pool)) == 0.0
    assert _mixing(default).floor is None
    mapped = _config(tmp_path, "data")
    data = _mixing(mapped).merge_weights(pool)
    assert np.abs(data - pool).max() > 0.1


def test_hull_pools_are_seeded(tmp_path):
    config = _config(tmp_path, "hull", None)
    floor = _mixing(config).floor
    prior = prior_vector(DATA)

    def pool(seed: int) -> np.ndarray:
        return sample_mixtures(prior, 500, np.random.default_rng(seed), SEARCH.sampler, floor=floor)

    np.testing.assert_array_equal(pool(3), pool(3))
    assert not np.array_equal(pool(3), pool(4))


def test_a_hull_search_scores_and_chooses_inside_the_hull(tmp_path):
    config = _config(tmp_path, "hull")
    objective = Objective.from_config("ranking", {"all": ["t"]}, None)

    def evaluate(w: np.ndarray) -> dict:
        value = -float(np.abs(w - [0.5, 0.2, 0.3]).sum())
        return {"t": {"metric": "m", "value": value, "stderr": 0.0, "higher_is_better": True}}

    found = run_search(
        NAMES,
        prior_vector(DATA),
        SEARCH,
        0,
        evaluate,
        objective,
        ScoresTable(tmp_path / "scores.jsonl"),
        floor=_mixing(config).floor,
    )
    scored = np.array([[row["weights"][n] for n in NAMES] for row in found["history"]])
    assert len(scored) == 8 + 4
    assert in_hull(_mixing(config).merge_weights(scored)).all()
    assert in_hull(_mixing(config).merge_weights(found["pool"])).all()
    selection = describe_selection(config, DATA, found, None)
    assert selection["min_component_weight"] >= -1e-9
    assert selection["pool_negative_share"] == 0.0


def test_negative_share_and_in_hull_on_a_constructed_pool():
    components = np.array(
        [[0.5, 0.5, 0.0], [-0.2, 0.6, 0.6], [1.0, 0.0, 0.0], [0.3, 0.8, -1e-12], [1.2, -0.1, -0.1]]
    )
    np.testing.assert_array_equal(in_hull(components), [True, False, True, True, False])
    assert negative_share(components) == pytest.approx(2 / 5)
    assert negative_share(np.zeros((0, 3))) == 0.0


def test_the_selection_reports_and_warns_about_extrapolation(tmp_path, caplog):
    config = _config(tmp_path, "data")
    # general weight 0.2 < general_ratio 0.5: c_general = (0.2 - 0.5) / 0.5 = -0.6
    pool = np.array([[0.2, 0.4, 0.4], [0.6, 0.2, 0.2], [0.7, 0.3, 0.0], [0.4, 0.3, 0.3]])
    found = {
        "mixture": pool[0],
        "pool": pool,
        "rounds": 1,
        "proxies_evaluated": 4,
        "predictor_spearman": None,
        "predicted_score": 0.0,
        "history": [],
    }
    with caplog.at_level(logging.WARNING, logger="demix.stages"):
        selection = describe_selection(config, DATA, found, None)
    assert selection["min_component_weight"] == pytest.approx(-0.6)
    assert selection["component_weights"] == pytest.approx(
        {"general": -0.6, "code": 0.8, "math": 0.8}
    )
    assert selection["pool_negative_share"] == pytest.approx(2 / 4)
    assert (
        "extrapolates beyond the trained components (min component weight -0.6000)" in caplog.text
    )
    assert "merge.weights: hull" in caplog.text
    # c = d under `component`: nothing extrapolates, nothing is warned about
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="demix.stages"):
        selection = describe_selection(_config(tmp_path, "component"), DATA, found, None)
    assert selection["min_component_weight"] == pytest.approx(0.2)
    assert selection["pool_negative_share"] == 0.0 and not caplog.text


def _result(value: float) -> dict:
    return {"t": {"metric": "m", "value": value, "stderr": 0.01, "higher_is_better": True}}


def test_validate_splits_fidelity_at_the_hull(tmp_path):
    config = _config(tmp_path, "data")
    mix = _mixing(config).matrix
    # general weight >= 0.5 is inside the hull (general named, general_ratio 0.5)
    inside = np.array(
        [[0.5, 0.5, 0.0], [0.6, 0.2, 0.2], [0.7, 0.1, 0.2], [0.8, 0.1, 0.1], [1.0, 0.0, 0.0]]
    )
    outside = np.array([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5], [0.4, 0.6, 0.0]])
    mixtures = np.vstack([inside, outside])
    truth = mixtures[:, 1] - mixtures[:, 2]
    references = [_result(v) for v in truth]
    # proxies track the references inside the hull and run the wrong way outside
    proxies = [_result(v if k < len(inside) else -v) for k, v in enumerate(truth)]
    categories = {"all": ["t"]}
    tags, split = fidelity_by_hull(NAMES, mixtures, mix, proxies, references, categories)
    assert [t["in_hull"] for t in tags] == [True] * 5 + [False] * 3
    assert tags[0]["min_component_weight"] == pytest.approx(0.0, abs=1e-12)
    assert tags[5]["min_component_weight"] == pytest.approx(-1.0)  # the code vertex
    assert split["counts"] == {"in_hull": 5, "out_of_hull": 3}
    assert split["out_of_hull"] is None  # under 4 mixtures: not measured
    expected = fidelity(NAMES, inside, proxies[:5], references[:5], categories)
    for key in ("n", "proxy_scores", "reference_scores"):  # fidelity() on those rows alone
        assert split["in_hull"][key] == expected[key]
    assert split["in_hull"]["categories"]["aggregate"]["proxy"]["rho"] == pytest.approx(1.0)
    # one more outside mixture and the out-of-hull side is measured
    mixtures = np.vstack([mixtures, [[0.1, 0.1, 0.8]]])
    references.append(_result(-0.7))
    proxies.append(_result(0.7))
    _, split = fidelity_by_hull(NAMES, mixtures, mix, proxies, references, categories)
    assert split["counts"]["out_of_hull"] == 4
    assert split["out_of_hull"]["n"] == 4
    assert split["out_of_hull"]["categories"]["aggregate"]["proxy"]["rho"] == pytest.approx(-1.0)


@pytest.mark.parametrize("weights", ["data", "hull"])
def test_validate_references_lie_where_the_search_looks(tmp_path, weights):
    """Under hull the references are drawn inside it, with the components' training mixes as
    corners (a TIES merge, which refuses c < 0, can build every one of their proxies); under
    data they include the simplex's vertices, outside it."""
    from demix.stages.validate import reference_mixtures

    config = _config(tmp_path, weights, method="ties" if weights == "hull" else "linear")
    refs = reference_mixtures(config, DATA)
    components = _mixing(config).merge_weights(refs)
    corners = np.eye(3) if weights == "data" else _mixing(config).matrix.T
    for corner in corners:
        assert np.abs(refs - corner).sum(axis=1).min() < 1e-9
    if weights == "hull":
        assert in_hull(components).all()
    else:
        assert not in_hull(components).all()
