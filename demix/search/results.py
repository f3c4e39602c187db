"""Append-only JSONL table of scored proxies: an interrupted search resumes from it.

One line per evaluated proxy: {"id", "round", "weights": {dataset: w}, "tasks": {task: result},
"time_s"}. Each append is flushed and fsynced, so a crash loses at most the line being written;
that truncated last line is dropped on reading (with a warning) and cut off on the next append.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from demix.errors import SearchError
from demix.storage.files import open_append


def mixture_id(weights: np.ndarray, grid: float = 2e-4) -> str:
    """Stable id of a mixture (in dataset order) from its grid-rounded weights: "m-" + 12 hex."""
    units = np.rint(np.asarray(weights, dtype=np.float64) / grid).astype("<i8")
    return "m-" + hashlib.sha256(units.tobytes()).hexdigest()[:12]


class ScoresTable:
    """One JSON row per evaluated proxy: {"id", "round", "weights", "tasks", "time_s"}."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def rows(self) -> list[dict]:
        """All complete rows in file order; a truncated last line is dropped with a warning.

        Raises SearchError for a broken line before the last one, a row without an id, or a
        table that is a symbolic link or no regular file.
        """
        self._check_regular()
        if not self.path.is_file():
            return []
        rows = []
        lines = self.path.read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                if number == len(lines):
                    warnings.warn(
                        f"{self.path}:{number}: dropping a truncated last row (interrupted write)",
                        stacklevel=2,
                    )
                    continue
                raise SearchError(
                    f"{self.path}:{number}: not a JSON row ({err.msg}); the scores table is "
                    f"corrupt, delete that line to re-evaluate the proxy"
                ) from None
            if not isinstance(row, dict) or "id" not in row:
                raise SearchError(
                    f"{self.path}:{number}: a row must be a JSON object with an 'id'; "
                    f"delete that line to re-evaluate the proxy"
                )
            rows.append(row)
        return rows

    def _check_regular(self) -> None:
        """Refuse a table that is a symbolic link or not a regular file (a user's file behind
        it would be read as scores and appended to). Raises SearchError naming it."""
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            what = "a symbolic link" if self.path.is_symlink() else "not a regular file"
            raise SearchError(
                f"{self.path}: is {what}; the scores table is a regular file demix writes: "
                "remove it or give another search folder"
            )

    def ids(self) -> set[str]:
        """Ids of all complete rows."""
        return {row["id"] for row in self.rows()}

    def has(self, mixture: str) -> bool:
        """Whether a row with this id is in the table."""
        return mixture in self.ids()

    def append(self, row: dict) -> None:
        """Append one row and fsync, so a crash loses at most the row being written.

        Raises SearchError or DataError when the table is a symbolic link or no regular file.
        """
        line = json.dumps(row) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._check_regular()
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    # a truncated last line from a crash: cut it off before appending
                    f.seek(0)
                    f.truncate(f.read().rfind(b"\n") + 1)
        with open_append(self.path) as f:  # never through a link to a user's file
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
