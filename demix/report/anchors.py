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


def anchor_lines(anchors: dict[str, Any]) -> list[str]:
    """anchor_tables as Markdown, each after its note."""
    improvements, crr = anchor_tables(anchors)
    return [
        "",
        IMPROVEMENT_NOTE,
        "",
        *markdown_table(*improvements),
        "",
        CRR_NOTE,
        "",
        *markdown_table(*crr),
    ]
