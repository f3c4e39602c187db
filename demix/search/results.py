"""Append-only JSONL table of scored proxies: an interrupted search resumes from it."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np


def mixture_id(weights: np.ndarray, grid: float = 2e-4) -> str:
    """Stable id of a mixture from its grid-rounded weights."""
    units = np.rint(np.asarray(weights, dtype=np.float64) / grid).astype(np.int64)
    return "m-" + hashlib.sha256(units.tobytes()).hexdigest()[:12]


class ScoresTable:
    """One JSON row per evaluated proxy: {"id", "round", "weights", "tasks", "time_s"}."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def rows(self) -> list[dict]:
        """All complete rows; a truncated last line (a crash mid-write) is dropped with a warning."""
        if not self.path.is_file():
            return []
        rows = []
        lines = self.path.read_text().splitlines()
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    warnings.warn(f"{self.path}: dropping a truncated last row", stacklevel=2)
                    continue
                raise
        return rows

    def ids(self) -> set[str]:
        return {row["id"] for row in self.rows()}

    def append(self, row: dict) -> None:
        """Append one row and fsync, so a crash loses at most the row being written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = self.path.read_text() if self.path.is_file() else ""
        if text and not text.endswith("\n"):
            # a truncated last line from a crash: rewrite without it before appending
            text = text[: text.rfind("\n") + 1]
            self.path.write_text(text)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
