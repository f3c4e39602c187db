"""The stages of `demix reproduce-decision`'s protocol (the recipe, demix.recipes.decision,
composes them): at each budget the components, the merged searches, the trained-proxy search
(the RegMix recipe) and the weights-only fits on its proxies; then the final models of every
chosen mixture and the token prior, and the paired verdicts (demix.decision); decision.json
and decision.md from the seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from demix import decision
from demix.checkpoint import manifest_total
from demix.config import RunConfig
from demix.data.shards import CuratedData
from demix.evaluate.harness import Evaluator
from demix.mixtures import (
    as_dict,
    baseline_mixtures,
    seeded_runs,
)
from demix.model import resolve_device
from demix.report.decision import format_decision
from demix.search import ScoresTable, search_objective
from demix.search.fits import fit_selection
from demix.search.loop import canonical_rows, weights_matrix
from demix.search.results import mixture_id
from demix.stages.run import Clock, train_finals
from demix.stages.search import search_stage
from demix.stages.train import train_components
from demix.stages.validate import evaluate_once
from demix.stages.values import Run, run_search_space
from demix.storage import atomic_write_json, atomic_write_text


def _with(config: RunConfig, section: str, **update) -> RunConfig:
    return config.model_copy(update={section: getattr(config, section).model_copy(update=update)})


def _component_budget(config: RunConfig, tokens: int) -> RunConfig:
    return _with(
        config, "train", component=config.train.component.model_copy(update={"tokens": tokens})
    )


def regmix_config(config: RunConfig, plan: dict[str, Any]) -> RunConfig:
    """The trained-proxy search of a budget: `plan["proxies"]` proxies of the proxy budget in
    one round of RegMix's sampler, the decision's pool and top."""
    search = config.search.model_copy(
        update={
            "method": "trained",
            "n": plan["proxies"],
            "rounds": 1,
            "candidates": config.decision.candidates,
            "top_k": config.decision.top_k,
            "sampler": config.search.sampler.model_copy(update={"power": decision.REGMIX_POWER}),
        }
    )
    return _component_budget(config, plan["proxy_tokens"]).model_copy(update={"search": search})


def fitted_choices(config: RunConfig, data: CuratedData, folder: Path) -> dict[str, dict]:
    """The weights-only fits' choices from a trained-proxy search's scores (in `folder`)."""
    rows = canonical_rows(ScoresTable(folder / "scores.jsonl").rows())
    objective = search_objective(config.search, config.evaluate)
    X, y = weights_matrix(rows, data.names), objective.targets([r["tasks"] for r in rows])
    space = run_search_space(config, data)
    out = {}
    for method, kind in zip(decision.FIT_METHODS, ("linear", "quadratic"), strict=True):
        mixture, info = fit_selection(
            space.prior,
            X,
            y,
            config.search,
            config.seed,
            kind,
            objective.combine,
            space.floor,
            space.cap,
        )
        out[method] = {"mixture": as_dict(data.names, mixture), **info}
    return out


def budget_searches(
    run: Run,
    plan: dict[str, Any],
    out: Path,
    evaluator: Evaluator,
    timed: Clock,
) -> dict[str, dict]:
    """Every method's choice at one budget: {method: {"mixture", "tokens", "proxies"}}."""
    config, data, base = run.config, run.data, run.base
    at_budget = _component_budget(config, plan["component_tokens"])
    where = f"{plan['label']}/{config.seed}"
    with timed(f"components/{where}"):
        trained_run = Run(
            at_budget, data, base, train_components(at_budget, data, base, out / "models")
        )
    tokens = int(manifest_total(trained_run.components.values(), "tokens"))
    choices = {}
    for total, n in plan["merged"].items():
        searched = _with(at_budget, "search", method="merge", n=n)
        with timed(f"search_merge_{total}/{where}"):
            found = search_stage(trained_run.using(searched), out / f"merged-{total}", evaluator)
        choices[f"merged {total}"] = {
            "mixture": found["mixture"],
            "tokens": tokens,
            "proxies": found["proxies_evaluated"],
        }
    regmix = regmix_config(config, plan)
    with timed(f"search_trained/{where}"):
        found = search_stage(Run(regmix, data, base), out / "trained", evaluator)
    trained = {"tokens": found["proxy_training_tokens"], "proxies": found["proxies_evaluated"]}
    choices["regmix"] = {"mixture": found["mixture"], **trained}
    for method, chosen in fitted_choices(regmix, data, out / "trained").items():
        choices[method] = {"mixture": chosen["mixture"], **trained}
    return choices


def judge_seed(
    run: Run,
    choices: dict[str, dict[str, dict]],
    out: Path,
    evaluator: Evaluator,
) -> tuple[dict[str, Any], int]:
    """Final models of every chosen mixture (one set per distinct mixture) and of the token
    prior, evaluated once each; the seed's rows (demix.decision.seed_rows) and final tokens."""
    config, data = run.config, run.data
    grid = config.search.sampler.grid
    labels = {
        budget: {
            m: mixture_id([c["mixture"][n] for n in data.names], grid) for m, c in methods.items()
        }
        for budget, methods in choices.items()
    }
    mixtures = {decision.BASELINE: baseline_mixtures(data)[decision.BASELINE]}
    for budget, methods in choices.items():
        for method, chosen in methods.items():
            mixtures[labels[budget][method]] = chosen["mixture"]
    runs = seeded_runs(mixtures, config.final.seeds)
    finals = train_finals(run, {r: mixtures[r.label] for r in runs}, out / "finals")
    device = resolve_device(config.train.device)
    results: dict[str, list[dict]] = {}
    for seeded in runs:  # seed order within each label (seeded_runs)
        evaluated = evaluate_once(run, finals[seeded.name], evaluator, device)
        results.setdefault(seeded.label, []).append(evaluated)
    rows = decision.seed_rows(config.evaluate, config.seed, labels, results, choices)
    return rows, int(manifest_total(finals.values(), "tokens"))


def decision_seed(run: Run, out: Path, evaluator: Evaluator, timed: Clock) -> dict[str, Any]:
    """One protocol seed into `out` (`run`: the seed's config, the data and the base): every
    budget's searches, then the finals and verdicts."""
    config = run.config
    plan = decision.budget_plan(config.decision, config.train, config.search, len(run.data.names))
    choices = {
        p["label"]: budget_searches(run, p, out / f"budget-{p['label']}", evaluator, timed)
        for p in plan
    }
    with timed(f"final/{config.seed}"):
        rows, final_tokens = judge_seed(run, choices, out, evaluator)
    return {"seed": config.seed, "plan": plan, **rows, "final_tokens": final_tokens}


def check_plan(config: RunConfig) -> None:
    """Refuse a bad plan before any training: DemixError where a budget buys fewer than 4
    trained proxies."""
    decision.budget_plan(config.decision, config.train, config.search, len(config.data.datasets))


def write_decision(
    data: CuratedData,
    per_seed: list[dict[str, Any]],
    out: Path,
    timings: dict,
    planned: int | None = None,
) -> dict[str, Any]:
    """decision.json's data (the table over the seeds finished so far, each seed's rows,
    tokens and timings; `planned`: the protocol seeds the run will have, default these),
    written with decision.md (the table) into `out`."""
    result = {
        "datasets": data.names,
        "seeds_planned": len(per_seed) if planned is None else planned,
        "table": decision.table_rows(per_seed),
        "per_seed": per_seed,
        "timings_s": timings,
    }
    atomic_write_json(out / "decision.json", result)
    atomic_write_text(out / "decision.md", format_decision(result))
    return result
