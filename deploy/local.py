"""The pipeline on this machine with kfp.local (each task a subprocess of this interpreter).

kfp.local prints each task's executor input, output and streamed log (thousands of lines for
the demo): `quiet_tasks` sends all of that to a log file and shows one line per task instead,
and a failed task's last lines.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from deploy.placement import Placement


def run_local(
    build_pipeline: Callable[[Placement], Callable],
    config_path: Path,
    out: Path,
    pipeline_root: Path | None = None,
    num_eval_workers: int = 2,
    progress: TextIO | None = None,
    overrides: dict[str, object] | None = None,
) -> dict:
    """Run the pipeline `build_pipeline(placement)` with kfp.local (SubprocessRunner, this
    interpreter), its search rounds unrolled from the config's search.rounds.

    kfp.local's log goes to `out`/kfp-local.log; `progress` (default: standard output) gets
    its path and one line per task (see quiet_tasks). Copies summary.json, report.html and
    what the report is drawn from into `out`, and the pipeline's own outputs (mixture.json,
    verdict.md); returns the summary. Raises SystemExit naming the failed task and the
    log when the run fails.
    """
    import warnings

    from kfp import local

    from demix.config import config_yaml, load_config

    # Resource, accelerator and image settings are meaningless to the local runner.
    warnings.filterwarnings(
        "ignore", message=".*(no effect in the current local runner|non-Python base image).*"
    )
    from demix.report.summary import REPORT_INPUTS, add_wall_times
    from demix.stages import fetch_configured_demo

    started = time.perf_counter()
    config = load_config(config_path, overrides)  # `--set`: the run gets the overridden YAML
    fetch_configured_demo(config)
    fetch_seconds = time.perf_counter() - started
    root = Path(pipeline_root or out / "pipeline-root").resolve()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    pipeline = build_pipeline(Placement.for_target("local", rounds=config.search.rounds))
    log = out / LOG_NAME
    with quiet_tasks(log, display_names(pipeline.pipeline_spec), progress) as tasks:
        try:
            returned = pipeline(
                config_yaml=_absolute_paths(config_yaml(config)),
                num_eval_workers=num_eval_workers,
            ).outputs
        except RuntimeError:  # kfp.local: a task failed, and quiet_tasks has shown which
            if not tasks.failed:
                raise
    if tasks.failed:
        raise SystemExit(
            f"pipeline.py: error: the local run failed at {', '.join(tasks.failed)}; "
            f"the full log: {log}"
        )
    runs = sorted(
        root.glob(f"{pipeline.name}-*/evaluate-final/summary"), key=lambda p: p.stat().st_mtime
    )
    if not runs:
        raise SystemExit(
            f"pipeline.py: error: no evaluate-final output under {root}; see the log {log}"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in ("report.html", *REPORT_INPUTS):  # so `demix report OUT` draws it again
        if (runs[-1] / name).is_file():
            shutil.copy2(runs[-1] / name, out / name)
    for name, file in RETURNED_FILES.items():  # the pipeline's own outputs
        shutil.copy2(returned[name].path, out / file)
    summary = json.loads((runs[-1] / "summary.json").read_text())
    # The wall time adds the local runner's own overhead to the stages' work (timings_s).
    wall = {"fetch": fetch_seconds, "total": time.perf_counter() - started}
    return add_wall_times(out, summary, wall)


LOG_NAME = "kfp-local.log"
# The pipeline's outputs a local run copies into its --out folder, by output name.
RETURNED_FILES = {"mixture": "mixture.json", "verdict": "verdict.md"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_CACHED = re.compile(r"Task (\S+) cache hit")
_RETRY = re.compile(r"Task (\S+) failed \(attempt (\d+)/(\d+)\)\. Retrying in (\S+)s")


def display_names(spec) -> dict[str, str]:
    """{task key: display name} of every task of a compiled pipeline spec (loops included);
    kfp.local names the tasks by their keys."""
    names = {}

    def walk(dag):
        for key, task in dag.tasks.items():
            names[key] = task.task_info.name or key
            component = spec.components[task.component_ref.name]
            if component.WhichOneof("implementation") == "dag":
                walk(component.dag)

    walk(spec.root.dag)
    return names


class TaskLines(io.TextIOBase):
    """A text stream for kfp.local's log and its tasks' streamed output: everything to `log`;
    to `progress` one line per finished task (display name, status, seconds) and, for a task
    that fails, its last `tail` lines. `failed` lists the display names of failed tasks."""

    def __init__(self, log: TextIO, progress: TextIO, names: dict[str, str], tail: int = 15):
        self.log, self.progress, self.names = log, progress, names
        self.failed: list[str] = []
        self._partial = ""
        self._tail: collections.deque[str] = collections.deque(maxlen=tail)
        self._started = time.perf_counter()
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # what code that inspects sys.stdout expects to find
        return "utf-8"

    def write(self, text: str) -> int:
        with self._lock:
            self.log.write(text)
            self.log.flush()
            lines = (self._partial + text).split("\n")
            self._partial = lines.pop()
            for line in lines:
                self._line(_ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self.log.flush()

    def _line(self, line: str) -> None:
        if found := _STARTED.search(line):
            self._started = time.perf_counter()
            self._tail.clear()
        elif found := _FINISHED.search(line):
            self._show(found.group(1), found.group(2), time.perf_counter() - self._started)
        elif found := _CACHED.search(line):
            self._show(found.group(1), "CACHED", 0.0)
        elif found := _RETRY.search(line):  # the failure shown is not the task's last word
            key, attempt, attempts, delay = found.groups()
            name = self.names.get(key, key)
            if name in self.failed:
                self.failed.remove(name)
            self.progress.write(f"  {name:<34} retry {attempt}/{int(attempts) - 1} in {delay}s\n")
            self.progress.flush()
        elif line.strip() and not set(line.strip()) <= {"-"}:  # kfp.local's rulers
            self._tail.append(line.rsplit("\r", 1)[-1])  # a progress bar's last state

    def _show(self, key: str, status: str, seconds: float) -> None:
        name = self.names.get(key, key)
        self.progress.write(f"  {name:<34} {status:<8} {seconds:7.1f}s\n")
        if status == "FAILURE":
            self.failed.append(name)
            self.progress.write(f"  --- the last lines of {name}:\n")
            self.progress.writelines(f"  | {line}\n" for line in self._tail)
        self.progress.flush()


@contextlib.contextmanager
def quiet_tasks(
    log_path: Path, names: dict[str, str], progress: TextIO | None = None
) -> Iterator[TaskLines]:
    """Send everything written to standard output and error, by Python (sys.stdout, logging)
    and below it (file descriptors 1 and 2, so subprocesses writing there too), to `log_path`;
    show the log's path and one line per task on `progress` (default: standard output)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.ExitStack() as stack:
        screen = progress or stack.enter_context(open(os.dup(1), "w", buffering=1))
        # never written through a symbolic link (a user's file behind it would be replaced)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        log = stack.enter_context(open(fd, "w", buffering=1))
        screen.write(f"kfp.local log: {log_path}\n")
        screen.flush()
        stream = TaskLines(log, screen, names)
        streams = sys.stdout, sys.stderr
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
        sys.stdout = sys.stderr = stream
        try:
            yield stream
        finally:
            sys.stdout, sys.stderr = streams
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)


def _absolute_paths(text: str) -> str:
    """Local components run in another working directory: make data paths absolute."""
    import yaml

    from demix.config import load_yaml

    raw = load_yaml(text, "config")
    for spec in [*raw["data"]["datasets"], *(raw["data"].get("targets") or [])]:
        spec["paths"] = [p if "://" in p else str(Path(p).resolve()) for p in spec["paths"]]
    for section, key in (
        ("data", "fetch_demo"),
        ("evaluate", "data_dir"),
        ("evaluate", "include_path"),
        ("model", "base"),
    ):
        value = raw[section].get(key)
        if value and "://" not in value:
            raw[section][key] = str(Path(value).resolve())
    return yaml.safe_dump(raw, sort_keys=False)
