"""fidelity.html: how merged proxies rank mixtures against models trained on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from demix.report.anchors import (
    CRR_NOTE,
    IMPROVEMENT_NOTE,
    OWN_NOTE,
    anchor_tables,
    own_domain_table,
)
from demix.report.html import image, page, plt, table
from demix.report.summary import format_comparison, format_interval
from demix.storage import atomic_write_text


def _difference(entry: dict | None) -> str:
    """`+0.123 [+0.010, +0.240] better`, or - when there is no such predictor."""
    return "-" if entry is None else format_comparison(entry)


def _rank_table(result: dict[str, Any]) -> str:
    """Per category, the aggregate and the macro rho: rho with intervals, the paired differences
    proxy − weights-only predictor, regret and CRR."""
    tokens = result.get("weights_only_training_tokens")
    label = "tokens unknown" if tokens is None else f"{tokens:,} tokens"
    rows = []
    for score, entry in {**result["categories"], "macro": result["macro"]}.items():
        proxy, fit, quad = entry["proxy"], entry["trivial_linear"], entry["trivial_quadratic"]
        own = entry.get("trivial_weight")
        minus = entry["proxy_minus"]
        crr_key = "mean" if score == "macro" else score
        rows.append(
            [
                score,
                format_interval(proxy["rho"], proxy["rho_ci"]),
                format_interval(fit["rho"], fit["rho_ci"]),
                format_interval(quad["rho"], quad["rho_ci"]),
                format_interval(own["rho"], own["rho_ci"]) if own else "-",
                format_interval(proxy["rho_top_quarter"], proxy["rho_top_quarter_ci"])
                if "rho_top_quarter" in proxy
                else "-",
                proxy.get("regret", "-"),
                fit.get("regret", "-"),
                _difference(minus.get("trivial_linear")),
                _difference(minus.get("trivial_quadratic")),
                _difference(minus.get("trivial_weight")),
                entry["verdict"],
                format_interval(result["crr"][crr_key], result["crr_ci"][crr_key])
                if crr_key in result["crr"]
                else "-",
            ]
        )
    header = [
        "score",
        "rho proxy [95%]",
        f"rho linear fit ({label})",
        f"rho quadratic fit ({label})",
        "rho own weight",
        "rho top quarter proxy",
        "regret proxy",
        "regret linear fit",
        "proxy − linear fit",
        "proxy − quadratic fit",
        "proxy − own weight",
        "vs weights only",
        "CRR [95%]",
    ]
    return table(header, rows)


RELIABILITY_HEADER = [
    "score",
    "test-retest rho (references) [95%]",
    "ceiling sqrt(retest)",
    "rho proxy, same mixtures [95%]",
    "proxy / retest [95%]",
]


def reliability_rows(reliability: dict[str, Any]) -> list[list[str]]:
    """One row per category, the aggregate and macro of demix.fidelity.reliability."""
    rows = []
    for score, entry in {**reliability["categories"], "macro": reliability["macro"]}.items():
        ratio = entry["proxy_over_retest"]
        rows.append(
            [
                score,
                format_interval(entry["retest"]["rho"], entry["retest"]["rho_ci"]),
                f"{entry['ceiling']:.3f}",
                format_interval(entry["proxy"]["rho"], entry["proxy"]["rho_ci"]),
                format_interval(ratio["value"], ratio["ci"]),
            ]
        )
    return rows


TASK_HEADER = [
    "task",
    "rho proxy",
    "reference spread",
    "paired stderr",
    "signal/noise",
    "unpaired stderr",
    "signal/noise (unpaired)",
]
SEED_HEADER = ["retest noise", "seed sd", "signal/noise with seeds"]


def task_rows(tasks: dict[str, dict[str, float]]) -> tuple[list[str], list[list]]:
    """The per-task signal/noise table; with replicates also the seed's noise columns."""
    seeds = all("retest_noise" in e for e in tasks.values())
    keys = ["rho", "spread", "paired_stderr", "snr", "stderr_unpaired", "snr_unpaired"]
    keys += ["retest_noise", "seed_sd", "snr_seeds"] if seeds else []
    rows = [[t, *(e[k] for k in keys)] for t, e in tasks.items()]
    return TASK_HEADER + (SEED_HEADER if seeds else []), rows


def write_fidelity_report(path: Path, result: dict[str, Any]) -> Path:
    """fidelity.html: the tables and a proxy-vs-reference scatter per category and the aggregate."""
    body = ["<h1>DeMix proxy fidelity</h1>"]
    body += [f"<p><b>warning:</b> {w}</p>" for w in result["warnings"]]
    resamples = result.get("bootstrap", {}).get("resamples", "?")
    body.append(
        f"<p>{result['n']} mixtures; [95% bootstrap intervals over mixtures, {resamples} "
        "resamples]; differences are paired (the same resamples for both rhos); macro = mean of "
        "the per-category rhos. CRR per task: sum of proxy / sum of reference values where "
        "higher is better, (L_base − L_proxy) / (L_base − L_reference) for losses.</p>"
    )
    if result.get("crr_note"):
        body.append(f"<p>{result['crr_note']}</p>")
    body.append(_rank_table(result))
    if result.get("reliability"):
        k = result["reliability"]["k"]
        body.append(
            f"<p>Reliability: {k} references trained again with the next seed; the proxies' "
            "rho on the same mixtures against what a second training run reaches.</p>"
        )
        body.append(table(RELIABILITY_HEADER, reliability_rows(result["reliability"])))
    if result.get("tasks"):
        body.append(table(*task_rows(result["tasks"])))
    if result.get("diagnostics"):
        body.append("<p>Diagnostics (tasks in no objective):</p>")
        body.append(table(*task_rows(result["diagnostics"])))
    if result.get("anchors"):
        improvements, crr = anchor_tables(result["anchors"])
        body += [f"<p>{IMPROVEMENT_NOTE}</p>", table(*improvements)]
        body += [f"<p>{CRR_NOTE}</p>", table(*crr)]
        own = own_domain_table(result["anchors"])
        if own is not None:
            body += [f"<p>{OWN_NOTE}</p>", table(*own)]
    for category in result["categories"]:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(result["reference_scores"][category], result["proxy_scores"][category], s=28)
        rho = result["categories"][category]["proxy"]["rho"]
        ax.set_xlabel("trained reference score")
        ax.set_ylabel("merged proxy score")
        ax.set_title(f"{category} (Spearman {rho:.2f})")
        body.append(image(fig))
    atomic_write_text(path, page("DeMix fidelity", body))
    return path
