"""The tables of fidelity against the branch point and the control (demix.improvement)."""

from __future__ import annotations

from typing import Any

from demix.improvement import ANCHORS, OWN_EFFECT_Z
from demix.report.html import markdown_table
from demix.report.summary import format_comparison, format_interval


def anchor_lines(anchors: dict[str, Any]) -> list[str]:
    """Per task: the references' mean improvement on each anchor [95% interval] with the count
    beyond OWN_EFFECT_Z paired standard errors, and the soup bonus; then improvement-CRR per
    category against each anchor. Anchors not measured are left out."""
    names = [a for a in ANCHORS if a in anchors["improvements"]]
    tasks = list(anchors["soup_bonus"])
    rows = []
    for task in tasks:
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
    crr_rows = []
    categories = list(anchors["crr"][names[0]]["crr"]) if names else []
    for category in categories:
        crr_rows.append(
            [
                category,
                *(
                    format_interval(
                        anchors["crr"][n]["crr"][category], anchors["crr"][n]["crr_ci"][category]
                    )
                    for n in names
                ),
            ]
        )
    return [
        "",
        "Against the branch point and the control (a branch on the token prior with the "
        "references' budget and schedule): the references' mean improvement per task "
        "(oriented, > 0 = better; [95% interval over references and documents]), how many "
        f"references improve by more than {OWN_EFFECT_Z:g} paired standard errors, and the soup "
        "bonus (merged proxy − trained reference of the same mixture, paired):",
        "",
        *markdown_table(header, rows),
        "",
        "Improvement-CRR, (L_anchor − L_proxy) / (L_anchor − L_reference) [95% interval]:",
        "",
        *markdown_table(["category", *(f"vs {n.replace('_', ' ')}" for n in names)], crr_rows),
    ]
