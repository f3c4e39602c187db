"""The HTML report of a run (report.html) and of a search in progress (the KFP UI's)."""

from __future__ import annotations

from html import escape
from pathlib import Path

import numpy as np

from demix.config import EvaluateConfig, MergeConfig, SearchConfig
from demix.mixtures import FINAL_LABELS as LABELS
from demix.report.curves import curves_section
from demix.report.html import grouped_bars, page, plt, png, table
from demix.search.objective import Objective
from demix.search.predictor import cross_val_predictions
from demix.search.results import ScoresTable
from demix.storage import atomic_write_text


def plot_search_progress(history: list[dict]) -> str:
    """Ranking score of every proxy in evaluation order, coloured by round, with the best so far."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    scores = np.array([row["ranking_score"] for row in history])
    rounds = np.array([row["round"] for row in history])
    for r in sorted(set(rounds.tolist())):
        idx = np.flatnonzero(rounds == r)
        ax.scatter(idx, scores[idx], label=f"round {r}", s=28)
    ax.plot(np.maximum.accumulate(scores), color="black", lw=1, label="best so far")
    ax.set_xlabel("proxy (evaluation order)")
    ax.set_ylabel("ranking score")
    ax.set_title("Search progress")
    ax.legend(fontsize=8)
    return png(fig)


def plot_predicted_vs_observed(observed: np.ndarray, predicted: np.ndarray, rho: float) -> str:
    """Cross-validated predictions of the predictor against observed ranking scores."""
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(observed, predicted, s=28)
    lo, hi = (
        float(min(observed.min(), predicted.min())),
        float(max(observed.max(), predicted.max())),
    )
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
    ax.set_xlabel("observed ranking score")
    ax.set_ylabel("predicted (held-out fold)")
    ax.set_title(f"Predictor, cross-validated (Spearman {rho:.2f})")
    return png(fig)


def plot_verdict(verdict: dict, keys: list[str]) -> str:
    """Chosen − baseline on the objective and each category, with the 95% (Holm) intervals."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    width = 0.8 / max(1, len(verdict))
    x = np.arange(len(keys))
    for i, (baseline, entries) in enumerate(verdict.items()):
        diffs = np.array([entries[k]["diff"] for k in keys])
        low = diffs - np.array([entries[k]["ci_low"] for k in keys])
        high = np.array([entries[k]["ci_high"] for k in keys]) - diffs
        ax.errorbar(
            x + i * width - 0.4 + width / 2,
            diffs,
            yerr=[low, high],
            fmt="o",
            capsize=3,
            label=f"vs {baseline}",
        )
    ax.axhline(0, color="grey", lw=1)
    ax.set_xticks(x, keys)
    ax.set_ylabel("chosen − baseline (standardised)")
    ax.set_title("Verdict: paired differences, 95% intervals")
    ax.legend(fontsize=8)
    return png(fig)


def _or_dash(value: float | None) -> float | str:
    """A number for a table cell; "-" when it was not recorded."""
    return "-" if value is None else value


def _epoch_cap(summary: dict, name: str) -> str:
    """`4 (0.1250)`: a dataset's search.max_epochs and the weight it allows; "-" where unset."""
    epochs = summary.get("max_epochs", {}).get(name)
    if epochs is None:
        return "-"
    return f"{epochs:g} ({summary['epoch_weight_caps'][name]:.4f})"


def _base_note(base: dict | None) -> str:
    """Where the run's base model came from (model.base), or that it was trained."""
    if not base:
        return "<p>Base model: trained by this run (train.base).</p>"
    revision = f" at revision {escape(base['revision'])}" if base.get("revision") else ""
    return (
        f"<p>Base model: {escape(base['source'])}{revision}, content fingerprint "
        f"<code>{escape(base['fingerprint'])}</code>.</p>"
    )


def write_report(
    out: Path,
    summary: dict,
    found: dict,
    evaluate: EvaluateConfig,
    search: SearchConfig,
    merge: MergeConfig,
    seed: int,
) -> Path:
    """Write report.html (plots embedded) into the run folder; return its path."""
    names = summary["datasets"]
    history = found["history"]
    mixtures = {"chosen": summary["mixture"], **summary["baselines"]}
    final = summary["final"]
    categories = list(evaluate.categories)
    images = [plot_search_progress(history)]

    X = np.array([[row["weights"][n] for n in names] for row in history])
    y = np.array([row["ranking_score"] for row in history])
    cv_note = ""
    if len(y) >= 4:
        predicted, rho = cross_val_predictions(X, y, search.predictor, seed)
        images.append(plot_predicted_vs_observed(y, predicted, rho))
    else:
        cv_note = "<p>Too few proxies for a cross-validated predictor plot.</p>"
    images.append(
        grouped_bars(
            names,
            {k: [m[n] for n in names] for k, m in mixtures.items()},
            "weight",
            "Chosen mixture vs baselines",
        )
    )
    images.append(plot_verdict(summary["verdict"], ["objective", *categories]))

    tasks = evaluate.tasks
    task_rows = []
    for task in tasks:
        first = final[LABELS[0]]["tasks"][task]
        task_rows.append(
            [task, first["metric"] + (" ↑" if first["higher_is_better"] else " ↓")]
            + [
                f"{final[k]['tasks'][task]['value']:.4f} ± {final[k]['tasks'][task]['stderr']:.4f}"
                for k in LABELS
            ]
        )
    verdict_rows = [
        [
            baseline,
            key,
            entry["diff"],
            f"[{entry['ci_low']:+.4f}, {entry['ci_high']:+.4f}]",
            entry["verdict"],
        ]
        for baseline, entries in summary["verdict"].items()
        for key, entry in [
            ("objective", entries["objective"]),
            *[(c, entries[c]) for c in categories],
        ]
    ]
    seeds = final[LABELS[0]]["seeds"]
    seeds_note = f" and {seeds} training seeds" if seeds > 1 else ""
    mix_rows = [
        [
            n,
            summary["mixture"][n],
            summary["component_weights"][n],
            summary["token_prior"][n],
            _or_dash(summary.get("epochs", {}).get(n)),  # a summary written before: "-"
            _epoch_cap(summary, n),
            (summary["relative_delta_norms"] or {}).get(n, "-"),
        ]
        for n in names
    ]
    proxies = "merged" if summary.get("search_method", "merge") == "merge" else "trained"
    body = [
        "<h1>DeMix run report</h1>",
        f"<p>{summary['proxies_evaluated']} {proxies} proxies evaluated in {summary['search_rounds']} rounds; "
        f"predictor cross-validated Spearman {summary['predictor_spearman']}.</p>",
        _base_note(summary.get("base_model")),
        "<h2>Chosen mixture</h2>",
        table(
            [
                "dataset",
                "data weight",
                f"component weight ({merge.weights} mapping)",
                "token prior",
                "epochs at train.final.tokens",
                "search.max_epochs (weight cap)",
                "||θᵢ − base|| / ||base||",
            ],
            mix_rows,
        ),
        "<p>Epochs: how many times the final training on the chosen mixture "
        f"({summary['final_tokens']:,} tokens) goes through each dataset's curated train tokens "
        "(weight x final tokens / train tokens). search.max_epochs, where set, capped every "
        "searched mixture's weight at max_epochs x train tokens / final tokens.</p>",
        "<p>Component i was trained on a mix of general data and dataset i (columns of M: each "
        "component's training mix); a proxy for data mixture d merges with component weights "
        f"{'c = d' if merge.weights == 'component' else 'c = M⁻¹d'} "
        f"(merge.weights: {merge.weights}). A component weight below 0 means the proxy "
        "extrapolates beyond the trained components.</p>",
        table(
            [
                "smallest component weight of the chosen mixture",
                "share of the final pool with one < 0",
            ],
            [
                [
                    _or_dash(summary.get("min_component_weight")),
                    _or_dash(summary.get("pool_negative_share")),
                ]
            ],
        ),
        table(
            ["M", *names], [[n, *row] for n, row in zip(names, found["mix_matrix"], strict=True)]
        ),
        "<h2>Verdict: the chosen mixture against each baseline</h2>",
        f"<p>Paired over the same documents{seeds_note}: the difference chosen − baseline "
        "(oriented: positive means the chosen mixture is better; categories and the objective "
        "in units of each task's paired standard error), its 95% bootstrap interval widened by "
        "Holm over the baselines, and the verdict: <b>better</b> or <b>worse</b> when the "
        "interval excludes 0, <b>inconclusive</b> when it covers 0.</p>",
        table(
            ["baseline", "score", "difference", "95% interval", "verdict"],
            verdict_rows,
        ),
        "<h2>Final models</h2>",
        table(["task", "metric", *LABELS], task_rows),
        "<h2>Plots</h2>",
        cv_note,
        *[f'<img src="data:image/png;base64,{img}">' for img in images],
        *curves_section(out),
        "<h2>Cost</h2>",
        table(["stage", "seconds"], [[k, v] for k, v in summary["timings_s"].items()]),
        table(
            ["training tokens", "count"], [[k, v] for k, v in summary["training_tokens"].items()]
        ),
    ]
    path = out / "report.html"
    atomic_write_text(path, page("DeMix report", body))
    return path


def write_search_report(
    history: Path, search: SearchConfig, evaluate: EvaluateConfig, out: Path
) -> Path:
    """A report of the search so far (for the KFP UI): progress plot and the scored proxies,
    ranked by the search's objective (`search.objective` over `evaluate`'s categories)."""
    rows = ScoresTable(history).rows()
    body = ["<h1>DeMix search so far</h1>", f"<p>{len(rows)} proxies scored.</p>"]
    if rows:
        objective = Objective.from_config(
            search.objective, evaluate.categories, evaluate.category_weights
        )
        scores = objective.observed([row["tasks"] for row in rows])
        history_rows = [{**row, "ranking_score": s} for row, s in zip(rows, scores, strict=True)]
        names = list(rows[0]["weights"])
        body.append(f'<img src="data:image/png;base64,{plot_search_progress(history_rows)}">')
        ranked = sorted(history_rows, key=lambda row: -row["ranking_score"])
        body.append(
            table(
                ["proxy", "round", *names, "ranking score"],
                [
                    [
                        row["id"],
                        row["round"],
                        *[row["weights"][n] for n in names],
                        row["ranking_score"],
                    ]
                    for row in ranked
                ],
            )
        )
    atomic_write_text(out, page("DeMix search", body))
    return out
