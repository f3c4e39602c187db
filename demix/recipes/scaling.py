"""Fidelity and the merged search against the number of candidate datasets: one row per
finished `demix reproduce` folder (e.g. N = 3, 6, 9 on the same base: `make reproduce-scaling`).

    python -m demix.recipes.scaling runs/reproduce runs/reproduce-n6 runs/reproduce-n9 \
        --out runs/scaling.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from demix.errors import DemixError
from demix.fidelity import AGGREGATE
from demix.report.html import markdown_table
from demix.report.summary import format_comparison, format_interval
from demix.storage import atomic_write_text

HEADER = [
    "N",
    "run",
    "references",
    "macro rho [95%]",
    "aggregate rho [95%]",
    "regret (aggregate)",
    "proxy − linear fit (aggregate)",
    "chosen − token prior",
    "chosen − uniform",
    "component tokens",
]


def scaling_row(folder: Path) -> list[Any]:
    """One row from `folder`/reproduce.json. Raises DemixError when it is missing."""
    path = folder / "reproduce.json"
    if not path.is_file():
        raise DemixError(f"{path}: not found; run demix reproduce into {folder} first")
    result = json.loads(path.read_text())
    fid = result["fidelity"]
    aggregate, macro = fid["categories"][AGGREGATE], fid["macro"]["proxy"]
    verdict = result["verdicts"]["chosen_merge"]
    return [
        len(result["datasets"]),
        folder.name,
        fid["n"],
        format_interval(macro["rho"], macro["rho_ci"]),
        format_interval(aggregate["proxy"]["rho"], aggregate["proxy"]["rho_ci"]),
        f"{aggregate['proxy']['regret']:.3f}",
        format_comparison(aggregate["proxy_minus"]["trivial_linear"]),
        format_comparison(verdict["token_prior"]["objective"]),
        format_comparison(verdict["uniform"]["objective"]),
        f"{result['searches']['merge']['training_tokens']:,}",
    ]


def scaling_table(folders: list[Path]) -> str:
    rows = sorted((scaling_row(f) for f in folders), key=lambda r: r[0])
    return "\n".join(markdown_table(HEADER, rows)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="demix reproduce output folders")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    try:
        table = scaling_table(args.folders)
    except DemixError as err:
        print(f"scaling: error: {err}", file=sys.stderr)
        return err.exit_code
    print(table, end="")
    if args.out:
        atomic_write_text(args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
