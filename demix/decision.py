"""The decision at equal cost: which search chooses the better mixture for the same training
tokens, judged by final models (`demix reproduce-decision`, demix.recipes.decision).

A budget is a multiple of the merged search's component tokens (N components x the component
budget). At budget b the merged search trains its components b times as long and evaluates as
many merged proxies as it likes (they cost no training); a trained-proxy search buys
floor(b x N x component tokens / proxy tokens) proxies of `decision.proxy_fraction` x the
component budget and regresses on them (the RegMix recipe), and the weights-only fits (linear,
quadratic) choose from the same trained proxies. Each chosen mixture and the token prior get
final models; every method is judged by the paired verdict against the token prior, against
the best final of its protocol seed (regret), and against the other methods of its budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from demix.config import DecisionConfig, EvaluateConfig, SearchConfig, TrainConfig
from demix.errors import DemixError
from demix.verdict import final_verdict

BASELINE = "token_prior"
# RegMix's sampler: Dirichlet(s * p^0.5)
REGMIX_POWER = 0.5
FIT_METHODS = ("linear fit", "quadratic fit")


def merged_search_size(total: int, rounds: int) -> int:
    """The first-round size n whose rounds (n, n/2, n/4, ...) evaluate at least `total`
    proxies (12 for 21 in 3 rounds)."""
    n = 4
    while sum(max(1, n >> r) for r in range(rounds)) < total:
        n += 1
    return n


def proxies_bought(budget_tokens: int, proxy_tokens: int) -> int:
    """How many trained proxies of `proxy_tokens` a budget of `budget_tokens` buys (whole ones).

    Raises DemixError for a proxy budget that is not positive.
    """
    if proxy_tokens <= 0:
        raise DemixError(f"a trained proxy of {proxy_tokens} tokens buys nothing; raise it")
    return int(budget_tokens // proxy_tokens)


def budget_label(budget: float) -> str:
    """`1x`, `2x`, `0.5x`: a budget in a folder name and a table row."""
    return f"{budget:g}x"


def budget_plan(
    decision: DecisionConfig, train: TrainConfig, search: SearchConfig, datasets: int
) -> list[dict[str, Any]]:
    """Per `decision.budgets` entry: its tokens, the merged search's component budget
    (train.component.tokens x the budget) and searches (search.rounds), and the trained proxies
    it buys (their budget and number).

    Raises DemixError where a budget buys fewer than 4 trained proxies (no regression).
    """
    component = train.component.tokens
    proxy_tokens = max(1, round(decision.proxy_fraction * component))
    plan = []
    for budget in decision.budgets:
        component_tokens = max(1, round(budget * component))
        tokens = datasets * component_tokens
        proxies = proxies_bought(tokens, proxy_tokens)
        if proxies < 4:
            raise DemixError(
                f"decision.budgets: {budget_label(budget)} ({tokens:,} tokens) buys {proxies} "
                f"trained proxies of {proxy_tokens:,} tokens, fewer than the 4 a regression "
                "needs; raise the budget or lower decision.proxy_fraction"
            )
        plan.append(
            {
                "budget": budget,
                "label": budget_label(budget),
                "tokens": tokens,
                "component_tokens": component_tokens,
                "merged": {
                    total: merged_search_size(total, search.rounds)
                    for total in decision.merged_proxies
                },
                "proxy_tokens": proxy_tokens,
                "proxies": proxies,
            }
        )
    return plan


def method_names(decision: DecisionConfig) -> list[str]:
    """The methods of a budget, in table order."""
    merged = [f"merged {n}" for n in decision.merged_proxies]
    return [*merged, "regmix", *FIT_METHODS]


def _objective(verdict: Mapping[str, dict], other: str) -> dict[str, Any]:
    return verdict[other]["objective"]


def seed_rows(
    evaluate: EvaluateConfig,
    seed: int,
    choices: Mapping[str, Mapping[str, str]],
    finals: Mapping[str, Sequence[dict]],
    details: Mapping[str, Mapping[str, dict]] | None = None,
) -> dict[str, Any]:
    """One protocol seed's rows: per budget and method, the paired objective difference from the
    token prior's finals, its regret (the lead of the final most ahead of it), and the differences
    from the other methods of its budget (over `evaluate.categories` and their weights; `seed`:
    the run's seed, which seeds the verdicts' bootstrap).

    choices: {budget label: {method: final label}} (methods that chose the same mixture share a
    final label); finals: {final label: [results per training seed]} holding BASELINE too;
    details: {budget label: {method: {...}}} copied into the rows (the search's tokens,
    proxies and chosen mixture).
    Regret: how far the final that beats this one most (its "rival", among every final of the
    seed, the token prior's included) is ahead of it, with the interval of that pairing (Holm
    over the finals it is judged against); None where no final is ahead. Standardised
    differences are paired z-scores and need not be transitive (A ahead of the prior by more
    than B does not put A ahead of B), so regret takes every pairing rather than a difference
    from one "best by its distance from the prior". The best final: the one no other is ahead
    of, else the one whose rival is ahead of it by least.
    Raises ValueError when a final lacks per-document scores or the seeds differ.
    """
    categories, weights = evaluate.categories, evaluate.category_weights

    def judged(chosen: str, others: Sequence[str]) -> dict[str, dict]:
        labels = [label for label in dict.fromkeys(others) if label != chosen]
        if not labels:
            return {}
        results = {label: finals[label] for label in (chosen, *labels)}
        return final_verdict(results, categories, weights, chosen=chosen, seed=seed)

    labels = sorted({label for methods in choices.values() for label in methods.values()})
    versus_prior = {label: _objective(judged(label, [BASELINE]), BASELINE) for label in labels}
    everyone = [BASELINE, *labels]
    regret = {label: _regret(judged(label, everyone)) for label in everyone}
    # a final no other beats, else the one its strongest rival beats least
    best = min(everyone, key=lambda label: (regret[label] or _zero())["diff"])
    rows = []
    for budget, methods in choices.items():
        for method, label in methods.items():
            others = {m: lab for m, lab in methods.items() if m != method}
            pairwise = judged(label, list(others.values()))
            rows.append(
                {
                    "budget": budget,
                    "method": method,
                    "final": label,
                    "vs_token_prior": versus_prior[label],
                    "regret": regret[label],
                    "vs_methods": {
                        m: _objective(pairwise, lab) if lab != label else None
                        for m, lab in others.items()
                    },
                    **((details or {}).get(budget, {}).get(method, {})),
                }
            )
    return {"best": best, "rows": rows}


def _regret(verdict: Mapping[str, dict]) -> dict[str, Any] | None:
    """The regret of a final from its verdict against every other final (final_verdict): the
    other most ahead of it, its lead (the objective difference turned round) and the verdict of
    that lead; None where no other is ahead (or there is no other)."""
    if not verdict:
        return None
    rival = min(verdict, key=lambda other: verdict[other]["objective"]["diff"])
    behind = verdict[rival]["objective"]
    if behind["diff"] >= 0:
        return None
    turned = {"better": "worse", "worse": "better"}
    return {
        **behind,
        "diff": -behind["diff"],
        "ci_low": -behind["ci_high"],
        "ci_high": -behind["ci_low"],
        "verdict": turned.get(behind["verdict"], behind["verdict"]),
        "rival": rival,
    }


def mean_interval(values: Sequence[float], intervals: Sequence[Sequence[float]]) -> dict:
    """{"mean", "ci_low", "ci_high"} of a statistic measured once per protocol seed: one seed,
    its own interval; several, mean +- 1.96 se with se^2 = max(between-seed variance, mean
    within-seed variance read off the intervals) / seeds (as `demix reproduce`'s headline)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 1:
        return {"mean": float(values[0]), "ci_low": intervals[0][0], "ci_high": intervals[0][1]}
    within = np.mean([((hi - lo) / (2 * 1.959964)) ** 2 for lo, hi in intervals])
    se = math.sqrt(max(float(np.var(values, ddof=1)), within) / values.size)
    mean = float(values.mean())
    return {"mean": mean, "ci_low": mean - 1.959964 * se, "ci_high": mean + 1.959964 * se}


def _zero() -> dict[str, Any]:
    return {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "verdict": "best"}


def table_rows(per_seed: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The decision table: per budget and method (in the first seed's order), over protocol
    seeds, the difference from the token prior (mean [interval]) with each seed's verdict, the
    mean regret with each seed's verdict, and the mean L1 between the seeds' chosen mixtures."""
    order = [(r["budget"], r["method"]) for r in per_seed[0]["rows"]]
    by_key = [{(r["budget"], r["method"]): r for r in s["rows"]} for s in per_seed]
    table = []
    for key in order:
        rows = [seed[key] for seed in by_key if key in seed]
        prior = [r["vs_token_prior"] for r in rows]
        regret = [r["regret"] or _zero() for r in rows]
        mixtures = [r["mixture"] for r in rows if "mixture" in r]
        pairs = [
            sum(abs(a[k] - b[k]) for k in a)
            for i, a in enumerate(mixtures)
            for b in mixtures[i + 1 :]
        ]
        table.append(
            {
                "budget": key[0],
                "method": key[1],
                "seeds": len(rows),
                "vs_token_prior": mean_interval(
                    [p["diff"] for p in prior], [[p["ci_low"], p["ci_high"]] for p in prior]
                ),
                "verdicts": [p["verdict"] for p in prior],
                "regret": mean_interval(
                    [r["diff"] for r in regret], [[r["ci_low"], r["ci_high"]] for r in regret]
                ),
                "regret_verdicts": [r["verdict"] for r in regret],
                "l1_between_seeds": float(np.mean(pairs)) if pairs else None,
                "tokens": rows[0].get("tokens"),
                "proxies": rows[0].get("proxies"),
            }
        )
    return table


def merged_versus_trained(per_seed: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per budget and merged search: its paired difference from each search on trained proxies
    of the same budget (regmix and the fits), each seed's diff and verdict (the question at
    equal tokens: does merging choose at least as well?)."""
    out = []
    for row in per_seed[0]["rows"]:
        if not row["method"].startswith("merged "):
            continue
        others = [m for m in row["vs_methods"] if not m.startswith("merged ")]
        seeds = [
            next(
                r for r in s["rows"] if (r["budget"], r["method"]) == (row["budget"], row["method"])
            )
            for s in per_seed
        ]
        out.append(
            {
                "budget": row["budget"],
                "method": row["method"],
                "versus": {
                    m: [s["vs_methods"][m] or _zero() | {"verdict": "same mixture"} for s in seeds]
                    for m in others
                },
            }
        )
    return out
