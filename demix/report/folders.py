"""Finding what a finished run's report is drawn from, in any folder DeMix writes.

A run's summary, its search selection (with the history of scored proxies) and its config sit
together in one folder: the `--out` of `demix run` (the selection there is
search/result.json), of `pipeline.py run-local`, or the evaluate-final task's summary artifact
of a pipeline run (under a local pipeline root, or downloaded from the bucket). `demix report`
takes any of these, or a folder holding such a run anywhere below it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from demix.errors import DataError

# Where each file may be, relative to the folder holding the run's summary.json.
_SELECTIONS = ("selection.json", "search/result.json")


@dataclass(frozen=True)
class FinishedRun:
    """What report.html is drawn from: the folder's summary, selection and config (config.json
    as the run wrote it; the stage that draws the report validates it)."""

    folder: Path
    summary: dict
    selection: dict
    config: dict


def _holds_run(folder: Path) -> bool:
    return (
        (folder / "summary.json").is_file()
        and (folder / "config.json").is_file()
        and any((folder / name).is_file() for name in _SELECTIONS)
    )


def find_finished_run(folder: str | Path) -> Path:
    """The folder holding a finished run's summary, selection and config: `folder` itself, or
    the most recently written such folder below it (a run-local --out whose copies predate
    them, a pipeline root, a downloaded pipeline run).

    Raises DataError naming the folder and what a run folder holds when there is none.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; give the --out folder of a finished run")
    if _holds_run(folder):
        return folder
    found = [p.parent for p in folder.rglob("summary.json") if _holds_run(p.parent)]
    if not found:
        raise DataError(
            f"{folder}: holds no finished run (summary.json with config.json and "
            "selection.json or search/result.json beside it); give the --out folder of a "
            "finished `demix run` or `pipeline.py run-local`, or a pipeline run's folder"
        )
    return max(found, key=lambda p: (p / "summary.json").stat().st_mtime_ns)


def _read_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read it as JSON ({err})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: not a JSON object")
    return value


def read_finished_run(folder: str | Path) -> FinishedRun:
    """The finished run at or below `folder` (see find_finished_run), read and checked (the
    config as a JSON object: demix.stages.finals.report_stage validates it).

    Raises DataError naming the file that is unreadable or not what a run writes.
    """
    where = find_finished_run(folder)
    selection_path = next(where / n for n in _SELECTIONS if (where / n).is_file())
    summary = _read_object(where / "summary.json")
    selection = _read_object(selection_path)
    config = _read_object(where / "config.json")
    for name, obj, keys in (
        ("summary.json", summary, ("datasets", "mixture", "baselines", "final", "verdict")),
        (selection_path.name, selection, ("history",)),
    ):
        if missing := [k for k in keys if k not in obj]:
            raise DataError(f"{where / name}: not what a finished run writes (no {missing})")
    return FinishedRun(where, summary, selection, config)
