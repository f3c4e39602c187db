"""fidelity.html: how merged proxies rank mixtures against models trained on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from demix.report.html import image, page, plt, table
from demix.storage import atomic_write_text


def write_fidelity_report(path: Path, result: dict[str, Any]) -> Path:
    """fidelity.html: a proxy-vs-reference scatter per category and the aggregate, and the table."""
    body = ["<h1>DeMix proxy fidelity</h1>"]
    body += [f"<p><b>warning:</b> {w}</p>" for w in result["warnings"]]
    rows = []
    for category, entry in result["categories"].items():
        weight = entry["trivial_weight"]
        rows.append(
            [
                category,
                entry["proxy"]["rho"],
                entry["trivial_linear"]["rho"],
                weight["rho"] if weight else "-",
                entry["proxy"]["rho_top_quarter"],
                entry["proxy"]["regret"],
                entry["trivial_linear"]["regret"],
                result["crr"].get(category, result["crr"]["mean"]),
            ]
        )
    body.append(
        table(
            [
                "category",
                "rho proxy",
                "rho weights fit",
                "rho own weight",
                "rho top quarter",
                "regret proxy",
                "regret weights fit",
                "CRR",
            ],
            rows,
        )
    )
    if result.get("tasks"):
        body.append(
            table(
                ["task", "rho proxy", "reference spread", "reference stderr", "signal/noise"],
                [
                    [t, e["rho"], e["spread"], e["stderr"], e["snr"]]
                    for t, e in result["tasks"].items()
                ],
            )
        )
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
