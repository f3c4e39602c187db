"""The scaling table: fidelity and the merged search against the number of candidate datasets,
one row per finished `demix reproduce` folder (its command: `demix scaling`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from demix.errors import DemixError
from demix.fidelity import AGGREGATE
from demix.report.html import markdown_table
from demix.report.summary import format_comparison, format_interval

SCALING_KIND = "demix.scaling"  # the kind of the file `demix scaling --out` writes

HEADER = [
    "N",
    "run",
    "references",
    "macro rho [95%]",
    "aggregate rho [95%]",
    "regret (aggregate)",
    "proxy − linear fit (macro)",
    "proxy − linear fit (aggregate)",
    "chosen − token prior",
    "chosen − uniform",
    "chosen, by file",
    "L1 by file vs first row",
    "component tokens",
    "components + search s",
]


def _load(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    if not path.is_file():
        raise DemixError(f"{path}: not found; run demix reproduce into {folder} first")
    return json.loads(path.read_text())


def chosen_by_file(folder: Path, result: dict[str, Any]) -> dict[str, float]:
    """The chosen (merged) mixture summed over the candidates that read the same files (from the
    run's config.json): with the text split by `where`, what each source file received, so runs
    of different N can be compared on the same coordinates."""
    paths = {d["name"]: d["paths"] for d in _load(folder, "config.json")["data"]["datasets"]}
    by_file: dict[str, float] = {}
    for name, weight in result["mixtures"]["chosen_merge"].items():
        key = "+".join(sorted(Path(p).stem for p in paths[name]))
        by_file[key] = by_file.get(key, 0.0) + weight
    return by_file


def scaling_row(folder: Path) -> tuple[list[Any], dict[str, float]]:
    """One row from `folder`/reproduce.json, and its chosen mixture by file. Raises DemixError
    when the run has not finished."""
    result = _load(folder, "reproduce.json")
    fid = result["fidelity"]
    aggregate, macro = fid["categories"][AGGREGATE], fid["macro"]
    verdict = result["verdicts"]["chosen_merge"]
    by_file = chosen_by_file(folder, result)
    timings = result.get("timings_s", {})
    search_s = sum(v for k, v in timings.items() if k.startswith(("components", "search_merge")))
    row = [
        len(result["datasets"]),
        folder.name,
        fid["n"],
        format_interval(macro["proxy"]["rho"], macro["proxy"]["rho_ci"]),
        format_interval(aggregate["proxy"]["rho"], aggregate["proxy"]["rho_ci"]),
        f"{aggregate['proxy']['regret']:.3f}",
        format_comparison(macro["proxy_minus"]["trivial_linear"]),
        format_comparison(aggregate["proxy_minus"]["trivial_linear"]),
        format_comparison(verdict["token_prior"]["objective"]),
        format_comparison(verdict["uniform"]["objective"]),
        ", ".join(f"{k} {v:.3f}" for k, v in sorted(by_file.items())),
        "",
        f"{result['searches']['merge']['training_tokens']:,}",
        f"{search_s:.0f}",
    ]
    return row, by_file


def scaling_table(folders: list[Path]) -> str:
    """Rows sorted by N; the L1 distance of each row's chosen mixture by file from the first
    row's ("-" where the two runs split different files)."""
    rows = sorted((scaling_row(f) for f in folders), key=lambda r: r[0][0])
    _, first = rows[0]
    column = HEADER.index("L1 by file vs first row")
    for row, by_file in rows:
        same = by_file.keys() == first.keys()
        row[column] = f"{sum(abs(by_file[k] - first[k]) for k in first):.3f}" if same else "-"
    return "\n".join(markdown_table(HEADER, [row for row, _ in rows])) + "\n"


def is_scaling_table(data: bytes) -> bool:
    """Whether a file holds what `demix scaling --out` writes (--out may replace it): a Markdown
    table under exactly this HEADER, every row with one cell per column."""
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        return False
    head = markdown_table(HEADER, [])
    if lines[:2] != head or lines[-1] != "" or len(lines) < 4:
        return False
    return all(
        row.startswith("| ") and row.endswith(" |") and len(row.split(" | ")) == len(HEADER)
        for row in lines[2:-1]
    )
