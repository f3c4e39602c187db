"""search.max_epochs: no searched or chosen mixture gives a dataset more weight than its train
tokens allow at the final budget (max_epochs x train tokens / train.final.tokens)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from demix.config import SamplerConfig, SearchConfig, parse_config
from demix.errors import ConfigError, MixtureError
from demix.export import mixture_export
from demix.mixtures import Mixing, epoch_caps, epochs, max_epochs, prior_vector, search_cap
from demix.search import ScoresTable, propose_round, run_search, sample_mixtures
from demix.search.objective import Objective
from demix.search.rounds import candidate_pool

from .conftest import smoke_config_dict

NAMES = ["general", "code", "math"]  # the smoke config's datasets
TRAIN = {"general": 60_000, "code": 30_000, "math": 2_000}
DATA = SimpleNamespace(
    names=NAMES,
    train_tokens=TRAIN,
    full_train_tokens=TRAIN,
    token_prior={n: t / sum(TRAIN.values()) for n, t in TRAIN.items()},
)
FINAL = 40_000  # 20 epochs of math at its token prior (2.2%)
SEARCH = SearchConfig(n=8, rounds=2, candidates=2000, top_k=16)
MATH = NAMES.index("math")


def _mixing(config) -> Mixing:
    return Mixing.of(config.data, config.train, config.merge, DATA)


def _cap(config):
    """search_cap of the config's max_epochs over DATA, under its mixing's floor."""
    return search_cap(config.search, config.train, DATA, _mixing(config).floor)


def _config(tmp_path, max_epochs, weights: str = "data", general: str | None = "general"):
    raw = smoke_config_dict(tmp_path)
    raw["train"]["final"]["tokens"] = FINAL
    raw["data"]["general"] = general
    raw["merge"] = {"weights": weights}
    raw["search"] = {"max_epochs": max_epochs}
    return parse_config(raw)


def _epochs_of(rows: np.ndarray) -> np.ndarray:
    """Epochs of each dataset at the final budget, per row."""
    return np.atleast_2d(rows) * FINAL / np.array([TRAIN[n] for n in NAMES])


def test_one_epoch_of_a_small_dataset_caps_its_weight_in_every_sampled_row(tmp_path):
    config = _config(tmp_path, {"math": 1})
    cap = _cap(config)
    # math's cap is 2,000 / 40,000 = 0.05, under the sampler's own 4 x prior (0.087)
    np.testing.assert_allclose(cap, [1.0, 1.0, 0.05])
    assert 4 * DATA.token_prior["math"] > cap[MATH]
    prior = prior_vector(DATA)
    for seed in range(20):
        rows = sample_mixtures(prior, 2000, np.random.default_rng(seed), SEARCH.sampler, cap=cap)
        assert rows.shape == (2000, 3)
        assert (_epochs_of(rows)[:, MATH] <= 1 + 1e-12).all()
        assert rows[:, MATH].max() == pytest.approx(0.05)  # the cap binds
    # without it the sampler gives math up to 4 x its prior: 1.7 epochs
    free = sample_mixtures(prior, 2000, np.random.default_rng(0), SEARCH.sampler)
    assert _epochs_of(free)[:, MATH].max() > 1.5


def test_rounding_to_the_grid_never_lifts_a_weight_over_its_cap():
    coarse = SamplerConfig(grid=0.1, cap_factor=10)
    cap = np.array([1.0, 1.0, 0.25])  # between grid points: 0.2 is the most on the grid
    rows = sample_mixtures(
        np.array([0.4, 0.4, 0.2]), 30, np.random.default_rng(0), coarse, cap=cap, allow_fewer=True
    )
    assert len(rows) > 10 and rows[:, 2].max() == pytest.approx(0.2)
    assert (rows <= cap).all()


def test_a_per_dataset_mapping_caps_only_the_datasets_it_names(tmp_path):
    config = _config(tmp_path, {"math": 1, "code": 0.5})
    assert max_epochs(config.search, DATA) == {"general": None, "code": 0.5, "math": 1}
    assert epoch_caps(config.train, config.search, DATA) == {
        "general": None,
        "code": 0.375,
        "math": 0.05,
    }
    rows = sample_mixtures(
        prior_vector(DATA),
        5000,
        np.random.default_rng(1),
        SEARCH.sampler,
        cap=_cap(config),
    )
    assert rows[:, 1].max() == pytest.approx(0.375) and rows[:, MATH].max() == pytest.approx(0.05)
    assert rows[:, 0].max() > 0.95  # general is not capped
    # one number caps every dataset: general's 60,000 tokens allow it a weight up to 1
    config = _config(tmp_path, 1)
    assert epoch_caps(config.train, config.search, DATA) == {
        "general": 1.0,
        "code": 0.75,
        "math": 0.05,
    }


def test_a_rounds_pool_and_proposals_stay_under_the_cap(tmp_path):
    config = _config(tmp_path, {"math": 1})
    cap = _cap(config)
    prior = prior_vector(DATA)
    scored = sample_mixtures(prior, 8, np.random.default_rng(9), SEARCH.sampler, cap=cap)
    scores = -np.abs(scored[:, MATH] - 0.3)  # the objective wants more math than it may get
    for seed in range(5):
        pool = candidate_pool(1, prior, scored, SEARCH, seed, cap=cap)
        assert len(pool) == SEARCH.candidates
        assert (_epochs_of(pool)[:, MATH] <= 1 + 1e-12).all()
        proposed = propose_round(1, 4, prior, scored, scores, SEARCH, seed, cap=cap)
        assert (_epochs_of(proposed)[:, MATH] <= 1 + 1e-12).all()
    # the same seed gives the same pool
    np.testing.assert_array_equal(
        candidate_pool(1, prior, scored, SEARCH, 0, cap=cap),
        candidate_pool(1, prior, scored, SEARCH, 0, cap=cap),
    )


def _evaluate(w: np.ndarray) -> dict:
    value = float(w[MATH])  # the more math the better
    return {"t": {"metric": "m", "value": value, "stderr": 0.0, "higher_is_better": True}}


def _search(path, cap: np.ndarray | None) -> dict:
    return run_search(
        NAMES,
        prior_vector(DATA),
        SEARCH,
        0,
        _evaluate,
        Objective.from_config("ranking", {"all": ["t"]}, None),
        ScoresTable(path / "scores.jsonl"),
        cap=cap,
    )


def test_the_chosen_mixture_of_a_search_respects_the_cap(tmp_path):
    config = _config(tmp_path, {"math": 1})
    cap = _cap(config)
    found = _search(tmp_path / "capped", cap)
    scored = np.array([[row["weights"][n] for n in NAMES] for row in found["history"]])
    assert len(scored) == 8 + 4
    assert (_epochs_of(scored)[:, MATH] <= 1 + 1e-12).all()
    assert (_epochs_of(found["pool"])[:, MATH] <= 1 + 1e-12).all()
    # the mean of the top rows is under the cap and, as the objective pulls, at it
    assert found["mixture"].sum() == pytest.approx(1.0, abs=1e-12)
    assert 0.95 < _epochs_of(found["mixture"])[0, MATH] <= 1 + 1e-12
    # the same search without the cap chooses more math than one epoch
    assert _epochs_of(_search(tmp_path / "free", None)["mixture"])[0, MATH] > 1.5
    # and the same seed chooses the same mixture
    again = _search(tmp_path / "again", cap)
    np.testing.assert_array_equal(again["mixture"], found["mixture"])


def test_caps_that_cannot_hold_a_mixture_are_a_one_line_error(tmp_path):
    # 0.3 epochs of 92,000 tokens is 27,600 of the 40,000 final tokens
    config = _config(tmp_path, 0.3)
    with pytest.raises(MixtureError, match="under 1") as err:
        _cap(config)
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in NAMES)
    assert "takes 0.4348 epochs" in message  # 40,000 / 92,000
    # the sampler drops cap_factor caps that cannot hold a mixture (0.5 x prior), never `cap`
    rows = sample_mixtures(
        prior_vector(DATA),
        2000,
        np.random.default_rng(0),
        SamplerConfig(cap_factor=0.5),
        cap=np.array([1.0, 1.0, 0.05]),
    )
    assert rows[:, 0].max() > 0.5 * DATA.token_prior["general"]
    assert rows[:, MATH].max() == pytest.approx(0.05)
    # and refuses such caps, rather than dropping them
    with pytest.raises(MixtureError, match="sum to 0.69"):
        sample_mixtures(
            prior_vector(DATA),
            5,
            np.random.default_rng(0),
            SEARCH.sampler,
            cap=np.array([0.45, 0.225, 0.015]),
        )


def test_a_cap_under_the_hull_floor_is_an_error(tmp_path):
    # every hull mixture holds general_ratio 0.5 of general: 0.2 epochs allow it 0.3
    config = _config(tmp_path, {"general": 0.2}, weights="hull")
    with pytest.raises(MixtureError, match="general_ratio") as err:
        _cap(config)
    assert "'general': 0.3333" in str(err.value) and "\n" not in str(err.value)
    # a floor of 0.5 x the prior: math holds 0.0109, and 0.1 epochs allow 0.005
    config = _config(tmp_path, {"math": 0.1}, weights="hull", general=None)
    with pytest.raises(MixtureError, match="'math'"):
        _cap(config)
    # caps above the floor hold: rows keep both
    config = _config(tmp_path, {"math": 1, "code": 1}, weights="hull", general=None)
    floor = _mixing(config).floor
    cap = _cap(config)
    rows = sample_mixtures(
        prior_vector(DATA), 2000, np.random.default_rng(2), SEARCH.sampler, floor=floor, cap=cap
    )
    assert (rows >= floor - 1e-12).all() and (rows <= cap + 1e-12).all()
    assert rows[:, MATH].max() == pytest.approx(0.05)


def test_unknown_datasets_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"search\.max_epochs\.nope: not one of the datasets"):
        _config(tmp_path, {"math": 1, "nope": 2})
    with pytest.raises(ConfigError, match="search.max_epochs"):
        _config(tmp_path, 0)
    raw = smoke_config_dict(tmp_path)
    raw["data"]["max_tokens"] = {"nope": 1000}
    with pytest.raises(ConfigError, match=r"data: max_tokens\.nope: not one of the datasets"):
        parse_config(raw)


def test_export_and_summary_share_the_epochs():
    mixture = {"general": 0.5, "code": 0.45, "math": 0.05}
    assert epochs(mixture, TRAIN, FINAL) == pytest.approx(
        {"general": 1 / 3, "code": 0.6, "math": 1.0}
    )
    export = mixture_export(NAMES, mixture, mixture, DATA.token_prior, TRAIN, FINAL)
    assert export["epochs"] == epochs(mixture, TRAIN, FINAL)
    assert epochs({"a": 0.5}, {"a": 0}, FINAL) == {"a": None}


def test_caps_count_the_whole_dataset_when_curation_kept_a_sample(tmp_path):
    """Under data.max_tokens the curated tokens are a sample; a real run repeats the whole
    dataset, so the cap follows its estimated size, not the sample's."""
    config = _config(tmp_path, {"math": 1})
    sampled = SimpleNamespace(**{**vars(DATA), "full_train_tokens": {**TRAIN, "math": 8_000}})
    assert epoch_caps(config.train, config.search, DATA)["math"] == pytest.approx(2_000 / FINAL)
    assert epoch_caps(config.train, config.search, sampled)["math"] == pytest.approx(8_000 / FINAL)
