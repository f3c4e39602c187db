"""Fidelity metrics on hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from demix.fidelity import AGGREGATE, fidelity, paired_stderr, task_signal
from demix.ranking import (
    bootstrap_ci,
    loo_linear_predictions,
    loo_quadratic_predictions,
    paired_difference,
    regret,
    spearman,
    spearman_rows,
    top_quarter_rows,
    top_quarter_spearman,
)
from demix.recovery import capability_recovery


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
    """Accuracies: sum proxy / sum reference. Losses: the share of the base's improvement."""
    categories = {"acc": ["a"], "loss": ["l"]}
    proxies = [
        {"a": _result(0.4), "l": _result(3.0, False)},
        {"a": _result(0.5), "l": _result(3.0, False)},
    ]
    refs = [
        {"a": _result(0.5), "l": _result(2.0, False)},
        {"a": _result(0.5), "l": _result(2.0, False)},
    ]
    base = {"a": _result(0.25), "l": _result(4.0, False)}
    crr = capability_recovery(proxies, refs, categories, base)
    assert crr["acc"] == pytest.approx(0.9 / 1.0)  # sum proxy / sum reference, base unused
    assert crr["loss"] == pytest.approx((4.0 - 3.0) / (4.0 - 2.0))  # half the improvement
    assert crr["mean"] == pytest.approx((0.9 + 0.5) / 2)
    # without the base the improvement is unknown, and says so
    no_base = capability_recovery(proxies, refs, categories)
    assert no_base["acc"] == pytest.approx(0.9) and math.isnan(no_base["loss"])
    assert math.isnan(no_base["mean"])


def test_improvement_crr_is_0_at_the_base_and_1_at_the_reference():
    categories = {"loss": ["l", "m"]}
    refs = [{"l": _result(2.0 + k, False), "m": _result(1.0, False)} for k in range(3)]
    base = {"l": _result(5.0, False), "m": _result(3.0, False)}
    as_base = [base] * 3
    assert capability_recovery(as_base, refs, categories, base)["loss"] == pytest.approx(0.0)
    assert capability_recovery(refs, refs, categories, base)["loss"] == pytest.approx(1.0)
    # worse than the base: negative
    worse = [{"l": _result(6.0, False), "m": _result(3.0, False)}] * 3
    assert capability_recovery(worse, refs, categories, base)["loss"] < 0
    # fidelity() gives the same, per task with its kind, with intervals over mixtures
    w = np.eye(3)
    out = fidelity(["a", "b", "c"], w, as_base, refs, categories, base, resamples=200)
    assert out["crr"]["loss"] == pytest.approx(0.0) and out["crr"]["mean"] == pytest.approx(0.0)
    assert out["crr_tasks"]["l"] == {
        "crr": pytest.approx(0.0),
        "kind": "improvement",
        "base_minus_reference": pytest.approx(2.0),  # refs 2, 3, 4 against the base's 5
        "base_minus_proxy": pytest.approx(0.0),
    }
    assert out["crr_ci"]["loss"] == pytest.approx([0.0, 0.0])
    assert "crr_note" not in out
    same = fidelity(["a", "b", "c"], w, refs, refs, categories, base, resamples=200)
    assert same["crr"]["mean"] == pytest.approx(1.0)
    assert same["crr_ci"]["mean"] == pytest.approx([1.0, 1.0])
    assert "base" in fidelity(["a", "b", "c"], w, refs, refs, categories)["crr_note"]


def test_improvement_crr_is_undefined_when_the_references_lose_ground():
    """References worse than the base leave no improvement to recover: a ratio of two losses of
    ground (proxies 3x worse than references read as CRR 3) must not pass for recovery."""
    categories = {"loss": ["l"]}
    base = {"l": _result(2.0, False)}
    refs = [{"l": _result(2.1 + 0.1 * k, False)} for k in range(3)]  # mean 2.2: worse
    proxies = [{"l": _result(2.4 + 0.3 * k, False)} for k in range(3)]  # mean 2.7
    out = fidelity(["a", "b", "c"], np.eye(3), proxies, refs, categories, base, resamples=200)
    assert math.isnan(out["crr"]["loss"]) and math.isnan(out["crr"]["mean"])
    assert out["crr_tasks"]["l"]["base_minus_reference"] == pytest.approx(-0.2)
    assert out["crr_tasks"]["l"]["base_minus_proxy"] == pytest.approx(-0.7)
    assert "do not improve on the base on ['l']" in out["crr_note"]


def test_crr_interval_resamples_mixtures():
    """The CRR interval is the percentile interval of the CRR on resampled mixtures."""
    values = [(0.4, 0.5), (0.6, 0.5), (0.2, 0.4), (0.5, 0.6), (0.3, 0.3)]
    proxies = [{"a": _result(p)} for p, _ in values]
    refs = [{"a": _result(r)} for _, r in values]
    out = fidelity(["x", "y"], np.full((5, 2), 0.5), proxies, refs, {"acc": ["a"]}, seed=3)
    p, r = np.array(values).T
    index = np.random.default_rng(3).integers(0, 5, size=(2000, 5))
    ratios = np.sort(p[index].sum(axis=1) / r[index].sum(axis=1))
    assert out["crr"]["acc"] == pytest.approx(p.sum() / r.sum())
    assert out["crr_ci"]["acc"] == pytest.approx([ratios[49], ratios[-50]])


def test_loo_linear_predicts_an_exactly_linear_target():
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(3), size=10)
    target = w @ np.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(loo_linear_predictions(w, target), target, atol=1e-10)


def test_loo_quadratic_recovers_a_quadratic_target_the_linear_fit_cannot():
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(3), size=12)
    target = -((w[:, 0] - 0.4) ** 2) - ((w[:, 1] - 0.3) ** 2) + 0.5 * w[:, 2]
    quadratic = loo_quadratic_predictions(w, target)
    np.testing.assert_allclose(quadratic, target, atol=1e-9)
    assert spearman(quadratic, target) == pytest.approx(1.0)
    assert spearman(loo_linear_predictions(w, target), target) < 0.99
    # fewer mixtures than terms (6 for 3 datasets), vertices included: no failure, finite
    assert np.all(np.isfinite(loo_quadratic_predictions(np.eye(3), [1.0, 2.0, 3.0])))


def test_vectorised_rank_statistics_match_the_single_ones():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(5, 9)), rng.normal(size=(5, 9))
    b[0] = a[0] ** 3  # monotone: 1
    b[1] = 1.0  # constant: NaN
    a[2, :3] = a[2, 0]  # ties
    rows = spearman_rows(a, b)
    for k in range(5):
        expected = spearman(a[k], b[k])
        assert (math.isnan(rows[k]) and math.isnan(expected)) or rows[k] == pytest.approx(expected)
        assert top_quarter_rows(a, b)[k] == pytest.approx(
            top_quarter_spearman(a[k], b[k]), nan_ok=True
        )
    assert rows[0] == pytest.approx(1.0) and math.isnan(rows[1])
    from scipy.stats import spearmanr

    assert rows[2] == pytest.approx(spearmanr(a[2], b[2]).statistic)


def test_bootstrap_interval_matches_an_independent_loop():
    """Same rng and indices, one resample at a time, undefined resamples dropped, percentile
    order statistics j = ceil(B * 0.025)."""
    rng = np.random.default_rng(7)
    predicted = rng.normal(size=8)
    reference = predicted + rng.normal(size=8)
    resamples, seed = 400, 11
    low, high = bootstrap_ci(spearman_rows, predicted, reference, resamples=resamples, seed=seed)
    draws = np.random.default_rng(seed).integers(0, 8, size=(resamples, 8))
    rhos = []
    for rows in draws:
        p, r = predicted[rows], reference[rows]
        if np.ptp(p) > 0 and np.ptp(r) > 0:
            from scipy.stats import spearmanr

            rhos.append(spearmanr(p, r).statistic)
    rhos = np.sort(rhos)
    j = max(1, math.ceil(len(rhos) * 0.025 - 1e-9))
    assert low == pytest.approx(rhos[j - 1]) and high == pytest.approx(rhos[len(rhos) - j])
    assert low < spearman(predicted, reference) < high
    # a statistic undefined everywhere gives no interval
    assert all(math.isnan(x) for x in bootstrap_ci(spearman_rows, np.ones(8), reference))


def test_paired_difference_keeps_the_pairing():
    """A predictor identical to the proxy differs by exactly 0 on every resample; intervals of
    each rho alone are wide, so an unpaired difference could not give [0, 0]."""
    rng = np.random.default_rng(2)
    reference = rng.normal(size=10)
    proxy = reference + 2 * rng.normal(size=10)
    same = paired_difference(spearman_rows, proxy, proxy.copy(), reference)
    assert (same["diff"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)
    assert same["verdict"] == "inconclusive"
    low, high = bootstrap_ci(spearman_rows, proxy, reference)
    assert high - low > 0.3
    # the paired interval is the percentile interval of per-resample differences
    other = reference + rng.normal(size=10)
    diff = paired_difference(spearman_rows, other, proxy, reference, seed=5, resamples=500)
    rows = np.random.default_rng(5).integers(0, 10, size=(500, 10))
    d = np.sort([spearman(other[k], reference[k]) - spearman(proxy[k], reference[k]) for k in rows])
    d = d[np.isfinite(d)]
    j = max(1, math.ceil(d.size * 0.025 - 1e-9))
    assert (diff["ci_low"], diff["ci_high"]) == pytest.approx((d[j - 1], d[d.size - j]))
    assert diff["diff"] == pytest.approx(spearman(other, reference) - spearman(proxy, reference))


def test_macro_rho_is_the_mean_of_per_category_rhos():
    rng = np.random.default_rng(5)
    w = rng.dirichlet(np.ones(3), size=12)
    categories = {"x": ["t1"], "y": ["t2", "t3"]}
    refs = [
        {t: _result(v) for t, v in zip(["t1", "t2", "t3"], row, strict=True)}
        for row in rng.normal(size=(12, 3))
    ]
    proxies = [{t: _result(r[t]["value"] + 0.5 * rng.normal()) for t in r} for r in refs]
    out = fidelity(["a", "b", "c"], w, proxies, refs, categories, resamples=300)
    for name in ("proxy", "trivial_linear", "trivial_quadratic"):
        per_category = [out["categories"][c][name]["rho"] for c in categories]
        assert out["macro"][name]["rho"] == pytest.approx(np.mean(per_category))
    # on each resample: the same mean, so the interval is that of the mean of the rhos
    index = np.random.default_rng(0).integers(0, 12, size=(300, 12))
    p, r = np.array(out["proxy_scores"]["x"]), np.array(out["reference_scores"]["x"])
    p2, r2 = np.array(out["proxy_scores"]["y"]), np.array(out["reference_scores"]["y"])
    means = (spearman_rows(p[index], r[index]) + spearman_rows(p2[index], r2[index])) / 2
    means = np.sort(means[np.isfinite(means)])
    j = max(1, math.ceil(means.size * 0.025 - 1e-9))
    assert out["macro"]["proxy"]["rho_ci"] == pytest.approx([means[j - 1], means[means.size - j]])
    assert set(out["macro"]["proxy_minus"]) == {"trivial_linear", "trivial_quadratic"}


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
    """spread = sample sd of the reference values, stderr_unpaired = mean finite stderr,
    snr_unpaired = their ratio; without per-document scores there is no paired stderr; rho
    compares proxy and reference values per task."""
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
    assert out["loud"]["stderr_unpaired"] == pytest.approx(0.2)  # the missing one left out
    assert out["loud"]["snr_unpaired"] == pytest.approx(5.0)
    assert math.isnan(out["loud"]["paired_stderr"]) and math.isnan(out["loud"]["snr"])
    assert out["loud"]["rho"] == pytest.approx(0.5)
    assert out["quiet"]["spread"] == pytest.approx(0.01)
    assert out["quiet"]["snr_unpaired"] == pytest.approx(0.02)
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
    assert result["tasks"]["quiet"]["snr_unpaired"] == pytest.approx(0.02)


def _docs(per_doc, higher=True, **extra) -> dict:
    """A task result with per-document scores; value = their (weighted) mean."""
    w = np.asarray(extra.get("doc_weight", np.ones(len(per_doc))), dtype=float)
    value = float(np.sum(w * np.asarray(per_doc)) / w.sum())
    return {**_result(value, higher), "stderr": 1.0, "per_doc": list(per_doc), **extra}


def test_paired_stderr_is_the_standard_error_of_a_difference():
    a, b, c = [1.0, 2.0, 3.0, 4.0], [1.1, 2.3, 3.0, 4.2], [0.9, 2.2, 3.4, 4.0]

    def se(x, y):  # of the mean difference over 4 documents
        return np.std(np.subtract(y, x), ddof=1) / 2

    two = [{"t": _docs(a, False)}, {"t": _docs(b, False)}]
    assert paired_stderr(two, "t") == pytest.approx(se(a, b))
    # three references: pooled over the 3 pairs as their root mean square
    three = [*two, {"t": _docs(c, False)}]
    rms = math.sqrt(np.mean([se(a, b) ** 2, se(a, c) ** 2, se(b, c) ** 2]))
    assert paired_stderr(three, "t") == pytest.approx(rms)
    # documents of different weight (bytes): differences of the weighted means
    w = [1.0, 1.0, 2.0, 4.0]
    weighted = [{"t": _docs(a, doc_weight=w)}, {"t": _docs(b, doc_weight=w)}]
    scaled = np.subtract(b, a) * np.asarray(w) * 4 / sum(w)
    assert paired_stderr(weighted, "t") == pytest.approx(np.std(scaled, ddof=1) / 2)
    # no per-document scores, or different documents: undefined
    assert math.isnan(paired_stderr([{"t": _result(1.0)}, {"t": _result(2.0)}], "t"))
    assert math.isnan(paired_stderr([{"t": _docs(a)}, {"t": _docs(a[:3])}], "t"))
    # far below the unpaired standard errors (1.0) when documents are shared
    out = task_signal(three, three, ["t"])["t"]
    assert out["paired_stderr"] < 0.2 < out["stderr_unpaired"]
    assert out["snr"] == pytest.approx(out["spread"] / out["paired_stderr"])


def test_a_task_without_signal_is_warned_about():
    """On the paired signal/noise; on the unpaired one where per-document scores are missing."""
    from demix.stages.validate import fidelity_warnings

    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(2), size=6)
    base = rng.normal(size=4)
    pattern = np.array([1.0, -1.0, 1.0, -1.0])  # mean 0: moves the documents, not the value

    def refs_with(noise: float) -> list[dict]:
        return [{"t": _docs(base + 0.01 * k + noise * k * pattern)} for k in range(6)]

    def warned(refs) -> list[str]:
        result = fidelity(["a", "b"], w, refs, refs, {"a": ["t"]}, resamples=100)
        result["relative_delta_norms"] = {"a": 0.01, "b": 0.01}
        return [m for m in fidelity_warnings(result) if "signal/noise" in m]

    (warning,) = warned(refs_with(0.1))  # values differ by 0.01, differences' noise ~0.1
    assert "'t'" in warning and "evaluate.limit" in warning
    # the same values with documents that move together: paired noise tiny, no warning,
    # although every reported (unpaired) standard error is 1.0
    assert not warned(refs_with(0.0001))
    unpaired = [{"t": {**_result(x), "stderr": 1.0}} for x in w[:, 0]]
    assert warned(unpaired)
    for r in unpaired:
        r["t"]["stderr"] = 0.01
    assert not warned(unpaired)


def test_fidelity_json_and_tables_carry_the_new_metrics(tmp_path):
    """JSON-serialisable; reproduce's table and fidelity.html show macro and aggregate rho with
    intervals, the quadratic fit with its tokens, the paired differences and the CRR."""
    import json

    from demix.report.fidelity import write_fidelity_report
    from demix.report.reproduce import format_table

    rng = np.random.default_rng(3)
    w = rng.dirichlet(np.ones(3), size=10)
    categories = {"a": ["t1"], "other": ["t2"]}
    refs = [
        {"t1": _docs(rng.normal(size=5) + k), "t2": _docs(rng.normal(size=5), False)}
        for k in range(10)
    ]
    proxies = [{t: {**r[t], "value": r[t]["value"] + 0.1} for t in r} for r in refs]
    base = {"t1": _result(-1.0), "t2": _result(3.0, False)}
    out = fidelity(
        ["a", "b", "c"],
        w,
        proxies,
        refs,
        categories,
        base,
        reference_training_tokens=123456,
        resamples=200,
    )
    again = json.loads(json.dumps(out))
    assert again["macro"]["proxy"]["rho_ci"] == pytest.approx(out["macro"]["proxy"]["rho_ci"])
    assert again["categories"]["a"]["trivial_quadratic"]["training_tokens"] == 123456
    assert again["weights_only_training_tokens"] == 123456
    assert again["crr_tasks"]["t2"]["kind"] == "improvement"

    result = {
        "datasets": ["a", "b", "c"],
        "fidelity": {**out, "relative_delta_norms": {"a": 0.1, "b": 0.1, "c": 0.1}},
        "searches": {
            "merge": {"proxies_evaluated": 4, "training_tokens": 10},
            "trained": {"proxies_evaluated": 4, "training_tokens": 40},
            "token_ratio": 4.0,
        },
        "mixtures": {"uniform": {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}},
        "final": {"uniform": {"seeds": 1}},
        "verdicts": {},
        "sweep": [
            {
                "tokens": 2048,
                "lr": 0.005,
                "mean_delta_norm": 0.1,
                "macro_rho_proxy": out["macro"]["proxy"]["rho"],
                "macro_rho_proxy_ci": out["macro"]["proxy"]["rho_ci"],
                "rho_proxy": 0.5,
                "rho_proxy_ci": [0.1, 0.9],
                "rho_weights_fit": 0.2,
                "rho_quadratic_fit": 0.3,
                "proxy_minus_quadratic_fit": out["categories"][AGGREGATE]["proxy_minus"][
                    "trivial_quadratic"
                ],
                "regret_proxy": 0.0,
                "crr": 0.9,
                "crr_ci": [0.8, 1.0],
            }
        ],
    }
    table = format_table(result)
    macro = out["macro"]["proxy"]
    assert f"| macro | {macro['rho']:.3f} [{macro['rho_ci'][0]:.3f}, " in table
    assert "rho quadratic fit (123,456 tokens)" in table
    assert "| aggregate |" in table and "proxy − quadratic fit" in table
    crr = f"{out['crr']['mean']:.3f} [{out['crr_ci']['mean'][0]:.3f}, "
    assert crr in table
    assert "| 2,048 | 0.005 |" in table and "paired stderr" in table

    out["warnings"] = []
    page = write_fidelity_report(tmp_path / "fidelity.html", out).read_text()
    assert "rho quadratic fit (123,456 tokens)" in page and "paired stderr" in page
    assert page.count("<img") == len(categories) + 1
