"""What `demix reproduce` reports: reproduce.json's statistics over the seeds (`headline`,
`stability`) and reproduce.md (fidelity, the budget ladder, ablations, the sweep, the finals
and the seeds) rendered from its result; the protocol that measures them is
demix.recipes.reproduce."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from demix.fidelity import AGGREGATE
from demix.report.anchors import anchor_lines
from demix.report.fidelity import RELIABILITY_HEADER, reliability_rows, task_rows
from demix.report.html import markdown_table
from demix.report.summary import format_comparison, format_interval


def l1(a: dict[str, float], b: dict[str, float]) -> float:
    """L1 distance between two mixtures over the same datasets."""
    return float(sum(abs(a[k] - b[k]) for k in a))


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


def _retest(seed: dict[str, Any]) -> dict[str, Any] | None:
    """A seed's references' test-retest entry (aggregate), None without replicates."""
    reliability = seed["fidelity"].get("reliability", {})
    return reliability.get("categories", {}).get(AGGREGATE, {}).get("retest")


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
