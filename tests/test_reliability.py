"""Reliability (references trained twice), paired proxy-vs-proxy comparisons, the matched-fidelity
token ratio and the headline over seeds, on hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from demix.fidelity import AGGREGATE, compare_predictors, reliability, seed_noise
from demix.report.reproduce import _over_seeds, headline, l1
from demix.stages.reproduce import matched_fidelity

CATEGORIES = {"a": ["ta"], "b": ["tb"]}


def _results(a_values, b_values) -> list[dict]:
    def task(v):
        return {"value": float(v), "higher_is_better": True, "stderr": 0.0, "metric": "m", "n": 1}

    return [{"ta": task(a), "tb": task(b)} for a, b in zip(a_values, b_values, strict=True)]


def test_reliability_hand_computed():
    references = _results([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    # replicates: category a swaps the middle pair (rho 0.9), category b is reproduced exactly
    replicates = _results([1, 3, 2, 4, 5], [5, 4, 3, 2, 1])
    # proxies: a exact, b with the first and last swapped (rho 1 - 6 * 32 / 120 = -0.6)
    proxies = _results([1, 2, 3, 4, 5], [1, 4, 3, 2, 5])
    rel = reliability(proxies, references, replicates, CATEGORIES, resamples=400)
    a, b = rel["categories"]["a"], rel["categories"]["b"]
    assert rel["k"] == 5
    assert a["retest"]["rho"] == pytest.approx(0.9) and b["retest"]["rho"] == pytest.approx(1.0)
    assert a["ceiling"] == pytest.approx(math.sqrt(0.9))
    assert a["proxy"]["rho"] == pytest.approx(1.0) and b["proxy"]["rho"] == pytest.approx(-0.6)
    assert a["proxy_over_retest"]["value"] == pytest.approx(1 / 0.9)
    assert rel["macro"]["retest"]["rho"] == pytest.approx(0.95)
    assert rel["macro"]["proxy"]["rho"] == pytest.approx(0.2)
    assert rel["macro"]["proxy_over_retest"]["value"] == pytest.approx(0.2 / 0.95)
    # b is reproduced exactly: every defined resample agrees perfectly
    assert b["retest"]["rho_ci"] == pytest.approx([1.0, 1.0])
    low, high = a["retest"]["rho_ci"]
    assert low <= 0.9 <= high and high <= 1.0
    with pytest.raises(ValueError, match="one proxy and one reference per replicate"):
        reliability(proxies[:4], references, replicates, CATEGORIES)


def test_seed_noise_separates_the_seed_from_the_documents():
    references = _results([1.0, 2.0, 3.0, 4.0], [0, 0, 0, 0])
    replicates = _results([1.1, 1.9, 3.1, 3.9], [0, 0, 0, 0])
    spread = float(np.std([1.0, 2.0, 3.0, 4.0], ddof=1))
    signal = {"ta": {"spread": spread, "paired_stderr": 0.06}}
    noise = seed_noise(references, replicates, signal)["ta"]
    assert noise["retest_noise"] == pytest.approx(0.1)  # every difference is 0.1
    assert noise["seed_sd"] == pytest.approx(math.sqrt((0.01 - 0.0036) / 2))
    assert noise["snr_seeds"] == pytest.approx(spread / 0.1)
    # the documents' noise alone explains the differences: no seed variance left
    signal["ta"]["paired_stderr"] = 0.2
    assert seed_noise(references, replicates, signal)["ta"]["seed_sd"] == 0.0


def test_compare_predictors_is_paired_and_signed():
    references = _results([1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5])
    exact = _results([1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5])
    reversed_ = _results([6, 5, 4, 3, 2, 1], [5, 6, 3, 4, 1, 2])
    out = compare_predictors(exact, reversed_, references, CATEGORIES, resamples=300)
    for score in ("a", "b", AGGREGATE, "macro"):
        assert out[score]["diff"] == pytest.approx(2.0)
        assert out[score]["verdict"] == "better"
    back = compare_predictors(reversed_, exact, references, CATEGORIES, resamples=300)
    assert back["macro"]["diff"] == pytest.approx(-2.0) and back["macro"]["verdict"] == "worse"
    same = compare_predictors(exact, exact, references, CATEGORIES, resamples=300)
    assert same["a"]["diff"] == 0.0 and same["a"]["verdict"] == "inconclusive"


def _rung(fraction: float, verdict: str) -> dict:
    return {
        "fraction": fraction,
        "tokens_per_proxy": fraction * 1000,
        "merged_minus_trained": {"macro": {"verdict": verdict}},
    }


@pytest.mark.parametrize(
    ("verdicts", "fraction", "bound"),
    [
        # merged worse than the 1/2 budget, indistinguishable from 1/4 and 1/8
        ({0.5: "worse", 0.25: "inconclusive", 0.125: "inconclusive"}, 0.125, "at_most"),
        # told apart below: better than 1/8, matched at 1/4
        ({0.5: "worse", 0.25: "inconclusive", 0.125: "better"}, 0.25, "matched"),
        ({0.5: "worse", 0.25: "worse", 0.125: "worse"}, 0.125, "below"),
        ({0.5: "better", 0.25: "better", 0.125: "better"}, 0.5, "above"),
        ({0.5: "better", 0.25: "worse", 0.125: "worse"}, 0.125, "undetermined"),
    ],
)
def test_matched_fidelity_picks_the_smallest_indistinguishable_budget(verdicts, fraction, bound):
    rungs = [_rung(f, v) for f, v in verdicts.items()]
    matched = matched_fidelity(rungs, proxies=21, merge_tokens=3000)
    assert matched["fraction"] == fraction and matched["bound"] == bound
    # 21 trained proxies of fraction x 1000 tokens against 3 components of 1000
    assert matched["ratio"] == pytest.approx(21 * fraction * 1000 / 3000)
    assert matched_fidelity([], 21, 3000) is None


def test_over_seeds_one_seed_keeps_its_interval_several_widen_by_the_larger_variance():
    assert _over_seeds([0.5], [[0.2, 0.7]]) == {"mean": 0.5, "ci_low": 0.2, "ci_high": 0.7}
    # within-seed variance dominates: intervals of width 3.92 -> variance 1 each
    z = 1.959964
    tight = _over_seeds([0.1, 0.2, 0.3], [[-z, z]] * 3)
    assert tight["mean"] == pytest.approx(0.2)
    assert tight["ci_high"] - tight["mean"] == pytest.approx(z * math.sqrt(1 / 3))
    # seeds that disagree more than their intervals say: the between-seed variance counts
    spread = _over_seeds([0.0, 1.0, 2.0], [[v - 0.01, v + 0.01] for v in (0.0, 1.0, 2.0)])
    assert spread["ci_high"] - spread["mean"] == pytest.approx(z * math.sqrt(1.0 / 3))


def _seed(seed: int, chosen: dict, rho: float, verdict: str) -> dict:
    interval = [rho - 0.1, rho + 0.1]
    entry = {"rho": rho, "rho_ci": interval}
    return {
        "seed": seed,
        "fidelity": {
            "macro": {"proxy": entry},
            "categories": {AGGREGATE: {"proxy": entry}},
            "crr": {"mean": float("nan")},
            "crr_ci": {"mean": [float("nan"), float("nan")]},
        },
        "mixtures": {"chosen_merge": chosen},
        "verdicts": {
            "chosen_merge": {
                b: {"objective": {"verdict": verdict}} for b in ("token_prior", "uniform")
            }
        },
        "matched_fidelity": None,
    }


def test_headline_contract():
    seeds = [
        _seed(0, {"x": 0.6, "y": 0.4}, 0.5, "better"),
        _seed(1, {"x": 0.5, "y": 0.5}, 0.7, "inconclusive"),
        _seed(2, {"x": 0.7, "y": 0.3}, 0.6, "worse"),
    ]
    head = headline(seeds)
    assert head["seeds"] == 3
    for key in ("macro_rho", "aggregate_rho", "reference_retest_rho", "crr_improvement"):
        assert set(head[key]) == {"mean", "ci_low", "ci_high"}
    assert head["macro_rho"]["mean"] == pytest.approx(0.6)
    assert head["macro_rho"]["ci_low"] < 0.6 < head["macro_rho"]["ci_high"]
    assert math.isnan(head["reference_retest_rho"]["mean"])  # no replicates were trained
    assert math.isnan(head["matched_fidelity_token_ratio"])  # no budget ladder
    # pairwise L1: 0.2, 0.2, 0.4
    assert head["search_l1_between_seeds"] == pytest.approx(0.8 / 3)
    assert head["verdicts"]["token_prior"] == ["better", "inconclusive", "worse"]
    assert l1({"x": 0.6, "y": 0.4}, {"x": 0.7, "y": 0.3}) == pytest.approx(0.2)
