"""Fidelity metrics on hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from demix.fidelity import (
    AGGREGATE,
    capability_recovery,
    fidelity,
    loo_linear_predictions,
    regret,
    spearman,
    task_signal,
    top_quarter_spearman,
)


def test_spearman_hand_computed():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1,2,3,4) vs (1,3,2,4): 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert math.isnan(spearman([1, 2], [1, 2]))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_top_quarter_uses_the_best_by_reference():
    reference = np.arange(12, dtype=float)  # best quarter: indices 11, 10, 9
    predicted = np.zeros(12)
    predicted[[9, 10, 11]] = [3.0, 2.0, 1.0]  # reversed within the top
    predicted[:9] = np.arange(9)[::-1] * 10  # the rest would give a different answer
    assert top_quarter_spearman(predicted, reference) == pytest.approx(-1.0)


def test_regret():
    reference = [0.2, 0.9, 0.5]
    assert regret([0.1, 0.8, 0.3], reference) == pytest.approx(0.0)
    assert regret([0.9, 0.1, 0.3], reference) == pytest.approx(0.7)


def _result(value: float, higher: bool = True) -> dict:
    return {"value": value, "higher_is_better": higher, "stderr": 0.0, "metric": "m", "n": 1}


def test_capability_recovery_conventions():
    categories = {"acc": ["a"], "loss": ["l"]}
    proxies = [
        {"a": _result(0.4), "l": _result(3.0, False)},
        {"a": _result(0.5), "l": _result(3.0, False)},
    ]
    refs = [
        {"a": _result(0.5), "l": _result(2.0, False)},
        {"a": _result(0.5), "l": _result(2.0, False)},
    ]
    crr = capability_recovery(proxies, refs, categories)
    assert crr["acc"] == pytest.approx(0.9 / 1.0)  # sum proxy / sum reference
    assert crr["loss"] == pytest.approx(4.0 / 6.0)  # loss: sum reference / sum proxy
    assert crr["mean"] == pytest.approx((0.9 + 4 / 6) / 2)


def test_loo_linear_predicts_an_exactly_linear_target():
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(3), size=10)
    target = w @ np.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(loo_linear_predictions(w, target), target, atol=1e-10)


def test_fidelity_separates_a_proxy_from_the_weights_only_predictor():
    """References depend non-linearly on the weights; proxies track them, a linear fit cannot."""
    rng = np.random.default_rng(1)
    names = ["a", "b", "c"]
    w = rng.dirichlet(np.ones(3), size=16)
    truth = -((w[:, 0] - 0.4) ** 2) - ((w[:, 1] - 0.3) ** 2)  # peaked inside the simplex
    categories = {"a": ["t1"], "other": ["t2"]}
    refs = [{"t1": _result(t), "t2": _result(2 * t)} for t in truth]
    proxies = [{"t1": _result(t + 1e-4 * k), "t2": _result(2 * t)} for k, t in enumerate(truth)]
    out = fidelity(names, w, proxies, refs, categories)
    assert out["n"] == 16
    agg = out["categories"][AGGREGATE]
    assert agg["proxy"]["rho"] > 0.95 and agg["proxy"]["regret"] == pytest.approx(0.0, abs=1e-3)
    assert agg["trivial_linear"]["rho"] < agg["proxy"]["rho"]
    assert agg["proxy_beats_trivial"]
    # a category named like a dataset also gets that dataset's weight as a predictor
    assert out["categories"]["a"]["trivial_weight"] is not None
    assert out["categories"]["other"]["trivial_weight"] is None
    # a proxy that is just the weights never beats the weights-only predictors
    weightish = [{"t1": _result(x), "t2": _result(x)} for x in w[:, 0]]
    lazy = fidelity(names, w, weightish, refs, categories)
    assert not lazy["categories"]["a"]["proxy_beats_trivial"]


def test_task_signal_hand_computed():
    """spread = sample sd of the reference values, stderr = mean finite stderr, snr = ratio;
    rho compares proxy and reference values per task."""
    refs = [
        {"loud": {**_result(v), "stderr": e}, "quiet": {**_result(q), "stderr": 0.5}}
        for v, e, q in [(1.0, 0.1, 0.30), (2.0, 0.3, 0.31), (3.0, None, 0.29)]
    ]
    proxies = [
        {"loud": _result(v), "quiet": _result(q)}
        for v, q in [(10.0, 0.2), (30.0, 0.1), (20.0, 0.3)]
    ]
    out = task_signal(proxies, refs, ["loud", "quiet"])
    assert out["loud"]["spread"] == pytest.approx(1.0)
    assert out["loud"]["stderr"] == pytest.approx(0.2)  # the missing stderr is left out
    assert out["loud"]["snr"] == pytest.approx(5.0)
    assert out["loud"]["rho"] == pytest.approx(0.5)
    assert out["quiet"]["spread"] == pytest.approx(0.01)
    assert out["quiet"]["snr"] == pytest.approx(0.02)
    assert out["quiet"]["rho"] == pytest.approx(-1.0)
    # fidelity() carries it per task, once per task even when categories share one
    result = fidelity(
        ["a", "b", "c"],
        np.eye(3),
        proxies,
        refs,
        {"x": ["loud", "quiet"], "y": ["quiet"]},
    )
    assert list(result["tasks"]) == ["loud", "quiet"]
    assert result["tasks"]["quiet"]["snr"] == pytest.approx(0.02)


def test_a_task_without_signal_is_warned_about():
    from demix.recipes.validate import fidelity_warnings

    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(2), size=6)
    refs = [{"t": {**_result(x), "stderr": 1.0}} for x in w[:, 0]]  # spread ~0.3 < stderr 1
    result = fidelity(["a", "b"], w, refs, refs, {"a": ["t"]})
    result["relative_delta_norms"] = {"a": 0.01, "b": 0.01}
    (warning,) = [m for m in fidelity_warnings(result) if "signal/noise" in m]
    assert "'t'" in warning and "evaluate.limit" in warning
    for r in refs:
        r["t"]["stderr"] = 0.01
    loud = fidelity(["a", "b"], w, refs, refs, {"a": ["t"]})
    loud["relative_delta_norms"] = result["relative_delta_norms"]
    assert not [m for m in fidelity_warnings(loud) if "signal/noise" in m]
