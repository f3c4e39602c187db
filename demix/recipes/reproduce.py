"""`demix reproduce`: the paper's protocol on one config, with a training-based baseline.

Runs, in one folder (every step resumes): curation, the base, the components, the merged-proxy
search, the training-based search over the same number of proxies, `validate` (merged proxies vs
trained references, next to weights-only predictors), a sweep of component budget x learning rate
(fidelity against the same references as the updates grow), and final models for both chosen
mixtures and the two baselines. `fidelity.finals: false` leaves out the searches and the final
models (fidelity only; the decision is `demix reproduce-decision`'s). Writes reproduce.json and
reproduce.md (the table) and prints it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from demix.checkpoint import manifest_total
from demix.config import RunConfig, StageTraining
from demix.data.shards import CuratedData
from demix.evaluate.harness import Evaluator
from demix.fidelity import AGGREGATE, compare_predictors, fidelity
from demix.merge import relative_delta_norms
from demix.mixtures import baseline_mixtures, components_in_order, seeded_names, split_seed
from demix.model import resolve_device
from demix.proxies import ProxyEvaluator, make_evaluator, merge_settings, model_id, score_key
from demix.recipes.run import StageClock, prepare_models, start_run_folder, train_finals
from demix.recipes.validate import train_references, validate_stage
from demix.report.anchors import anchor_lines
from demix.report.fidelity import RELIABILITY_HEADER, reliability_rows, task_rows
from demix.report.html import markdown_table
from demix.report.summary import final_entry, format_comparison, format_interval
from demix.stages import (
    evaluate_each,
    finals_by_label,
    judge_finals,
    search_stage,
    train_components,
)
from demix.storage import atomic_write_json, atomic_write_text, kept_json
from demix.train.roles import decayed_base_dir


def _tokens(paths) -> int:
    return int(manifest_total(paths, "tokens"))


def _with(config: RunConfig, section: str, **update) -> RunConfig:
    return config.model_copy(update={section: getattr(config, section).model_copy(update=update)})


def sweep_point(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    point: StageTraining,
    validation: dict[str, Any],
    evaluator: Evaluator,
    out: Path,
) -> dict[str, Any]:
    """Components retrained with one budget / lr; their proxies scored against the references."""
    swept = _with(config, "train", component=point)
    components = train_components(swept, data, base, out)
    weights = _weights(data, validation)
    results = kept_proxy_scores(
        swept, data, base, components, validation, evaluator, out / "proxy-scores.json"
    )
    measured = fidelity(
        data.names,
        weights,
        results,
        validation["reference_results"],
        config.evaluate.categories,
        validation.get("base_result"),
        reference_training_tokens=validation["cost"]["reference_training_tokens"],
    )
    norms = relative_delta_norms(base, components_in_order(data, components))
    return sweep_entry(point, norms, measured)


def sweep_entry(point: StageTraining, norms, measured: dict[str, Any]) -> dict[str, Any]:
    """A sweep row: the components' budget, lr and delta norms, their proxies' fidelity."""
    aggregate, macro = measured["categories"][AGGREGATE], measured["macro"]
    return {
        "tokens": point.tokens,
        "lr": point.lr,
        "mean_delta_norm": float(np.mean(norms)),
        "max_delta_norm": float(np.max(norms)),
        "macro_rho_proxy": macro["proxy"]["rho"],
        "macro_rho_proxy_ci": macro["proxy"]["rho_ci"],
        "rho_proxy": aggregate["proxy"]["rho"],
        "rho_proxy_ci": aggregate["proxy"]["rho_ci"],
        "rho_weights_fit": aggregate["trivial_linear"]["rho"],
        "rho_quadratic_fit": aggregate["trivial_quadratic"]["rho"],
        "proxy_minus_quadratic_fit": aggregate["proxy_minus"]["trivial_quadratic"],
        "regret_proxy": aggregate["proxy"]["regret"],
        "crr": measured["crr"]["mean"],
        "crr_ci": measured["crr_ci"]["mean"],
    }


def _weights(data: CuratedData, validation: dict[str, Any]) -> np.ndarray:
    return np.array([[m[n] for n in data.names] for m in validation["mixtures"]])


def kept_proxy_scores(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    components: dict[str, Path],
    validation: dict[str, Any],
    evaluator: Evaluator,
    path: Path,
) -> list[dict]:
    """The merged proxies' results on the references' mixtures, kept in `path` under a key of
    the scores' settings, the merge, the components and the mixtures: a resumed protocol
    evaluates no proxy twice."""

    def scores() -> list[dict]:
        proxies = ProxyEvaluator(config, data, base, components, evaluator)
        return [proxies(w) for w in _weights(data, validation)]

    key = score_key(
        config,
        data,
        base,
        merge=merge_settings(config),
        components=[model_id(components[n]) for n in data.names],
        mixtures=[m["id"] for m in validation["mixtures"]],
    )
    return kept_json(path, key, scores)


def _rho_entry(measured: dict[str, Any]) -> dict[str, Any]:
    aggregate, macro = measured["categories"][AGGREGATE], measured["macro"]
    return {
        "macro_rho": macro["proxy"]["rho"],
        "macro_rho_ci": macro["proxy"]["rho_ci"],
        "rho": aggregate["proxy"]["rho"],
        "rho_ci": aggregate["proxy"]["rho_ci"],
    }


def ablation_rows(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    components: dict[str, Path],
    validation: dict[str, Any],
    evaluator: Evaluator,
    out: Path,
) -> list[dict[str, Any]]:
    """Each `fidelity.ablations` merge setting's proxies against the same references: macro and
    aggregate rho, and the paired difference from the run's own merged proxies."""
    rows = []
    weights = _weights(data, validation)
    categories = config.evaluate.categories
    for i, merge in enumerate(config.fidelity.ablations):
        unset = {"delta_dtype", "delta_device"} - merge.model_fields_set
        merge = merge.model_copy(update={k: getattr(config.merge, k) for k in unset})
        ablated = config.model_copy(update={"merge": merge})
        label = merge_label(merge)
        results = kept_proxy_scores(
            ablated, data, base, components, validation, evaluator, out / f"ablation-{i}.json"
        )
        measured = fidelity(
            data.names, weights, results, validation["reference_results"], categories
        )
        versus = compare_predictors(
            results, validation["proxy_results"], validation["reference_results"], categories
        )
        rows.append({"label": label, **_rho_entry(measured), "minus_run": versus})
    return rows


def merge_label(merge) -> str:
    """`ties (component, density=0.2)`: a merge setting in one cell."""
    params = "".join(f", {k}={v:g}" for k, v in merge.parameters.items())
    return f"{merge.method} ({merge.weights}{params})"


def budget_ladder(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    validation: dict[str, Any],
    evaluator: Evaluator,
    out: Path,
) -> list[dict[str, Any]]:
    """Trained proxies of the references' mixtures at `fidelity.budgets` fractions of the
    component budget (same lr and schedule, the next training seed: an independent run of a
    cheaper recipe), each against the full-budget references, next to the merged proxies
    (paired difference merged − trained: better | worse | inconclusive)."""
    weights = _weights(data, validation)
    categories = config.evaluate.categories
    component = config.train.component
    rungs = []
    for fraction in config.fidelity.budgets:
        tokens = max(1, round(fraction * component.tokens))
        rung = _with(config, "train", component=component.model_copy(update={"tokens": tokens}))
        results, trained_tokens = train_references(
            rung,
            data,
            base,
            weights,
            out / f"budget-{fraction:g}",
            evaluator,
            seed_offset=1,
            role_label=f"budget {fraction:g}",
        )
        measured = fidelity(
            data.names, weights, results, validation["reference_results"], categories
        )
        rungs.append(
            {
                "fraction": fraction,
                "tokens_per_proxy": trained_tokens / len(weights),
                **_rho_entry(measured),
                "merged_minus_trained": compare_predictors(
                    validation["proxy_results"],
                    results,
                    validation["reference_results"],
                    categories,
                ),
            }
        )
    return rungs


def matched_fidelity(
    rungs: list[dict[str, Any]], proxies: int, merge_tokens: int, score: str = "macro"
) -> dict[str, Any] | None:
    """The training tokens of a trained-proxy search of `proxies` proxies at the smallest budget
    whose fidelity is not distinguishable from the merged proxies' (paired difference on `score`
    inconclusive), over the merged search's (its components') tokens.

    bound: "matched" (a rung below it is told apart), "at_most" (the smallest rung still matches:
    a smaller budget might too), "below" (trained proxies beat the merged ones at every budget:
    the matched budget is under the smallest, so is the ratio), "above" (the merged proxies beat
    every rung: the ratio is at least the largest rung's), "undetermined" (not monotone).
    None without rungs.
    """
    if not rungs:
        return None
    ordered = sorted(rungs, key=lambda r: r["fraction"])
    verdicts = [r["merged_minus_trained"][score]["verdict"] for r in ordered]

    def ratio(rung):
        return proxies * rung["tokens_per_proxy"] / max(1, merge_tokens)

    matched = [r for r, v in zip(ordered, verdicts, strict=True) if v == "inconclusive"]
    if matched:
        rung, bound = matched[0], "at_most" if matched[0] is ordered[0] else "matched"
    elif all(v == "worse" for v in verdicts):
        rung, bound = ordered[0], "below"
    elif all(v == "better" for v in verdicts):
        rung, bound = ordered[-1], "above"
    else:
        rung, bound = ordered[0], "undetermined"
    return {
        "ratio": ratio(rung),
        "fraction": rung["fraction"],
        "bound": bound,
        "score": score,
        "proxies": proxies,
    }


def seed_protocol(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    out: Path,
    evaluator: Evaluator,
    timed: StageClock,
    first: bool,
) -> dict[str, Any]:
    """One seed of the protocol into `out`: components, the merged search, validate (with
    replicates), final models; the first seed also the training-based search, the sweep, the
    budget ladder and the ablations. With `fidelity.finals: false` no search and no final model
    (fidelity only). Returns the seed's result (reproduce.json's per seed)."""
    seed = config.seed
    merge_config = _with(config, "search", method="merge")
    decide = config.fidelity.finals  # false: fidelity only (no searches, no finals)
    with timed(f"components/{seed}"):
        components = train_components(config, data, base, out / "models")
    merged = None
    if decide:
        with timed(f"search_merge/{seed}"):
            merged = search_stage(
                merge_config, data, base, components, out / "search-merge", evaluator
            )
    trained = None
    if first and decide and config.fidelity.trained_search:
        trained_config = _with(config, "search", method="trained")
        with timed(f"search_trained/{seed}"):
            trained = search_stage(
                trained_config, data, base, {}, out / "search-trained", evaluator
            )
    with timed(f"validate/{seed}"):
        validation = validate_stage(config, data, base, components, out / "validate", evaluator)
    sweep, ladder, ablations = [], [], []
    if first:
        with timed("sweep"):
            if config.fidelity.sweep:  # the run's own components: the sweep's reference row
                norms = list(validation["relative_delta_norms"].values())
                sweep.append(sweep_entry(config.train.component, norms, validation))
            for point in config.fidelity.sweep:
                folder = out / "sweep" / f"tokens{point.tokens}-lr{point.lr:g}"
                sweep.append(sweep_point(config, data, base, point, validation, evaluator, folder))
        with timed("budgets"):
            ladder = budget_ladder(config, data, base, validation, evaluator, out / "budgets")
        with timed("ablations"):
            ablations = ablation_rows(
                config, data, base, components, validation, evaluator, out / "ablations"
            )
    merge_tokens = _tokens(components.values())
    if not decide:
        matched = matched_fidelity(ladder, sum(config.search.round_sizes), merge_tokens)
        extra = {"sweep": sweep, "budgets": ladder, "ablations": ablations, "matched": matched}
        return fidelity_only(seed, data, validation, extra, merge_tokens)
    mixtures = {"chosen_merge": merged["mixture"], **baseline_mixtures(data)}
    if trained is not None:
        mixtures["chosen_trained"] = trained["mixture"]
    with timed(f"final/{seed}"):
        names = seeded_names(mixtures, config.final.seeds)
        runs = {name: mixtures[split_seed(name)[0]] for name in names}
        finals = train_finals(config, data, base, runs, out / "models")
        results = finals_by_label(names, evaluate_each(config, data, finals, evaluator))
        baselines = {label: results[label] for label in baseline_mixtures(data)}
        chosen_labels = ["chosen_merge"] + (["chosen_trained"] if trained is not None else [])
        verdicts = {
            chosen: judge_finals(config, {chosen: results[chosen], **baselines}, chosen)
            for chosen in chosen_labels
        }

    searches = {
        "merge": {
            "proxies_evaluated": merged["proxies_evaluated"],
            "training_tokens": merge_tokens,
            "predicted_score": merged.get("predicted_score"),
        },
    }
    if trained is not None:
        searches["trained"] = {
            "proxies_evaluated": trained["proxies_evaluated"],
            "training_tokens": trained["proxy_training_tokens"],
            "predicted_score": trained.get("predicted_score"),
        }
        searches["token_ratio"] = trained["proxy_training_tokens"] / max(1, merge_tokens)
        searches["l1_merge_vs_trained"] = l1(merged["mixture"], trained["mixture"])
    cost = validation["cost"]
    return {
        "seed": seed,
        "datasets": data.names,
        "fidelity": {k: validation[k] for k in FIDELITY_KEYS if k in validation},
        "sweep": sweep,
        "budgets": ladder,
        "matched_fidelity": matched_fidelity(ladder, merged["proxies_evaluated"], merge_tokens),
        "ablations": ablations,
        "searches": searches,
        "mixtures": mixtures,
        "final": {label: final_entry(label_runs) for label, label_runs in results.items()},
        "verdicts": verdicts,
        "training_tokens": {
            "components": merge_tokens,
            "search_trained": trained["proxy_training_tokens"] if trained else 0,
            "references": cost["reference_training_tokens"],
            "replicates": cost.get("replicate_training_tokens", 0),
            "control": cost.get("control_training_tokens", 0),
            "budgets": int(
                sum(r["tokens_per_proxy"] * len(validation["mixtures"]) for r in ladder)
            ),
            "final": _tokens(finals.values()),
        },
    }


def fidelity_only(
    seed: int,
    data: CuratedData,
    validation: dict[str, Any],
    extra: dict[str, Any],
    merge_tokens: int,
) -> dict[str, Any]:
    """A seed's result without searches and finals (`fidelity.finals: false`): the same keys,
    empty where the decision would be. extra: the first seed's sweep, budgets, ablations and
    matched fidelity (against a search of search.rounds' proxies)."""
    cost, ladder = validation["cost"], extra["budgets"]
    return {
        "seed": seed,
        "datasets": data.names,
        "fidelity": {k: validation[k] for k in FIDELITY_KEYS if k in validation},
        "sweep": extra["sweep"],
        "budgets": ladder,
        "matched_fidelity": extra["matched"],
        "ablations": extra["ablations"],
        "searches": {"merge": {"proxies_evaluated": 0, "training_tokens": merge_tokens}},
        "mixtures": {},
        "final": {},
        "verdicts": {},
        "training_tokens": {
            "components": merge_tokens,
            "search_trained": 0,
            "references": cost["reference_training_tokens"],
            "replicates": cost.get("replicate_training_tokens", 0),
            "control": cost.get("control_training_tokens", 0),
            "budgets": int(
                sum(r["tokens_per_proxy"] * len(validation["mixtures"]) for r in ladder)
            ),
            "final": 0,
        },
    }


FIDELITY_KEYS = (
    "n",
    "bootstrap",
    "weights_only_training_tokens",
    "categories",
    "macro",
    "crr",
    "crr_ci",
    "crr_tasks",
    "crr_note",
    "tasks",
    "reliability",
    "fidelity_by_hull",
    "relative_delta_norms",
    "anchors",
    "diagnostics",
)


def l1(a: dict[str, float], b: dict[str, float]) -> float:
    """L1 distance between two mixtures over the same datasets."""
    return float(sum(abs(a[k] - b[k]) for k in a))


def seed_folder(out: Path, offset: int) -> Path:
    """Where seed run-seed + offset works: the run folder itself for the first."""
    return out if offset == 0 else out / f"seed-{offset}"


def reproduce(config: RunConfig, out: str | Path) -> dict[str, Any]:
    """Every step of the protocol into `out`, for each of `fidelity.seeds` seeds; returns (and
    writes) reproduce.json's data: the first seed's result at the top level (as with one seed),
    `per_seed`, `stability` and the `headline`.

    The seeds share the curated data and the base (trained once, with the run seed); each seed
    s trains its own components, samples its own proxies and reference mixtures, trains its
    references, replicates and final models with run seed + s.
    """
    out = start_run_folder(config, out)
    timed = StageClock()
    data, base, _ = prepare_models(config, out, timed, components=False)
    evaluator = make_evaluator(config, data, resolve_device(config.train.device))
    per_seed = [
        seed_protocol(
            config.model_copy(update={"seed": config.seed + s}),
            data,
            base,
            seed_folder(out, s),
            evaluator,
            timed,
            first=s == 0,
        )
        for s in range(config.fidelity.seeds)
    ]
    result = {
        **per_seed[0],
        "headline": headline(per_seed),
        "stability": stability(per_seed),
        "per_seed": per_seed,
        "training_tokens": {
            # the branch point, and its decayed copy where one was made
            "base": 0 if config.model.base else _tokens([base, decayed_base_dir(base)]),
            **{
                k: sum(s["training_tokens"][k] for s in per_seed)
                for k in per_seed[0]["training_tokens"]
            },
        },
        "timings_s": timed.timings,
    }
    atomic_write_json(out / "reproduce.json", result)
    table = format_table(result)
    atomic_write_text(out / "reproduce.md", table)
    return result


def _over_seeds(values: list[float], intervals: list[list[float]]) -> dict[str, float]:
    """{"mean", "ci_low", "ci_high"} of a statistic measured once per seed.

    One seed: its value and its own 95% bootstrap interval. Several: the mean, and mean +-
    1.96 se with se^2 = max(between-seed variance, mean within-seed variance) / seeds, the
    within-seed variance read off each seed's interval as ((high - low) / 3.92)^2: a normal
    approximation that neither ignores the spread of the seeds nor trusts a variance of 2-3
    values alone. NaN where a seed's value is.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 1:
        return {"mean": float(values[0]), "ci_low": intervals[0][0], "ci_high": intervals[0][1]}
    within = np.mean([((hi - lo) / (2 * 1.959964)) ** 2 for lo, hi in intervals])
    between = float(np.var(values, ddof=1))
    se = math.sqrt(max(between, within) / values.size)
    mean = float(values.mean())
    return {"mean": mean, "ci_low": mean - 1.959964 * se, "ci_high": mean + 1.959964 * se}


def _retest(seed: dict[str, Any]) -> dict[str, Any] | None:
    """A seed's references' test-retest entry (aggregate), None without replicates."""
    reliability = seed["fidelity"].get("reliability", {})
    return reliability.get("categories", {}).get(AGGREGATE, {}).get("retest")


def headline(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """reproduce.json's `headline`: the numbers a reader compares with the paper's, as means
    over seeds with 95% intervals (see _over_seeds); NaN where a seed did not measure one
    (reference_retest_rho without fidelity.replicates, the matched ratio without budgets)."""
    nan = [float("nan"), float("nan")]

    def fid(seed, *path):
        entry = seed["fidelity"]
        for key in path:
            entry = entry.get(key) if isinstance(entry, dict) else None
            if entry is None:
                return None
        return entry

    def statistic(get):
        pairs = [get(s) or (float("nan"), nan) for s in per_seed]
        return _over_seeds([p[0] for p in pairs], [p[1] for p in pairs])

    def rho(*path):
        def get(seed):
            entry = fid(seed, *path)
            return (entry["rho"], entry["rho_ci"]) if entry else None

        return get

    def retest(seed):
        entry = _retest(seed)
        return (entry["rho"], entry["rho_ci"]) if entry else None

    def crr(seed):
        return (seed["fidelity"]["crr"]["mean"], seed["fidelity"]["crr_ci"]["mean"])

    def crr_vs_control(seed):
        entry = fid(seed, "anchors", "crr", "control")
        return (entry["crr"]["mean"], entry["crr_ci"]["mean"]) if entry else None

    first = per_seed[0]
    matched = first.get("matched_fidelity")
    chosen = [s["mixtures"]["chosen_merge"] for s in per_seed if s["mixtures"]]
    pairs = [l1(a, b) for i, a in enumerate(chosen) for b in chosen[i + 1 :]]

    def minus(predictor):
        def get(seed):
            entry = fid(seed, "macro", "proxy_minus", predictor)
            return (entry["diff"], [entry["ci_low"], entry["ci_high"]]) if entry else None

        return get

    return {
        "seeds": len(per_seed),
        "macro_rho": statistic(rho("macro", "proxy")),
        "aggregate_rho": statistic(rho("categories", AGGREGATE, "proxy")),
        "reference_retest_rho": statistic(retest),
        "crr_improvement": statistic(crr),
        "crr_improvement_vs_control": statistic(crr_vs_control),
        "matched_fidelity_token_ratio": matched["ratio"] if matched else float("nan"),
        "matched_fidelity_bound": matched["bound"] if matched else None,
        "search_l1_between_seeds": float(np.mean(pairs)) if pairs else float("nan"),
        # paired macro rho(proxy) - rho(weights-only predictor), per seed then over seeds
        "macro_minus": {p: statistic(minus(p)) for p in MACRO_PREDICTORS},
        "verdicts": {
            baseline: [
                s["verdicts"]["chosen_merge"][baseline]["objective"]["verdict"]
                for s in per_seed
                if s["verdicts"]
            ]
            for baseline in ("token_prior", "uniform")
        },
    }


MACRO_PREDICTORS = ("trivial_linear", "trivial_quadratic", "trivial_weight")


def stability(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """The chosen mixtures of every seed with the search's predicted objective and the final
    models' measured one (chosen − token prior, standardised, with its interval); L1 distances
    between seeds' chosen mixtures, and between the merged and trained searches of a seed."""
    rows = []
    for s in per_seed:
        for search, label in (("merge", "chosen_merge"), ("trained", "chosen_trained")):
            if label not in s["mixtures"]:
                continue
            measured = s["verdicts"][label]["token_prior"]["objective"]
            rows.append(
                {
                    "seed": s["seed"],
                    "search": search,
                    "mixture": s["mixtures"][label],
                    "predicted_score": s["searches"][search].get("predicted_score"),
                    "measured_vs_token_prior": measured,
                }
            )
    chosen = {s["seed"]: s["mixtures"]["chosen_merge"] for s in per_seed if s["mixtures"]}
    seeds = sorted(chosen)
    return {
        "chosen": rows,
        "l1_between_seeds": {
            f"{a}-{b}": l1(chosen[a], chosen[b])
            for i, a in enumerate(seeds)
            for b in seeds[i + 1 :]
        },
        "l1_merge_vs_trained": {
            s["seed"]: s["searches"]["l1_merge_vs_trained"]
            for s in per_seed
            if "l1_merge_vs_trained" in s["searches"]
        },
    }


def _tokens_label(tokens: int | None) -> str:
    return "tokens unknown" if tokens is None else f"{tokens:,} tokens"


def _fidelity_lines(fid: dict[str, Any]) -> list[str]:
    """The rank table (rho with intervals, regret, CRR), the paired proxy-minus-predictor table
    and the per-task signal/noise table."""
    label = _tokens_label(fid.get("weights_only_training_tokens"))
    resamples = fid.get("bootstrap", {}).get("resamples", "?")
    lines = [
        f"Fidelity over {fid['n']} mixtures (merged proxy vs trained reference; [95% bootstrap "
        f"interval over mixtures, {resamples} resamples]). Weights-only fits are trained on the "
        f"references ({label}); macro = mean of the per-category rhos (CRR: mean over "
        f"categories).",
        "",
        f"| score | rho proxy | rho linear fit ({label}) | rho quadratic fit ({label}) | "
        f"rho own weight | regret proxy | regret linear fit | CRR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = {**fid["categories"], "macro": fid["macro"]}
    for score, entry in rows.items():
        proxy, fit, quad = entry["proxy"], entry["trivial_linear"], entry["trivial_quadratic"]
        own = entry.get("trivial_weight")
        crr_key = "mean" if score == "macro" else score
        crr = (
            format_interval(fid["crr"][crr_key], fid["crr_ci"][crr_key])
            if crr_key in fid["crr"]
            else "-"
        )
        regrets = f"{proxy['regret']:.3f} | {fit['regret']:.3f}" if "regret" in proxy else "- | -"
        rhos = [
            format_interval(e["rho"], e["rho_ci"]) if e else "-" for e in (proxy, fit, quad, own)
        ]
        lines.append(f"| {score} | {' | '.join(rhos)} | {regrets} | {crr} |")
    lines += [
        "",
        "CRR per task: sum of proxy / sum of reference values where higher is better; "
        "(L_base - L_proxy) / (L_base - L_reference) for losses (1 = the references' "
        "improvement over the base, 0 = none)."
        + (f" {fid['crr_note']}." if "crr_note" in fid else ""),
        "",
        "Paired rho(proxy) - rho(predictor) on the same resamples [95% interval] and verdict:",
        "",
        "| score | proxy − linear fit | proxy − quadratic fit | proxy − own weight | overall |",
        "|---|---|---|---|---|",
    ]
    for score, entry in rows.items():
        minus = entry["proxy_minus"]
        cells = [
            format_comparison(minus[k]) if k in minus else "-"
            for k in ("trivial_linear", "trivial_quadratic", "trivial_weight")
        ]
        lines.append(f"| {score} | {' | '.join(cells)} | {entry['verdict']} |")
    if fid.get("reliability"):
        rel = fid["reliability"]
        lines += [
            "",
            f"Reliability ({rel['k']} references trained again with the next seed; the proxies' "
            "rho on the same mixtures):",
            "",
            *markdown_table(RELIABILITY_HEADER, reliability_rows(rel)),
        ]
    lines += ["", *markdown_table(*task_rows(fid["tasks"]))]
    if fid.get("diagnostics"):
        lines += [
            "",
            "Diagnostics (in no objective: a candidate's own-domain loss ranks mixtures by its "
            "weight alone):",
            "",
            *markdown_table(*task_rows(fid["diagnostics"])),
        ]
    if fid.get("anchors"):
        lines += anchor_lines(fid["anchors"])
    return lines


def _sweep_lines(sweep: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "| component tokens | lr | mean ‖Δ‖/‖base‖ | macro rho proxy | rho proxy | "
        "rho linear fit | rho quadratic fit | proxy − quadratic fit | regret | CRR |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for point in sweep:
        lines.append(
            f"| {point['tokens']:,} | {point['lr']:g} | {point['mean_delta_norm']:.3f} | "
            f"{format_interval(point['macro_rho_proxy'], point['macro_rho_proxy_ci'])} | "
            f"{format_interval(point['rho_proxy'], point['rho_proxy_ci'])} | "
            f"{point['rho_weights_fit']:.3f} | {point['rho_quadratic_fit']:.3f} | "
            f"{format_comparison(point['proxy_minus_quadratic_fit'])} | "
            f"{point['regret_proxy']:.3f} | {format_interval(point['crr'], point['crr_ci'])} |"
        )
    return lines


def format_table(result: dict[str, Any]) -> str:
    """The one table of `demix reproduce`, as Markdown."""
    fid = result["fidelity"]
    lines = _fidelity_lines(fid)
    norms = ", ".join(f"{n} {v:.3f}" for n, v in fid["relative_delta_norms"].items())
    searches = result["searches"]
    lines += ["", f"Component ‖Δ‖/‖base‖: {norms}"]
    if not searches["merge"]["proxies_evaluated"]:  # fidelity only: no search ran
        searches = {}
    lines += (
        [
            "",
            "| search | proxies evaluated | training tokens |",
            "|---|---|---|",
            f"| merged proxies | {searches['merge']['proxies_evaluated']} | "
            f"{searches['merge']['training_tokens']:,} (components) |",
        ]
        if searches
        else []
    )
    if "trained" in searches:
        lines += [
            f"| trained proxies | {searches['trained']['proxies_evaluated']} | "
            f"{searches['trained']['training_tokens']:,} |",
            f"| ratio | | {searches['token_ratio']:.2f}x fewer with merging |",
        ]
    if result["verdicts"]:
        lines += _final_lines(result)
    if result["sweep"]:
        lines += _sweep_lines(result["sweep"])
    if result.get("budgets"):
        lines += _budget_lines(result)
    if result.get("ablations"):
        lines += _ablation_lines(result["ablations"])
    if "headline" in result:
        lines += _seed_lines(result)
    return "\n".join(lines) + "\n"


def _final_lines(result: dict[str, Any]) -> list[str]:
    """The final models' mixtures and the verdicts of the chosen ones."""
    lines = [
        "",
        f"| final model | {' | '.join('w ' + n for n in result['datasets'])} |",
        "|---" * (len(result["datasets"]) + 1) + "|",
    ]
    for label, weights in result["mixtures"].items():
        row = " | ".join(f"{weights[n]:.3f}" for n in result["datasets"])
        lines.append(f"| {label} | {row} |")
    seeds = next(iter(result["final"].values()))["seeds"]
    lines += [
        "",
        f"Verdict ({seeds} seed(s); chosen − baseline, standardised, 95% bootstrap interval "
        "with Holm over the baselines):",
        "",
        "| chosen | baseline | score | difference [95% interval] verdict |",
        "|---|---|---|---|",
    ]
    for chosen, verdict in result["verdicts"].items():
        for baseline, entries in verdict.items():
            for key, entry in entries.items():
                if key != "tasks":
                    lines.append(f"| {chosen} | {baseline} | {key} | {format_comparison(entry)} |")
    return lines


def _rhos(entry: dict[str, Any]) -> list[str]:
    return [
        format_interval(entry["macro_rho"], entry["macro_rho_ci"]),
        format_interval(entry["rho"], entry["rho_ci"]),
    ]


def _budget_lines(result: dict[str, Any]) -> list[str]:
    merged_tokens = result["searches"]["merge"]["training_tokens"]
    rows = [
        [
            f"{rung['fraction']:g}",
            f"{rung['tokens_per_proxy']:,.0f}",
            *_rhos(rung),
            format_comparison(rung["merged_minus_trained"]["macro"]),
            format_comparison(rung["merged_minus_trained"][AGGREGATE]),
        ]
        for rung in result["budgets"]
    ]
    lines = [
        "",
        "Trained proxies at a fraction of the component budget (the next seed), against the "
        f"same references; merged proxies cost {merged_tokens:,} tokens (components):",
        "",
        *markdown_table(
            [
                "budget",
                "tokens per proxy",
                "macro rho",
                "aggregate rho",
                "merged − trained (macro)",
                "merged − trained (aggregate)",
            ],
            rows,
        ),
    ]
    matched = result.get("matched_fidelity")
    if matched:
        lines += [
            "",
            f"Matched fidelity ({matched['score']} rho; {matched['bound']}): a trained-proxy "
            f"search of {matched['proxies']} proxies at {matched['fraction']:g} of the budget "
            f"costs {matched['ratio']:.2f}x the merged search's tokens.",
        ]
    return lines


def _ablation_lines(rows: list[dict[str, Any]]) -> list[str]:
    table = [
        [
            row["label"],
            *_rhos(row),
            format_comparison(row["minus_run"]["macro"]),
            format_comparison(row["minus_run"][AGGREGATE]),
        ]
        for row in rows
    ]
    return [
        "",
        "Merge ablations against the same references (paired difference from the run's merge):",
        "",
        *markdown_table(
            ["merge", "macro rho", "aggregate rho", "− run (macro)", "− run (aggregate)"], table
        ),
    ]


def _crr_vs_control(fid: dict[str, Any]) -> str:
    """A seed's improvement-CRR against the control, "-" where it was not measured."""
    entry = fid.get("anchors", {}).get("crr", {}).get("control")
    return format_interval(entry["crr"]["mean"], entry["crr_ci"]["mean"]) if entry else "-"


def _format_mean(entry: dict[str, float]) -> str:
    return format_interval(entry["mean"], [entry["ci_low"], entry["ci_high"]])


def _seed_lines(result: dict[str, Any]) -> list[str]:
    """The per-seed table and its mean row; what a run did not measure (the test-retest rho
    without fidelity.replicates, the L1 between seeds with one seed) is "-", not NaN."""
    head = result["headline"]
    rows = []
    for s in result["per_seed"]:
        fid = s["fidelity"]
        retest = _retest(s)
        rows.append(
            [
                s["seed"],
                format_interval(fid["macro"]["proxy"]["rho"], fid["macro"]["proxy"]["rho_ci"]),
                format_interval(
                    fid["categories"][AGGREGATE]["proxy"]["rho"],
                    fid["categories"][AGGREGATE]["proxy"]["rho_ci"],
                ),
                format_interval(retest["rho"], retest["rho_ci"]) if retest else "-",
                format_interval(fid["crr"]["mean"], fid["crr_ci"]["mean"]),
                _crr_vs_control(fid),
                *(
                    format_comparison(fid["macro"]["proxy_minus"][p])
                    if p in fid["macro"].get("proxy_minus", {})
                    else "-"
                    for p in MACRO_PREDICTORS
                ),
                ", ".join(f"{v:.3f}" for v in s["mixtures"].get("chosen_merge", {}).values())
                or "-",
                *(
                    s["verdicts"]["chosen_merge"][b]["objective"]["verdict"]
                    if s["verdicts"]
                    else "-"
                    for b in ("token_prior", "uniform")
                ),
            ]
        )
    rows.append(
        [
            "mean [95%]",
            _format_mean(head["macro_rho"]),
            _format_mean(head["aggregate_rho"]),
            _format_mean(head["reference_retest_rho"])
            if any(_retest(s) for s in result["per_seed"])
            else "-",
            _format_mean(head["crr_improvement"]),
            _format_mean(head["crr_improvement_vs_control"])
            if "crr_improvement_vs_control" in head
            else "-",
            *(
                _format_mean(head["macro_minus"][p]) if p in head.get("macro_minus", {}) else "-"
                for p in MACRO_PREDICTORS
            ),
            f"L1 between seeds {head['search_l1_between_seeds']:.3f}"
            if head["seeds"] > 1
            else "L1 between seeds: - (one seed)",
            "",
            "",
        ]
    )
    return [
        "",
        f"Per seed ({head['seeds']}; the seeds share the data and the base):",
        "",
        *markdown_table(
            [
                "seed",
                "macro rho",
                "aggregate rho",
                "references' test-retest rho",
                "CRR (improvement)",
                "CRR vs control",
                "macro: proxy − linear fit",
                "macro: proxy − quadratic fit",
                "macro: proxy − own weight",
                "chosen (merged)",
                "vs token prior",
                "vs uniform",
            ],
            rows,
        ),
    ]
