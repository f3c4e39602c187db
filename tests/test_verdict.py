"""Paired bootstrap intervals, category aggregation, Holm and the verdict (demix.verdict)."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from demix.verdict import (
    Comparison,
    bootstrap_p_value,
    category_bootstrap,
    holm,
    paired_bootstrap,
    percentile_interval,
    verdict,
)


def _exact(values: list[float]) -> Counter:
    """Probability of each replicate value (rounded) from an exhaustive list of resamples."""
    counts = Counter(round(v, 9) for v in values)
    return Counter({v: c / len(values) for v, c in counts.items()})


def _frequencies(replicates: np.ndarray) -> Counter:
    counts = Counter(round(float(v), 9) for v in replicates)
    return Counter({v: c / len(replicates) for v, c in counts.items()})


# ---------------------------------------------------------------- intervals by hand


def test_interval_of_a_tiny_case_is_the_exact_bootstrap_quantile():
    b = np.array([3.0, 1.0, 4.0, 1.0])
    a = b + np.array([-1.0, 0.0, 2.0, 5.0])
    # every resample of 4 documents, each equally likely: the exact bootstrap distribution
    exact = sorted(np.mean(c) for c in itertools.product([-1.0, 0.0, 2.0, 5.0], repeat=4))
    # P(T <= -0.5) = 11/256 < 5% <= P(T <= -0.25) = 19/256, and
    # P(T >= 3.75) = 9/256 < 5% <= P(T >= 3.5) = 19/256: the 90% interval is [-0.25, 3.5]
    assert sum(t <= -0.5 for t in exact) == 11 and sum(t <= -0.25 for t in exact) == 19
    assert sum(t >= 3.75 for t in exact) == 9 and sum(t >= 3.5 for t in exact) == 19
    result = paired_bootstrap(a, b, resamples=40_000, level=0.9, seed=0)
    assert result.diff == pytest.approx(1.5)
    assert (result.ci_low, result.ci_high) == (-0.25, 3.5)
    # p = 2 min(P(T <= 0), P(T >= 0)) = 2 * 32/256
    assert sum(t <= 0 for t in exact) == 32
    assert result.p_value == pytest.approx(0.25, abs=0.01)
    assert result.verdict == "inconclusive"


def test_seeds_then_documents_with_the_same_documents_for_every_seed():
    d = np.array([[0.0, 1.0], [10.0, 30.0]])  # [seeds, docs] of a - b
    # exhaustive two-level resample: seeds (s1, s2), then ONE draw of documents (n1, n2) that
    # every drawn seed uses
    exact = _exact(
        [
            np.mean([d[s, n] for s in seeds for n in docs])
            for seeds in itertools.product(range(2), repeat=2)
            for docs in itertools.product(range(2), repeat=2)
        ]
    )
    # drawing the documents anew for each seed gives another distribution (more atoms)
    per_seed = _exact(
        [
            np.mean([d[s, n] for s, docs in zip(seeds, pair, strict=True) for n in docs])
            for seeds in itertools.product(range(2), repeat=2)
            for pair in itertools.product(itertools.product(range(2), repeat=2), repeat=2)
        ]
    )
    assert set(per_seed) != set(exact)
    result = paired_bootstrap(d + 1.0, np.ones_like(d), resamples=40_000, seed=3)
    observed = _frequencies(result.replicates)
    assert set(observed) == set(exact)
    for value, probability in exact.items():
        assert observed[value] == pytest.approx(probability, abs=0.01)
    assert result.diff == pytest.approx(d.mean())


def test_interval_and_p_value_are_dual():
    t = np.concatenate([np.full(20, -1.0), np.linspace(0.1, 1.0, 980)])  # 20 of 1000 <= 0
    assert bootstrap_p_value(t) == pytest.approx(0.04)
    assert percentile_interval(t, 0.95)[0] > 0  # p = 0.04 < 0.05: excludes 0
    assert percentile_interval(t, 0.97)[0] < 0  # p = 0.04 > 0.03: covers 0
    assert percentile_interval(t, 0.96)[0] < 0  # p = alpha: not < alpha, covers 0


# ---------------------------------------------------------------- behaviour


def test_identical_models_are_inconclusive_with_a_zero_difference():
    a = np.random.default_rng(0).normal(size=(3, 500))
    result = paired_bootstrap(a, a.copy())
    assert result.diff == 0.0 and (result.ci_low, result.ci_high) == (0.0, 0.0)
    assert result.p_value == 1.0 and result.verdict == "inconclusive"
    category = category_bootstrap([(a, a.copy()), (a[:, :100], a[:, :100].copy())])
    assert category.diff == 0.0 and category.verdict == "inconclusive"


def test_a_clearly_better_model_excludes_zero_and_orientation_is_the_callers():
    rng = np.random.default_rng(1)
    hard = rng.normal(size=2000)  # document difficulty, shared by both models
    loss_a = 3.0 + hard + rng.normal(0, 0.1, 2000)
    loss_b = loss_a + 0.05 + rng.normal(0, 0.1, 2000)  # b's loss is higher: a is better
    result = paired_bootstrap(-loss_a, -loss_b)  # losses negated: higher is better
    assert result.verdict == "better" and result.ci_low > 0.03
    assert paired_bootstrap(-loss_b, -loss_a).verdict == "worse"
    assert paired_bootstrap(loss_a, loss_b).verdict == "worse"  # unoriented loss reads backwards


def test_breaking_the_pairing_widens_the_interval():
    rng = np.random.default_rng(2)
    hard = rng.normal(0, 1.0, 3000)
    a = hard + rng.normal(0, 0.1, 3000)
    b = hard + rng.normal(0, 0.1, 3000) - 0.01
    paired = paired_bootstrap(a, b, seed=5)
    width = paired.ci_high - paired.ci_low
    # the paired standard error: sd(a - b) / sqrt(n), about 0.0026, not sqrt(2) / sqrt(n)
    se = np.std(a - b, ddof=1) / np.sqrt(len(a))
    assert width == pytest.approx(2 * 1.96 * se, rel=0.1)
    # shuffling b's documents breaks the pairing: same scores, far noisier differences. An
    # implementation resampling a and b independently would give both the same width.
    broken = paired_bootstrap(a, rng.permutation(b), seed=5)
    assert broken.ci_high - broken.ci_low > 5 * width
    assert paired.verdict == "better" and broken.verdict == "inconclusive"


def test_seeded_and_deterministic():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 4, 300))
    first = paired_bootstrap(a, b, seed=11)
    again = paired_bootstrap(a, b, seed=11)
    np.testing.assert_array_equal(first.replicates, again.replicates)
    assert first == again
    assert not np.array_equal(first.replicates, paired_bootstrap(a, b, seed=12).replicates)


def test_two_thousand_resamples_of_ten_thousand_documents_are_vectorised():
    rng = np.random.default_rng(4)
    a = rng.normal(size=10_000)
    result = paired_bootstrap(a, a + rng.normal(0, 1, 10_000))
    assert result.replicates.shape == (2000,)
    assert len(np.unique(result.replicates)) > 1900  # every replicate its own resample


# ---------------------------------------------------------------- categories


def _task(rng: np.random.Generator, docs: int, gap: float, scale: float = 1.0):
    hard = rng.normal(size=docs)
    a = hard + rng.normal(0, 0.5, docs)
    return scale * a, scale * (a - gap + rng.normal(0, 0.5, docs))


def test_a_single_task_category_is_the_paired_interval_over_its_standard_error():
    a, b = _task(np.random.default_rng(5), 800, 0.05)
    paired = paired_bootstrap(a, b, seed=9)
    category = category_bootstrap([(a, b)], seed=9)  # same rng stream: same resamples
    se = paired.replicates.std()
    assert category.diff == pytest.approx(paired.diff / se)
    assert category.ci_low == pytest.approx(paired.ci_low / se)
    assert category.ci_high == pytest.approx(paired.ci_high / se)


def test_tasks_count_on_one_noise_scale_whatever_their_units():
    rng = np.random.default_rng(6)
    small, large = _task(rng, 600, 0.2), _task(rng, 300, 0.0)
    big = (1000 * large[0], 1000 * large[1])
    base = category_bootstrap([small, large], seed=1)
    rescaled = category_bootstrap([small, big], seed=1)
    assert rescaled.diff == pytest.approx(base.diff)
    assert (rescaled.ci_low, rescaled.ci_high) == pytest.approx((base.ci_low, base.ci_high))
    assert base.verdict == "better"
    # a raw mean of the differences would let the task in large units decide alone
    raw = paired_bootstrap(np.concatenate([small[0], big[0]]), np.concatenate([small[1], big[1]]))
    assert raw.verdict == "inconclusive"
    # weights: all weight on the task without a gap pulls the statistic to it
    weighted = category_bootstrap([small, large], weights=[1e-6, 1.0], seed=1)
    only_large = category_bootstrap([large], seed=1)
    assert abs(weighted.diff) < abs(base.diff) and weighted.verdict == only_large.verdict


def test_category_resamples_documents_within_each_task_and_seeds_jointly():
    rng = np.random.default_rng(7)
    tasks = [(rng.normal(size=(3, n)), rng.normal(size=(3, n))) for n in (50, 80)]
    result = category_bootstrap(tasks, seed=2)
    assert result.replicates.shape == (2000,) and np.isfinite(result.replicates).all()
    with pytest.raises(ValueError, match="same seeds") as err:
        category_bootstrap([tasks[0], (tasks[1][0][:2], tasks[1][1][:2])])
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- Holm


def _comparison(below_zero: int, resamples: int = 1000) -> Comparison:
    """A comparison whose bootstrap p-value is 2 * below_zero / resamples."""
    t = np.concatenate([np.full(below_zero, -1.0), np.linspace(0.1, 1.0, resamples - below_zero)])
    low, high = percentile_interval(t, 0.95)
    return Comparison(0.5, low, high, 0.95, bootstrap_p_value(t), t)


def test_holm_over_three_baselines_widens_the_intervals_step_down():
    family = {"uniform": _comparison(15), "prior": _comparison(5), "other": _comparison(20)}
    assert [c.p_value for c in family.values()] == pytest.approx([0.03, 0.01, 0.04])
    assert all(c.verdict == "better" for c in family.values())  # each alone at 95%
    adjusted = holm(family, alpha=0.05)
    assert list(adjusted) == ["uniform", "prior", "other"]  # the caller's order
    # sorted p: 0.01 (prior) at alpha/3 -> excludes 0; 0.03 (uniform) at alpha/2 -> covers 0,
    # so Holm stops: "other" (0.04 < 0.05 alone) gets the same alpha/2 level and covers 0 too
    assert adjusted["prior"].level == pytest.approx(1 - 0.05 / 3)
    assert adjusted["uniform"].level == pytest.approx(1 - 0.05 / 2)
    assert adjusted["other"].level == pytest.approx(1 - 0.05 / 2)
    assert [adjusted[k].verdict for k in ("prior", "uniform", "other")] == [
        "better",
        "inconclusive",
        "inconclusive",
    ]
    # adjusted p-values: 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04)
    assert [adjusted[k].p_value for k in ("prior", "uniform", "other")] == pytest.approx(
        [0.03, 0.06, 0.06]
    )
    for c in adjusted.values():
        assert c.ci_high - c.ci_low >= family["prior"].ci_high - family["prior"].ci_low


def test_holm_verdicts_are_holms_decisions_on_the_p_values():
    rng = np.random.default_rng(8)
    for _ in range(200):
        family = {f"b{i}": _comparison(int(k)) for i, k in enumerate(rng.integers(0, 40, 3))}
        adjusted = holm(family, alpha=0.05)
        ordered = sorted(family, key=lambda k: family[k].p_value)
        rejected, going = set(), True
        for k, name in enumerate(ordered):
            going = going and family[name].p_value < 0.05 / (3 - k)
            if going:
                rejected.add(name)
        assert {n for n, c in adjusted.items() if c.verdict != "inconclusive"} == rejected
        assert {n for n, c in adjusted.items() if c.p_value < 0.05} == rejected


# ---------------------------------------------------------------- errors


def test_verdict_reads_the_interval():
    assert verdict(0.1, 0.3) == "better"
    assert verdict(-0.3, -0.1) == "worse"
    assert verdict(-0.1, 0.2) == "inconclusive"
    assert verdict(0.0, 0.2) == "inconclusive"  # touching 0 is covering it
    with pytest.raises(ValueError, match="not ordered"):
        verdict(0.3, 0.1)


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda: paired_bootstrap([1.0, 2.0], [1.0]), "same documents"),
        (lambda: paired_bootstrap([1.0, np.nan], [1.0, 2.0]), "NaN or infinite"),
        (lambda: paired_bootstrap(np.zeros((2, 2, 2)), np.zeros((2, 2, 2))), "expected"),
        (lambda: paired_bootstrap([], []), "expected"),
        (lambda: paired_bootstrap([1.0], [0.0], level=95), "must lie in"),
        (lambda: paired_bootstrap([1.0], [0.0], resamples=0), "resamples=0"),
        (lambda: category_bootstrap([]), "no tasks"),
        (lambda: category_bootstrap([([1.0], [0.0])]), "1 document"),
        (lambda: category_bootstrap([([1.0, 2.0], [0.0, 1.0])]), "no noise"),
        (lambda: category_bootstrap([([1.0, 2.0], [0.0, 2.0])], weights=[0]), "positive"),
        (lambda: holm({}, alpha=5), "alpha=5"),
    ],
)
def test_bad_input_is_one_clear_line(call, expected):
    with pytest.raises(ValueError, match=expected) as err:
        call()
    assert "\n" not in str(err.value)


def test_documents_of_different_sizes_count_by_their_weight():
    """bits per byte and held-out loss weigh documents by bytes / tokens: the oriented scores'
    plain mean is the task's weighted mean (what its value reports), negated for a loss."""
    from demix.verdict import oriented_documents

    entry = {"higher_is_better": False, "per_doc": [1.0, 2.0, 4.0], "doc_weight": [10, 30, 60]}
    scores = oriented_documents({"t": entry}, "t", "here")
    assert scores.mean() == pytest.approx(-(10 * 1 + 30 * 2 + 60 * 4) / 100)
    plain = oriented_documents({"t": {"higher_is_better": True, "per_doc": [0, 1, 1]}}, "t", "x")
    np.testing.assert_array_equal(plain, [0, 1, 1])
    with pytest.raises(ValueError, match="no per-document scores"):
        oriented_documents({"t": {"higher_is_better": True, "per_doc": None}}, "t", "final x")
