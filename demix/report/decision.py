"""The table of `demix reproduce-decision` (demix.decision), as Markdown."""

from __future__ import annotations

from typing import Any

from demix.decision import merged_versus_trained
from demix.report.html import markdown_table

HEADER = [
    "budget",
    "method",
    "training tokens",
    "proxies",
    "chosen − token prior [95%]",
    "verdict per seed",
    "regret [95%]",
    "regret per seed",
    "L1 between seeds",
]

REGRET_WORDS = {"better": "> 0", "inconclusive": "~ 0", "worse": "< 0", "best": "best"}


def _mean(entry: dict[str, float]) -> str:
    return f"{entry['mean']:+.3f} [{entry['ci_low']:+.3f}, {entry['ci_high']:+.3f}]"


def decision_rows(table: list[dict[str, Any]]) -> list[list[str]]:
    """The table's cells: one row per budget and method."""
    return [
        [
            row["budget"],
            row["method"],
            "-" if row["tokens"] is None else f"{row['tokens']:,}",
            "-" if row["proxies"] is None else str(row["proxies"]),
            _mean(row["vs_token_prior"]),
            ", ".join(row["verdicts"]),
            _mean(row["regret"]),
            ", ".join(REGRET_WORDS.get(v, v) for v in row["regret_verdicts"]),
            "-" if row["l1_between_seeds"] is None else f"{row['l1_between_seeds']:.3f}",
        ]
        for row in table
    ]


def _pairwise_lines(seed: dict[str, Any]) -> list[str]:
    """One seed's method-vs-method differences per budget (row minus column, Holm over the
    budget's other methods)."""
    lines = []
    for budget in dict.fromkeys(r["budget"] for r in seed["rows"]):
        rows = [r for r in seed["rows"] if r["budget"] == budget]
        methods = [r["method"] for r in rows]
        cells = [
            [
                r["method"],
                *(
                    "·"
                    if m == r["method"]
                    else "same mixture"
                    if r["vs_methods"][m] is None
                    else f"{r['vs_methods'][m]['diff']:+.2f} {r['vs_methods'][m]['verdict']}"
                    for m in methods
                ),
            ]
            for r in rows
        ]
        lines += ["", f"Seed {seed['seed']}, budget {budget}:", ""]
        lines += markdown_table(["row − column", *methods], cells)
    return lines


def format_decision(result: dict[str, Any]) -> str:
    """decision.md: the table over protocol seeds, then each seed's chosen mixtures and its
    method-vs-method verdicts."""
    seeds = len(result["per_seed"])
    planned = result.get("seeds_planned", seeds)
    lines = [
        f"The decision at equal training tokens ({seeds} protocol seed(s); objective difference "
        "of final models, standardised, paired over documents and training seeds; intervals "
        "over seeds as in `demix reproduce`'s headline). Regret: how far the final most ahead "
        "of this one (any final of the seed, the token prior's included) is ahead of it, Holm "
        "over the finals it is judged against (> 0: told apart; ~ 0: not; best: none is "
        "ahead). Standardised differences are paired z-scores and need not be transitive.",
        "",
        *(
            [
                f"**Provisional: {seeds} of {planned} protocol seeds finished**; this table is "
                "written again as each seed finishes.",
                "",
            ]
            if seeds < planned
            else []
        ),
        *markdown_table(HEADER, decision_rows(result["table"])),
    ]
    versus = merged_versus_trained(result["per_seed"])
    if versus:
        trained = list(versus[0]["versus"])
        lines += [
            "",
            "Merged against trained proxies at the same budget (merged − other, standardised; "
            "each seed's difference and verdict, Holm over the budget's other methods):",
            "",
            *markdown_table(
                ["budget", "merged search", *(f"− {m}" for m in trained)],
                [
                    [
                        v["budget"],
                        v["method"],
                        *(
                            "; ".join(f"{e['diff']:+.2f} {e['verdict']}" for e in v["versus"][m])
                            for m in trained
                        ),
                    ]
                    for v in versus
                ],
            ),
        ]
    names = result["datasets"]
    for seed in result["per_seed"]:
        mixtures = [
            [r["budget"], r["method"], *(f"{r['mixture'][n]:.3f}" for n in names)]
            for r in seed["rows"]
        ]
        best = [f"{r['budget']} {r['method']}" for r in seed["rows"] if r["final"] == seed["best"]]
        lines += [
            "",
            f"Seed {seed['seed']}: chosen mixtures (best final: {', '.join(best) or seed['best']}):",
            "",
            *markdown_table(["budget", "method", *(f"w {n}" for n in names)], mixtures),
        ]
        lines += _pairwise_lines(seed)
    return "\n".join(lines) + "\n"
