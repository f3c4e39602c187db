"""Fidelity and the merged search against the number of candidate datasets: one row per
finished `demix reproduce` folder (e.g. N = 3, 6, 9 on the same base: `make reproduce-scaling`).

    python -m demix.recipes.scaling runs/reproduce-n3 runs/reproduce-n6 runs/reproduce-n9 \
        --out runs/scaling.md

The table is demix.report.scaling's; this is its command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from demix.errors import DemixError, report_error
from demix.report.scaling import scaling_table
from demix.storage import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="demix reproduce output folders")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    try:
        table = scaling_table(args.folders)
    except DemixError as err:
        return report_error(err, program="scaling")
    print(table, end="")
    if args.out:
        atomic_write_text(args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
