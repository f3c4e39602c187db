"""The tables of fidelity against the branch point and the control (demix.improvement)."""

from __future__ import annotations

from typing import Any

from demix.improvement import ANCHORS, OWN_EFFECT_Z
from demix.report.html import markdown_table
from demix.report.summary import format_comparison, format_interval

IMPROVEMENT_NOTE = (
    "Against the branch point and the control (a branch on the token prior with the "
    "references' budget and schedule): the references' mean improvement per task (oriented, "
    "> 0 = better; [95% interval over references and documents]), how many references improve "
    f"by more than {OWN_EFFECT_Z:g} paired standard errors, and the soup bonus (merged proxy − "
    "trained reference of the same mixture, paired):"
)
CRR_NOTE = "Improvement-CRR, (L_anchor − L_proxy) / (L_anchor − L_reference) [95% interval]:"


def anchor_tables(anchors: dict[str, Any]) -> list[tuple[list[str], list[list]]]:
    """(header, rows) of two tables: per task the references' mean improvement on each anchor
    with the count beyond OWN_EFFECT_Z paired standard errors, and the soup bonus; per category
    improvement-CRR against each anchor. Anchors not measured are left out."""
    names = [a for a in ANCHORS if a in anchors["improvements"]]
    rows = []
    for task in anchors["soup_bonus"]:
        cells = []
        for name in names:
            entry = anchors["improvements"][name][task]
            cells += [
                format_comparison(entry["mean"]),
                f"{entry['beyond']}/{len(entry['models'])}",
            ]
        rows.append([task, *cells, format_comparison(anchors["soup_bonus"][task])])
    header = ["task"]
    for name in names:
        label = name.replace("_", " ")
        header += [f"references − {label}", f"> {OWN_EFFECT_Z:g} SE vs {label}"]
    header.append("soup bonus (merged − reference)")
    categories = list(anchors["crr"][names[0]]["crr"]) if names else []
    crr_rows = [
        [
            category,
            *(
                format_interval(
                    anchors["crr"][n]["crr"][category], anchors["crr"][n]["crr_ci"][category]
                )
                for n in names
            ),
        ]
        for category in categories
    ]
    crr_header = ["category", *(f"vs {n.replace('_', ' ')}" for n in names)]
    return [(header, rows), (crr_header, crr_rows)]


OWN_NOTE = (
    "Each candidate's own-domain effect: the reference with the most weight on it (its vertex) "
    "on its held-out loss, against each anchor (paired difference, standard error, z):"
)


def own_domain_table(anchors: dict[str, Any]) -> tuple[list[str], list[list]] | None:
    """(header, rows) of the own-domain effects against each anchor; None when not measured."""
    own = anchors.get("own_domain")
    if not own or not any(own.values()):
        return None
    names = [a for a in ANCHORS if a in own]
    datasets = list(dict.fromkeys(d for n in names for d in own[n]))
    rows = []
    for dataset in datasets:
        first = own[names[0]][dataset]
        cells = [
            f"{e['diff']:+.4f} ± {e['stderr']:.4f} (z {e['z']:.1f})"
            for e in (own[n][dataset] for n in names)
        ]
        rows.append([dataset, first["label"], f"{first['weight']:.3f}", *cells])
    header = ["dataset", "reference", "weight", *(f"vs {n.replace('_', ' ')}" for n in names)]
    return header, rows


def anchor_lines(anchors: dict[str, Any]) -> list[str]:
    """anchor_tables (and own_domain_table) as Markdown, each after its note."""
    improvements, crr = anchor_tables(anchors)
    lines = [
        "",
        IMPROVEMENT_NOTE,
        "",
        *markdown_table(*improvements),
        "",
        CRR_NOTE,
        "",
        *markdown_table(*crr),
    ]
    own = own_domain_table(anchors)
    if own is not None:
        lines += ["", OWN_NOTE, "", *markdown_table(*own)]
    return lines
