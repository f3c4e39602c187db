"""Statistics for a verdict on final models: paired bootstrap intervals, Holm, better/worse.

Scores are ORIENTED by the caller: higher is better. Pass accuracies as they are and losses
(held-out loss, bits per byte) negated, so that a positive difference always means the first
model is better and `verdict` needs no metric-specific rule.

Two models are compared on the same documents: a and b hold per-document scores, shape [docs],
or [seeds, docs] when each model was trained with several seeds (row s of a and of b trained
with the same seed, so same initialisation and data order). The statistic is the mean paired
difference a - b. Its interval is a percentile bootstrap (not BCa) from a two-level resample
that keeps the pairing: each replicate draws the seeds with replacement and, once, the
documents with replacement, and uses the same document indices for every drawn seed and for
both models. Resampling the documents once per replicate, not once per seed, is what a crossed
design (every seed scored on the same documents) calls for: a hard document is hard for every
seed. With a handful of seeds the seed level is crude (3 seeds have 10 distinct resamples) and
the bootstrap understates its share of the variance by a factor (S - 1) / S.

Interval and p-value are dual by construction: the interval at level 1 - alpha is the pair of
order statistics j = ceil(R alpha / 2) from each end of the R sorted replicates, and the
two-sided p-value is 2 min(#replicates <= 0, #replicates >= 0) / R (capped at 1), so the
interval excludes 0 exactly when p < alpha. A p-value of 0 means under 1/R.

Holm over a family (e.g. the chosen mixture against each baseline) adjusts the p-values and
WIDENS the intervals: the comparison with the k-th smallest p-value of m gets level
1 - alpha / (m - k + 1) as long as every earlier one excluded 0; from the first that covers 0 on,
all get that same level, so none of them excludes 0. The verdict read off a widened interval is
therefore Holm's decision at alpha.

Everything is seeded (numpy default_rng(seed)) and deterministic, and vectorised over chunks
of replicates: 2,000 resamples of 10,000 documents took 0.16-0.34 s on a busy 2-core machine
(benchmarks/verdict_bench.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

RESAMPLES = 2000
ALPHA = 0.05
LEVEL = 1 - ALPHA
# replicates per vectorised step: a [CHUNK, docs] index array, 20 MB at 10,000 documents
CHUNK = 256


@dataclass(frozen=True)
class Comparison:
    """A difference (oriented: positive = first model better) with its bootstrap interval."""

    diff: float
    ci_low: float
    ci_high: float
    level: float
    p_value: float
    replicates: np.ndarray = field(repr=False, compare=False)

    @property
    def verdict(self) -> str:
        """'better', 'worse' or 'inconclusive' (the interval covers 0)."""
        return verdict(self.ci_low, self.ci_high)

    def at_level(self, level: float) -> Comparison:
        """The same comparison with its interval at another confidence level.

        Raises ValueError for a level outside (0, 1).
        """
        low, high = percentile_interval(self.replicates, level)
        return replace(self, ci_low=low, ci_high=high, level=level)

    def to_dict(self) -> dict:
        """diff, ci_low, ci_high, level, p_value and verdict, as plain floats and a string."""
        return {
            "diff": self.diff,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "level": self.level,
            "p_value": self.p_value,
            "verdict": self.verdict,
        }


def verdict(ci_low: float, ci_high: float) -> str:
    """'better' when the interval lies above 0, 'worse' below 0, else 'inconclusive'.

    Raises ValueError when ci_low > ci_high or either is NaN.
    """
    if not ci_low <= ci_high:
        raise ValueError(f"interval [{ci_low}, {ci_high}] is not ordered (or holds NaN)")
    if ci_low > 0:
        return "better"
    if ci_high < 0:
        return "worse"
    return "inconclusive"


def percentile_interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    """The j-th smallest and j-th largest replicate, j = ceil(R (1 - level) / 2).

    Raises ValueError for a level outside (0, 1) or no replicates.
    """
    if not 0 < level < 1:
        raise ValueError(f"confidence level {level} must lie in (0, 1), e.g. 0.95")
    t = np.sort(np.asarray(replicates, dtype=np.float64))
    if t.size == 0:
        raise ValueError("no bootstrap replicates to take an interval from")
    j = min(max(1, math.ceil(t.size * (1 - level) / 2 - 1e-9)), (t.size + 1) // 2)
    return float(t[j - 1]), float(t[t.size - j])


def bootstrap_p_value(replicates: np.ndarray) -> float:
    """Two-sided 2 min(share <= 0, share >= 0), capped at 1: p < alpha iff the interval excludes 0."""
    t = np.asarray(replicates, dtype=np.float64)
    return min(1.0, 2 * min(int((t <= 0).sum()), int((t >= 0).sum())) / t.size)


def _differences(a: npt.ArrayLike, b: npt.ArrayLike, where: str) -> np.ndarray:
    """a - b as [seeds, docs], checked.

    Raises ValueError for mismatched shapes, a rank other than 1 or 2, no documents, or a
    non-finite score.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(
            f"{where}: scores of shape {a.shape} and {b.shape}; both models must be scored on the "
            f"same documents (and seeds), in the same order"
        )
    if a.ndim not in (1, 2) or a.shape[-1] == 0 or a.size == 0:
        raise ValueError(f"{where}: scores of shape {a.shape}; expected [docs] or [seeds, docs]")
    d = np.atleast_2d(a - b)
    if not np.all(np.isfinite(d)):
        raise ValueError(f"{where}: a score is NaN or infinite; drop or fix that document")
    return d


def _check(resamples: int, level: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples={resamples} must be >= 1 (2,000 is usual)")
    if not 0 < level < 1:
        raise ValueError(f"confidence level {level} must lie in (0, 1), e.g. 0.95")


def _seed_counts(rng: np.random.Generator, seeds: int, resamples: int) -> np.ndarray | None:
    """[R, S] times each seed is drawn per replicate; None for one seed (nothing to resample)."""
    if seeds == 1:
        return None
    drawn = rng.integers(0, seeds, size=(resamples, seeds))
    counts = np.zeros((resamples, seeds))
    np.add.at(counts, (np.arange(resamples)[:, None], drawn), 1.0)
    return counts


def _replicates(
    d: np.ndarray, counts: np.ndarray | None, rng: np.random.Generator, r: int
) -> np.ndarray:
    """R bootstrap means of d [S, N]: seeds weighted by `counts`, one document draw per replicate."""
    seeds, docs = d.shape
    out = np.empty(r)
    for start in range(0, r, CHUNK):
        stop = min(r, start + CHUNK)
        index = rng.integers(0, docs, size=(stop - start, docs), dtype=np.int32)
        if counts is None:
            out[start:stop] = d[0][index].mean(axis=1)
        else:
            # each seed's mean over this replicate's documents, weighted by the seed's draws
            means = np.stack([d[s][index].mean(axis=1) for s in range(seeds)], axis=1)
            out[start:stop] = (counts[start:stop] * means).sum(axis=1) / seeds
    return out


def paired_bootstrap(
    a: npt.ArrayLike,
    b: npt.ArrayLike,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> Comparison:
    """Mean paired difference a - b with a percentile bootstrap interval (seeds, then documents).

    a, b: oriented per-document scores, [docs] or [seeds, docs]. Draws from
    default_rng(seed): first the seed indices [R, S] (none for one seed), then the document
    indices in chunks of CHUNK replicates.
    Raises ValueError for mismatched or empty scores, non-finite scores, resamples < 1 or a
    level outside (0, 1).
    """
    _check(resamples, level)
    d = _differences(a, b, "paired_bootstrap")
    rng = np.random.default_rng(seed)
    counts = _seed_counts(rng, d.shape[0], resamples)
    replicates = _replicates(d, counts, rng, resamples)
    low, high = percentile_interval(replicates, level)
    return Comparison(float(d.mean()), low, high, level, bootstrap_p_value(replicates), replicates)


def category_bootstrap(
    tasks: Sequence[tuple[npt.ArrayLike, npt.ArrayLike]],
    weights: Sequence[float] | None = None,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> Comparison:
    """Weighted mean over tasks of each task's standardised paired difference, bootstrapped jointly.

    tasks: (a, b) per task, oriented scores of the two models, each [docs_t] or [seeds, docs_t]
    with the same seeds in every task. A task's standardised difference is its mean difference
    over its paired standard error, the standard deviation of its own bootstrap replicates, so
    tasks in different units count on one scale, their noise's (a z-score). Each replicate
    draws the seeds once for all tasks (seed s is the same model on every task) and the
    documents within each task. weights: per task, default equal (a category); the objective
    over categories is the same call with weight category_weight / tasks_in_category per task.
    A task where the two models score the same on every document counts 0. Draws from
    default_rng(seed): the seed indices, then each task's documents in order.
    Raises ValueError for no tasks, resamples < 2, a task of fewer than 2 documents, seed
    counts that differ between tasks, a task whose replicates do not vary although its
    differences are not all 0 (no noise to standardise by), weights of the wrong length or not
    positive, and the cases paired_bootstrap raises for.
    """
    _check(resamples, level)
    if resamples < 2:
        raise ValueError(
            f"resamples={resamples}: a standard error needs 2 or more (2,000 is usual)"
        )
    if not tasks:
        raise ValueError("category_bootstrap: no tasks to aggregate")
    diffs = [_differences(a, b, f"task {t}") for t, (a, b) in enumerate(tasks)]
    seeds = {d.shape[0] for d in diffs}
    if len(seeds) != 1:
        raise ValueError(
            f"tasks have {sorted(seeds)} seeds; every task must score the same seeds' models"
        )
    w = np.ones(len(diffs)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(diffs),) or not np.all(np.isfinite(w)) or (w <= 0).any():
        raise ValueError(
            f"weights {np.asarray(weights).tolist()} must be {len(diffs)} positive numbers"
        )
    rng = np.random.default_rng(seed)
    counts = _seed_counts(rng, seeds.pop(), resamples)
    observed = np.zeros(len(diffs))
    standardised = np.zeros((len(diffs), resamples))
    for t, d in enumerate(diffs):
        if d.shape[1] < 2:
            raise ValueError(f"task {t} has {d.shape[1]} document; a standard error needs 2+")
        replicates = _replicates(d, counts, rng, resamples)
        if not d.any():
            continue  # identical scores: standardised difference 0 in every replicate
        se = float(replicates.std())
        if se == 0:
            raise ValueError(
                f"task {t}: the difference ({d.mean():.6g}) is the same in every bootstrap "
                f"replicate, so there is no noise to standardise it by; compare the task alone"
            )
        observed[t] = d.mean() / se
        standardised[t] = replicates / se
    replicates = w @ standardised / w.sum()
    low, high = percentile_interval(replicates, level)
    return Comparison(
        float(w @ observed / w.sum()), low, high, level, bootstrap_p_value(replicates), replicates
    )


def holm(comparisons: Mapping[str, Comparison], alpha: float = ALPHA) -> dict[str, Comparison]:
    """Holm step-down over a family: adjusted p-values and intervals widened to Holm's levels.

    Returned in the input's key order; ties in p are stepped through in that order. See the
    module docstring for the levels; a verdict from the returned intervals is Holm's decision
    at alpha.
    Raises ValueError for alpha outside (0, 1).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must lie in (0, 1), e.g. 0.05")
    names = sorted(comparisons, key=lambda name: comparisons[name].p_value)
    m = len(names)
    stopped: int | None = None
    adjusted = 0.0
    out: dict[str, Comparison] = {}
    for k, name in enumerate(names):
        c = comparisons[name]
        step_alpha = alpha / (m - (k if stopped is None else stopped))
        widened = c.at_level(1 - step_alpha)
        if stopped is None and widened.verdict == "inconclusive":
            stopped = k
        adjusted = max(adjusted, min(1.0, (m - k) * c.p_value))
        out[name] = replace(widened, p_value=adjusted)
    return {name: out[name] for name in comparisons}


def oriented_documents(result: Mapping[str, dict], task: str, where: str) -> np.ndarray:
    """A task's per-document scores (`per_doc`) oriented so that higher is better, scaled by
    their `doc_weight` (bytes, tokens) where documents weigh differently.

    Raises ValueError naming `where` and the task when the result has no per-document scores.
    """
    entry = result.get(task)
    if entry is None or entry.get("per_doc") is None:
        raise ValueError(
            f"{where}: task {task!r} has no per-document scores (per_doc); evaluate the final "
            "models again with this version"
        )
    sign = 1.0 if entry["higher_is_better"] else -1.0
    values = np.asarray(entry["per_doc"], dtype=np.float64)
    if entry.get("per_doc_mean") == "geometric":  # perplexities: compare their logs
        values = np.log(values)
    weights = entry.get("doc_weight")
    if weights is not None:
        # documents of different sizes (bytes, tokens): scaled so that the plain mean over
        # documents is the task's weighted mean; the same weights for every model scored on
        # these documents, so differences stay paired
        w = np.asarray(weights, dtype=np.float64)
        values = values * w * (len(w) / w.sum())
    return sign * values


def final_verdict(
    results: Mapping[str, Sequence[Mapping[str, dict]]],
    categories: Mapping[str, Sequence[str]],
    category_weights: Mapping[str, float] | None = None,
    chosen: str = "chosen",
    *,
    resamples: int = RESAMPLES,
    alpha: float = ALPHA,
    seed: int = 0,
) -> dict[str, dict]:
    """The chosen final model against each baseline, paired over documents (and seeds).

    results: {label: [one evaluation result per seed]} with per-document scores, the same seeds
    for every label. For every baseline, per task (its oriented mean difference), per category
    (the mean of its tasks' standardised differences) and on the objective (categories weighted
    by category_weights, default equal): the difference, its 95% bootstrap interval widened by
    Holm over the baselines, the Holm-adjusted p-value and the verdict (better | worse |
    inconclusive). Returns {baseline: {"objective": ..., category: ..., "tasks": {task: ...}}}.
    Raises ValueError when a label lacks per-document scores or the seeds differ.
    """
    if chosen not in results:
        raise ValueError(f"no {chosen!r} model among {sorted(results)}")
    seeds = {label: len(runs) for label, runs in results.items()}
    if len(set(seeds.values())) != 1:
        raise ValueError(f"final models have different numbers of seeds: {seeds}")
    weights = {c: float((category_weights or {}).get(c, 1.0)) for c in categories}
    total = sum(weights.values())

    def docs(label: str, task: str) -> np.ndarray:
        rows = [
            oriented_documents(r, task, f"final {label} seed {s}")
            for s, r in enumerate(results[label])
        ]
        return np.vstack(rows)

    raw: dict[str, dict[str, Comparison]] = {}
    for baseline in (label for label in results if label != chosen):
        comparisons: dict[str, Comparison] = {}
        pairs, pair_weights = [], []
        for category, tasks in categories.items():
            category_pairs = [(docs(chosen, t), docs(baseline, t)) for t in tasks]
            comparisons[category] = category_bootstrap(
                category_pairs, resamples=resamples, seed=seed
            )
            if weights[category] > 0:
                pairs += category_pairs
                pair_weights += [weights[category] / total / len(tasks)] * len(tasks)
        comparisons["objective"] = category_bootstrap(
            pairs, pair_weights, resamples=resamples, seed=seed
        )
        for task in dict.fromkeys(t for tasks in categories.values() for t in tasks):
            comparisons[f"task:{task}"] = paired_bootstrap(
                docs(chosen, task), docs(baseline, task), resamples=resamples, seed=seed
            )
        raw[baseline] = comparisons
    out: dict[str, dict] = {baseline: {"tasks": {}} for baseline in raw}
    for key in next(iter(raw.values()), {}):
        family = holm({baseline: raw[baseline][key] for baseline in raw}, alpha)
        for baseline, comparison in family.items():
            entry = comparison.to_dict()
            if key.startswith("task:"):
                out[baseline]["tasks"][key[5:]] = entry
            else:
                out[baseline][key] = entry
    return out
