"""How well merged proxies stand in for models trained on a mixture, against weights-only ones.

Scores are oriented so that higher is better (demix.evaluate.scoring): a category's score is the
mean of its tasks' percentile ranks among the R compared models, the aggregate (the ranking score
the search selects with) the mean of the category scores. Proxies and references are each scored
among themselves, once, on all R mixtures. Then:

- rho: Spearman rho between a predictor's scores and the references' scores, per category and
  for the aggregate; rho_top_quarter: the same on the best quarter of mixtures by reference (at
  least 3); regret: the best reference score minus the reference score of the mixture the
  predictor ranks first (0 = it picks the truly best mixture).
- macro rho (the paper's headline): the mean over categories of the per-category rho (NaN when
  one of them is), given beside the aggregate rho, which ranks by the one combined score.
- predictors: the merged proxies, and three that see only the weights: `trivial_linear`, a
  leave-one-out least-squares fit of the reference score on the weights w_i; `trivial_quadratic`,
  a leave-one-out Scheffe quadratic fit (terms w_i and w_i w_j for i < j, no intercept since the
  weights sum to 1); `trivial_weight`, for a category named like a dataset, that dataset's
  weight. The fits are trained on the references: their `training_tokens` is the references'
  training tokens (None when not given); the weight needs none (0). Per-domain rho is easy to
  get from weights alone; a proxy is only informative where it beats these.
- intervals (`*_ci` = [low, high]): a percentile bootstrap over mixtures. Each of B resamples
  (default 2000, from numpy default_rng(seed)) draws R mixtures with replacement; the same draws
  serve every predictor, category and statistic. Scores and the fits' leave-one-out predictions
  are computed once on all mixtures and resampled as they are: the interval reflects which
  mixtures were drawn, not a refit. Resamples where a statistic is undefined (NaN, e.g. rho with
  a constant side) are dropped before the 95% interval is read off (order statistics as in
  demix.verdict.percentile_interval); [NaN, NaN] when none is defined.
- proxy vs a weights-only predictor (`proxy_minus`): the PAIRED difference rho(proxy) -
  rho(predictor) against the same references, its interval from the differences on the same
  resamples, and a verdict: better (interval above 0), worse (below 0), else inconclusive. A
  category's `verdict`: better when the proxy is better than every weights-only predictor there,
  worse when it is worse than any, else inconclusive (each comparison at 95%: "better" needs
  every interval to exclude 0, so testing several does not inflate it; "worse" is not corrected
  for the 2-3 comparisons). `proxy_beats_trivial` is verdict == "better". The macro rho gets the
  same paired differences against the two fits.
- capability recovery (CRR), per task over the R mixtures: for metrics where higher is better
  (accuracies), sum of proxy values / sum of reference values (the paper's); for loss-type
  metrics, the share of the base model's improvement that the proxies recover,
  (L_base - mean L_proxy) / (L_base - mean L_reference): 1 = the proxies improve on the base as
  much as the trained references, 0 = not at all, < 0 = worse than the base (a ratio of two
  losses stays near 1 whatever the models do). Without the base's result the loss tasks' CRR is
  NaN (`crr_note` says so). A category's CRR is the mean of its tasks' (NaN when one is), `mean`
  the mean over categories; intervals from the same resamples of mixtures, the base fixed.
- signal/noise per task, over the references: spread = sample standard deviation of the task's
  reference values across mixtures (of their logs for perplexities, whose documents are compared
  in logs); paired_stderr = the standard error of the difference between two references' means
  on the same documents, pooled over all pairs of references (the root mean square of the pairs'
  standard errors: demix.statistics.pooled_paired_stderr), from the per-document scores
  weighted by `doc_weight` as in demix.verdict.oriented_documents; NaN without per-document
  scores. snr = spread / paired_stderr: a task below 1 (e.g. multiple choice at chance for a
  small model) does not separate the mixtures and only adds noise to every rank-based score.
  stderr_unpaired (the mean reported standard error) and snr_unpaired = spread /
  stderr_unpaired are kept for comparison: documents shared by every model make the unpaired
  error larger than the error of a difference.
- reliability (`fidelity.replicates`): k references trained again with another seed; their
  test-retest rho is the most any predictor of these references can be expected to reach
  (`reliability`), and the replicate-minus-reference differences add the training seed's
  variance to each task's signal/noise (`seed_noise`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from demix.evaluate.scoring import score_models
from demix.ranking import (
    difference,
    loo_linear_predictions,
    loo_quadratic_predictions,
    percentile_ci,
    ranking_metrics,
    resample_rows,
    spearman,
    spearman_rows,
)
from demix.recovery import capability_recovery_detail
from demix.statistics import pooled_paired_stderr
from demix.verdict import LEVEL, RESAMPLES, oriented_documents

AGGREGATE = "aggregate"
FITS = ("trivial_linear", "trivial_quadratic")
WEIGHTS_ONLY = (*FITS, "trivial_weight")


def _combined_verdict(comparisons: dict[str, dict]) -> str:
    verdicts = [c["verdict"] for c in comparisons.values()]
    if verdicts and all(v == "better" for v in verdicts):
        return "better"
    return "worse" if "worse" in verdicts else "inconclusive"


def _category_entry(
    predictors: dict[str, np.ndarray | None],
    reference: np.ndarray,
    index: np.ndarray,
    level: float,
    tokens: dict[str, int | None],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One category's entry, and each predictor's rho replicates (for the macro rho)."""
    entry: dict[str, Any] = {}
    replicates: dict[str, np.ndarray] = {}
    for name, predicted in predictors.items():
        if predicted is None:
            entry[name] = None
            continue
        entry[name] = ranking_metrics(predicted, reference, index, level)
        if name in tokens:
            entry[name]["training_tokens"] = tokens[name]
        replicates[name] = spearman_rows(predicted[index], reference[index])
    entry["proxy_minus"] = {
        name: difference(
            entry["proxy"]["rho"] - entry[name]["rho"],
            replicates["proxy"] - replicates[name],
            level,
        )
        for name in WEIGHTS_ONLY
        if entry.get(name) is not None
    }
    entry["verdict"] = _combined_verdict(entry["proxy_minus"])
    entry["proxy_beats_trivial"] = entry["verdict"] == "better"
    return entry, replicates


def _macro(
    entries: dict[str, dict],
    replicates: dict[str, dict[str, np.ndarray]],
    level: float,
    tokens: dict[str, int | None],
) -> dict[str, Any]:
    """The mean over categories of per-category rho, for the proxy and the two fits."""
    out: dict[str, Any] = {}
    macro_replicates = {}
    for name in ("proxy", *FITS):
        rho = float(np.mean([entries[c][name]["rho"] for c in entries]))
        macro_replicates[name] = np.mean([replicates[c][name] for c in entries], axis=0)
        out[name] = {"rho": rho, "rho_ci": percentile_ci(macro_replicates[name], level)}
        if name in tokens:
            out[name]["training_tokens"] = tokens[name]
    out["proxy_minus"] = {
        name: difference(
            out["proxy"]["rho"] - out[name]["rho"],
            macro_replicates["proxy"] - macro_replicates[name],
            level,
        )
        for name in FITS
    }
    out["verdict"] = _combined_verdict(out["proxy_minus"])
    return out


# --- capability recovery ---


# --- signal / noise ---


def paired_stderr(results: list[dict], task: str) -> float:
    """The standard error of a difference between two of these models' scores on `task`, pooled
    over every pair (pooled_paired_stderr of their oriented, doc_weight-scaled per-document
    scores); NaN with fewer than 2 models, without per-document scores or with document counts
    that differ."""
    if len(results) < 2 or any(r[task].get("per_doc") is None for r in results):
        return float("nan")
    docs = [oriented_documents(r, task, "fidelity") for r in results]
    if len({d.size for d in docs}) != 1 or docs[0].size < 2:
        return float("nan")
    return pooled_paired_stderr(np.vstack(docs))


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def task_signal(
    proxy_results: list[dict], reference_results: list[dict], tasks: list[str]
) -> dict[str, dict[str, float]]:
    """Per task: rho proxy vs reference values, and the references' spread, paired_stderr, snr,
    stderr_unpaired and snr_unpaired (see the module docstring)."""
    out = {}
    for task in tasks:
        proxy = np.array([float(r[task]["value"]) for r in proxy_results])
        reference = np.array([float(r[task]["value"]) for r in reference_results])
        errors = [r[task].get("stderr") for r in reference_results]
        errors = [float(e) for e in errors if e is not None and math.isfinite(float(e))]
        geometric = reference_results[0][task].get("per_doc_mean") == "geometric"
        spread_of = np.log(reference) if geometric else reference
        spread = float(np.std(spread_of, ddof=1)) if reference.size > 1 else float("nan")
        unpaired = float(np.mean(errors)) if errors else float("nan")
        paired = paired_stderr(reference_results, task)
        out[task] = {
            "rho": spearman(proxy, reference),
            "spread": spread,
            "paired_stderr": paired,
            "snr": _ratio(spread, paired),
            "stderr_unpaired": unpaired,
            "snr_unpaired": _ratio(spread, unpaired),
        }
    return out


# --- two predictors against the same references ---


def _score_columns(results: list[dict], categories: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Each category's score and the aggregate of models scored among themselves."""
    scored = score_models(results, categories)
    columns = {c: np.array([s["categories"][c] for s in scored]) for c in categories}
    columns[AGGREGATE] = np.array([s["ranking_score"] for s in scored])
    return columns


def compare_predictors(
    first_results: list[dict],
    second_results: list[dict],
    reference_results: list[dict],
    categories: dict[str, list[str]],
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """rho(first) - rho(second) against the same references, PAIRED: both rhos from the same
    resampled mixtures, per category, for the aggregate and for the macro rho (mean over
    categories). {score: {"diff", "ci_low", "ci_high", "verdict"}} (see `difference`); e.g.
    merged proxies against trained proxies of a smaller budget, or one merge method against
    another."""
    index = resample_rows(len(reference_results), resamples, seed)
    first, second, reference = (
        _score_columns(r, categories) for r in (first_results, second_results, reference_results)
    )
    out, rows = {}, {}
    for score in [*categories, AGGREGATE]:
        a, b, r = first[score], second[score], reference[score]
        rows[score] = spearman_rows(a[index], r[index]) - spearman_rows(b[index], r[index])
        out[score] = difference(spearman(a, r) - spearman(b, r), rows[score], level)
    macro = float(np.mean([out[c]["diff"] for c in categories]))
    out["macro"] = difference(macro, np.mean([rows[c] for c in categories], axis=0), level)
    return out


# --- reliability: references trained twice ---


def _retest_entry(
    proxy: np.ndarray, first: np.ndarray, second: np.ndarray, index: np.ndarray, level: float
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """rho(second, first) (test-retest) and rho(proxy, first) on the same resamples."""
    retest_rows = spearman_rows(second[index], first[index])
    proxy_rows = spearman_rows(proxy[index], first[index])
    return _retest_summary(
        spearman(second, first), spearman(proxy, first), retest_rows, proxy_rows, level
    )


def _retest_summary(
    retest: float, rho: float, retest_rows: np.ndarray, proxy_rows: np.ndarray, level: float
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction_rows = proxy_rows / retest_rows
    entry = {
        "retest": {"rho": retest, "rho_ci": percentile_ci(retest_rows, level)},
        "proxy": {"rho": rho, "rho_ci": percentile_ci(proxy_rows, level)},
        "ceiling": math.sqrt(retest) if retest > 0 else float("nan"),
        "proxy_over_retest": {
            "value": rho / retest if retest > 0 else float("nan"),
            "ci": percentile_ci(fraction_rows, level),
        },
    }
    return entry, retest_rows, proxy_rows


def reliability(
    proxy_results: list[dict],
    reference_results: list[dict],
    replicate_results: list[dict],
    categories: dict[str, list[str]],
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, Any]:
    """How far the references agree with themselves: k mixtures whose reference was trained a
    second time with another seed (`replicate_results`, in the order of `reference_results`).

    Each of the three sets (proxies, references, replicates) is scored among its own k models
    (as fidelity does), then per category and for the aggregate score: `retest`, rho between
    the replicates and the references (the test-retest reliability: what a second training run
    of the reference recipe would agree with the first); `proxy`, rho between the proxies and
    the references on the same k mixtures; `proxy_over_retest`, their ratio (>= 1: the proxies
    agree with the references as well as the references agree with themselves); `ceiling`,
    sqrt(retest): the rho that a predictor free of noise of its own can expect against one
    noisy set of references (the attenuation bound). Intervals from the same bootstrap over the
    k mixtures for all of them; `macro` is the mean over categories, as in fidelity.
    Returns {"k", "categories": {category | "aggregate": entry}, "macro": entry}.
    """
    k = len(replicate_results)
    if k != len(reference_results) or k != len(proxy_results):
        raise ValueError("reliability needs one proxy and one reference per replicate")
    index = resample_rows(k, resamples, seed)
    proxy, first, second = (
        _score_columns(r, categories) for r in (proxy_results, reference_results, replicate_results)
    )
    entries, rows = {}, {}
    for category in [*categories, AGGREGATE]:
        entries[category], *rows[category] = _retest_entry(
            proxy[category], first[category], second[category], index, level
        )
    names = list(categories)
    macro, _, _ = _retest_summary(
        float(np.mean([entries[c]["retest"]["rho"] for c in names])),
        float(np.mean([entries[c]["proxy"]["rho"] for c in names])),
        np.mean([rows[c][0] for c in names], axis=0),
        np.mean([rows[c][1] for c in names], axis=0),
        level,
    )
    return {"k": k, "categories": entries, "macro": macro}


def seed_noise(
    reference_results: list[dict],
    replicate_results: list[dict],
    signal: dict[str, dict[str, float]],
) -> dict[str, dict[str, float]]:
    """Per task, the noise of comparing two references, from the mixtures trained twice.

    retest_noise: the root mean square of (replicate - reference) values over the k mixtures (of
    their logs for perplexities, as `spread`): it holds the documents' noise of a paired
    difference and the variance of two training seeds. seed_sd: the training seed's own standard
    deviation, sqrt(max(0, (retest_noise^2 - paired_stderr^2) / 2)) (NaN without a paired
    stderr). snr_seeds = spread / retest_noise: signal/noise with the seed variance counted.
    `signal`: task_signal over all references (its spread and paired_stderr).
    """
    out = {}
    for task, entry in signal.items():
        first = np.array([float(r[task]["value"]) for r in reference_results])
        second = np.array([float(r[task]["value"]) for r in replicate_results])
        if reference_results[0][task].get("per_doc_mean") == "geometric":
            first, second = np.log(first), np.log(second)
        noise = float(np.sqrt(np.mean((second - first) ** 2)))
        paired = entry["paired_stderr"]
        seed_var = (noise**2 - paired**2) / 2 if math.isfinite(paired) else float("nan")
        out[task] = {
            "retest_noise": noise,
            "seed_sd": math.sqrt(max(0.0, seed_var)) if math.isfinite(seed_var) else float("nan"),
            "snr_seeds": _ratio(entry["spread"], noise),
        }
    return out


# --- everything ---


def fidelity(
    names: list[str],
    weights: np.ndarray,
    proxy_results: list[dict[str, Any]],
    reference_results: list[dict[str, Any]],
    categories: dict[str, list[str]],
    base_result: dict[str, Any] | None = None,
    *,
    reference_training_tokens: int | None = None,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, Any]:
    """Every fidelity number for mixtures `weights` [R, D] (see the module docstring).

    base_result: the base model's evaluation on the same tasks (for the loss tasks' CRR).
    reference_training_tokens: what the references cost, the label of the weights-only fits.
    Returns {"n": R, "bootstrap": {"resamples", "level", "seed"},
    "weights_only_training_tokens", "categories": {category | "aggregate": {"proxy",
    "trivial_linear", "trivial_quadratic", "trivial_weight" (None unless the category is named
    like a dataset): {"rho", "rho_ci", "rho_top_quarter", "rho_top_quarter_ci", "regret"
    [, "training_tokens"]}, "proxy_minus": {predictor: {"diff", "ci_low", "ci_high", "verdict"}},
    "verdict", "proxy_beats_trivial"}}, "macro": {"proxy", "trivial_linear",
    "trivial_quadratic": {"rho", "rho_ci"}, "proxy_minus", "verdict"}, "crr", "crr_ci",
    "crr_tasks" [, "crr_note"], "tasks": {task: task_signal entry}, "proxy_scores",
    "reference_scores"}.
    """
    weights = np.asarray(weights, dtype=np.float64)
    proxy = _score_columns(proxy_results, categories)
    reference = _score_columns(reference_results, categories)
    index = resample_rows(len(weights), resamples, seed)
    tokens = {
        "trivial_linear": reference_training_tokens,
        "trivial_quadratic": reference_training_tokens,
        "trivial_weight": 0,
    }

    entries, replicates = {}, {}
    for category in [*categories, AGGREGATE]:
        r = reference[category]
        predictors = {
            "proxy": proxy[category],
            "trivial_linear": loo_linear_predictions(weights, r),
            "trivial_quadratic": loo_quadratic_predictions(weights, r),
            "trivial_weight": weights[:, names.index(category)] if category in names else None,
        }
        entries[category], replicates[category] = _category_entry(
            predictors, r, index, level, tokens
        )
    per_category = {c: entries[c] for c in categories}
    return {
        "n": int(len(weights)),
        "bootstrap": {"resamples": resamples, "level": level, "seed": seed},
        "weights_only_training_tokens": reference_training_tokens,
        "categories": entries,
        "macro": _macro(per_category, {c: replicates[c] for c in categories}, level, tokens),
        **capability_recovery_detail(
            proxy_results, reference_results, categories, base_result, index, level
        ),
        "tasks": task_signal(
            proxy_results, reference_results, list(dict.fromkeys(sum(categories.values(), [])))
        ),
        "proxy_scores": {c: v.tolist() for c, v in proxy.items()},
        "reference_scores": {c: v.tolist() for c, v in reference.items()},
    }
