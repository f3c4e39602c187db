"""The stages of `demix reproduce`'s protocol (the recipe, demix.recipes.reproduce, composes
them): one seed's protocol (components, searches, validate, finals), and on the first seed the
sweep of component budget x learning rate, the budget ladder of trained proxies and the merge
ablations, each against the same references; reproduce.json and reproduce.md from the seeds.
What the protocol reports (statistics over seeds, the tables) is demix.report.reproduce.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from demix.checkpoint import manifest_total
from demix.config import RunConfig, StageTraining
from demix.data.shards import CuratedData
from demix.evaluate.harness import Evaluator
from demix.fidelity import AGGREGATE, compare_predictors, fidelity
from demix.merge import relative_delta_norms
from demix.mixtures import baseline_mixtures, components_in_order, seeded_runs
from demix.model import resolve_device
from demix.proxies import merge_settings, model_id, score_key
from demix.report.reproduce import format_table, headline, l1, stability
from demix.report.summary import final_entry
from demix.stages.finals import evaluate_each, finals_by_label, judge_finals
from demix.stages.proxies import ProxyEvaluator
from demix.stages.run import Clock, train_finals
from demix.stages.search import search_stage
from demix.stages.train import train_components
from demix.stages.validate import train_references, validate_stage
from demix.stages.values import Run
from demix.storage import atomic_write_json, atomic_write_text, kept_json
from demix.train.roles import decayed_base_dir


def _tokens(paths) -> int:
    return int(manifest_total(paths, "tokens"))


def _with(config: RunConfig, section: str, **update) -> RunConfig:
    return config.model_copy(update={section: getattr(config, section).model_copy(update=update)})


def sweep_point(
    run: Run,
    point: StageTraining,
    validation: dict[str, Any],
    evaluator: Evaluator,
    out: Path,
) -> dict[str, Any]:
    """Components retrained with one budget / lr; their proxies scored against the references."""
    config, data, base = run.config, run.data, run.base
    swept = _with(config, "train", component=point)
    components = train_components(swept, data, base, out)
    weights = _weights(data, validation)
    results = kept_proxy_scores(
        Run(swept, data, base, components), validation, evaluator, out / "proxy-scores.json"
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
    run: Run, validation: dict[str, Any], evaluator: Evaluator, path: Path
) -> list[dict]:
    """The merged proxies' results on the references' mixtures, kept in `path` under a key of
    the scores' settings, the merge, the components and the mixtures: a resumed protocol
    evaluates no proxy twice."""
    config, data, base, components = run.config, run.data, run.base, run.components

    def scores() -> list[dict]:
        proxies = ProxyEvaluator(config, data, base, components, evaluator)
        return [proxies(w) for w in _weights(data, validation)]

    key = score_key(
        config.evaluate,
        data,
        base,
        device=resolve_device(config.train.device),
        merge=merge_settings(config.merge),
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
    run: Run, validation: dict[str, Any], evaluator: Evaluator, out: Path
) -> list[dict[str, Any]]:
    """Each `fidelity.ablations` merge setting's proxies against the same references: macro and
    aggregate rho, and the paired difference from the run's own merged proxies."""
    config, data = run.config, run.data
    rows = []
    weights = _weights(data, validation)
    categories = config.evaluate.categories
    for i, merge in enumerate(config.fidelity.ablations):
        unset = {"delta_dtype", "delta_device"} - merge.model_fields_set
        merge = merge.model_copy(update={k: getattr(config.merge, k) for k in unset})
        ablated = config.model_copy(update={"merge": merge})
        label = merge_label(merge)
        results = kept_proxy_scores(
            run.using(ablated), validation, evaluator, out / f"ablation-{i}.json"
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
    run: Run, validation: dict[str, Any], evaluator: Evaluator, out: Path
) -> list[dict[str, Any]]:
    """Trained proxies of the references' mixtures at `fidelity.budgets` fractions of the
    component budget (same lr and schedule, the next training seed: an independent run of a
    cheaper recipe), each against the full-budget references, next to the merged proxies
    (paired difference merged − trained: better | worse | inconclusive)."""
    config, data = run.config, run.data
    weights = _weights(data, validation)
    categories = config.evaluate.categories
    component = config.train.component
    rungs = []
    for fraction in config.fidelity.budgets:
        tokens = max(1, round(fraction * component.tokens))
        rung = _with(config, "train", component=component.model_copy(update={"tokens": tokens}))
        results, trained_tokens = train_references(
            run.using(rung),
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
    run: Run,
    out: Path,
    evaluator: Evaluator,
    timed: Clock,
    first: bool,
) -> dict[str, Any]:
    """One seed of the protocol into `out`: components, the merged search, validate (with
    replicates), final models; the first seed also the training-based search, the sweep, the
    budget ladder and the ablations. With `fidelity.finals: false` no search and no final model
    (fidelity only). Returns the seed's result (reproduce.json's per seed). `run`: the seed's
    config, the data and the base; the seed's components are trained here."""
    config, data, base = run.config, run.data, run.base
    seed = config.seed
    merge_config = _with(config, "search", method="merge")
    decide = config.fidelity.finals  # false: fidelity only (no searches, no finals)
    with timed(f"components/{seed}"):
        run = Run(config, data, base, train_components(config, data, base, out / "models"))
    components = run.components
    merged = None
    if decide:
        with timed(f"search_merge/{seed}"):
            merged = search_stage(run.using(merge_config), out / "search-merge", evaluator)
    trained = None
    if first and decide and config.fidelity.trained_search:
        trained_config = _with(config, "search", method="trained")
        with timed(f"search_trained/{seed}"):
            trained = search_stage(
                Run(trained_config, data, base), out / "search-trained", evaluator
            )
    with timed(f"validate/{seed}"):
        validation = validate_stage(run, out / "validate", evaluator)
    sweep, ladder, ablations = [], [], []
    if first:
        with timed("sweep"):
            if config.fidelity.sweep:  # the run's own components: the sweep's reference row
                norms = list(validation["relative_delta_norms"].values())
                sweep.append(sweep_entry(config.train.component, norms, validation))
            for point in config.fidelity.sweep:
                folder = out / "sweep" / f"tokens{point.tokens}-lr{point.lr:g}"
                sweep.append(sweep_point(run, point, validation, evaluator, folder))
        with timed("budgets"):
            ladder = budget_ladder(run, validation, evaluator, out / "budgets")
        with timed("ablations"):
            ablations = ablation_rows(run, validation, evaluator, out / "ablations")
    merge_tokens = _tokens(components.values())
    if not decide:
        matched = matched_fidelity(ladder, sum(config.search.round_sizes), merge_tokens)
        extra = {"sweep": sweep, "budgets": ladder, "ablations": ablations, "matched": matched}
        return fidelity_only(seed, data, validation, extra, merge_tokens)
    mixtures = {"chosen_merge": merged["mixture"], **baseline_mixtures(data)}
    if trained is not None:
        mixtures["chosen_trained"] = trained["mixture"]
    with timed(f"final/{seed}"):
        runs = seeded_runs(mixtures, config.final.seeds)
        per_run = {run: mixtures[run.label] for run in runs}
        finals = train_finals(run, per_run, out / "models")
        results = finals_by_label(runs, evaluate_each(config, data, finals, evaluator))
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


def seed_folder(out: Path, offset: int) -> Path:
    """Where seed run-seed + offset works: the run folder itself for the first."""
    return out if offset == 0 else out / f"seed-{offset}"


def write_reproduce(
    run: Run, per_seed: list[dict[str, Any]], out: Path, timings: dict[str, float]
) -> dict[str, Any]:
    """reproduce.json's data from the seeds' results, written with reproduce.md (the table)
    into `out`: the first seed's result at the top level (as with one seed), `per_seed`,
    `stability`, the `headline` and the training tokens of every role, the base included."""
    config, base = run.config, run.base
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
        "timings_s": timings,
    }
    atomic_write_json(out / "reproduce.json", result)
    atomic_write_text(out / "reproduce.md", format_table(result))
    return result
