"""Training curves: one row per logged step, written beside the model.

A row holds the step, the tokens seen, the loss of the global batch, the learning rate, the
gradient norm (before clipping), the tokens per second since the previous logged row and the
wall time. The rows travel in the checkpoint (a resumed run keeps its earlier rows) and are
written into the model folder, listed in its manifest, as curves.jsonl and as a TensorBoard
event file under tensorboard/ (`tensorboard --logdir RUN` finds every model's curves; each
checkpoint folder holds the curves so far). Only the main process writes them. The curves do not
change what is trained: the deterministic part (step, loss, grad_norm, lr) is training_log.json,
the rest (rates, wall times) differs from run to run.

Nothing here imports torch until an event file is written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from demix.checkpoint import CURVES_FILE
from demix.errors import DataError

TENSORBOARD_DIR = "tensorboard"
# A fixed name (TensorBoard reads any file named *tfevents*): no host name in an artifact.
EVENTS_FILE = "events.out.tfevents.demix"
# The quantities of a row and their TensorBoard tags.
SCALAR_TAGS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "tokens": "train/tokens_seen",
}
# training_log.json's keys: what two runs of the same job reproduce bit for bit.
HISTORY_KEYS = ("step", "loss", "grad_norm", "lr")


class CurveRecorder:
    """Collects the rows of one training job (continuing `rows`, those of a resumed checkpoint)."""

    def __init__(
        self,
        rows: list[dict],
        tokens_per_step: int,
        clock: Callable[[], float] = time.perf_counter,
        wall: Callable[[], float] = time.time,
    ):
        self.rows = rows
        self.tokens_per_step = tokens_per_step
        self.clock, self.wall = clock, wall
        self.mark: tuple[float, int] | None = None

    def start(self, step: int) -> None:
        """Training (re)starts at `step`: the next row's rate counts from here."""
        self.mark = (self.clock(), step)

    def record(self, step: int, loss: float, lr: float, grad_norm: float) -> dict:
        """Add the row of logged step `step` and return it."""
        now = self.clock()
        since, first = self.mark if self.mark is not None else (now, step)
        rate = (step - first) * self.tokens_per_step / (now - since) if now > since else None
        row = {
            "step": step,
            "loss": round(loss, 5),
            "grad_norm": round(grad_norm, 5),
            "lr": lr,
            "tokens": step * self.tokens_per_step,
            "tokens_per_s": round(rate, 1) if rate is not None else None,
            "time": round(self.wall(), 3),
        }
        self.rows.append(row)
        self.mark = (now, step)
        return row

    def history(self) -> list[dict]:
        """The rows without their timing: training_log.json, the same for every run of a job."""
        return [{key: row[key] for key in HISTORY_KEYS if key in row} for row in self.rows]


def write_curve_files(folder: Path, rows: list[dict]) -> None:
    """Write curves.jsonl and tensorboard/<EVENTS_FILE> of `rows` into `folder` (a staged
    artifact: its manifest, written after, lists them)."""
    (folder / CURVES_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_events(folder / TENSORBOARD_DIR, rows)


def write_events(folder: Path, rows: list[dict]) -> Path:
    """One TensorBoard event file of `rows`' scalars (SCALAR_TAGS) by step, at their wall times."""
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(folder), max_queue=len(rows) * len(SCALAR_TAGS) + 10)
    try:
        for row in rows:
            for key, tag in SCALAR_TAGS.items():
                value = row.get(key)
                if value is not None:
                    writer.add_scalar(tag, value, row["step"], walltime=row.get("time"))
    finally:
        writer.close()
    # the writer names its file after the time, host and process; the folder is new: one file
    (written,) = (p for p in folder.iterdir() if "tfevents" in p.name and p.name != EVENTS_FILE)
    target = folder / EVENTS_FILE
    written.replace(target)
    return target


def read_curves(folder: Path) -> list[dict]:
    """The rows of a model folder's curves.jsonl ([] when it has none: a model.base, a merge).

    Raises DataError naming the file and line of a row that is not a JSON object with a step.
    """
    path = Path(folder) / CURVES_FILE
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise DataError(f"{path}:{number}: expected a JSON object with an integer step")
        rows.append(row)
    return rows
