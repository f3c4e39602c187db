"""`submit --wait`: follow a started run to its end, one line per task state change.

A backend is read through a `look` (one poll of the run: its state, its tasks' states, its
error); `follow_run` polls it with an injectable sleep and clock, prints what changed and turns
the run's result into the exit code: 0 succeeded, 1 failed or cancelled, 124 --wait-timeout
passed, 130 interrupted (the run goes on in the last two).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from demix.errors import ConfigError, DemixError

EXIT_RUN_FAILED = 1
EXIT_WAIT_TIMEOUT = 124  # what timeout(1) exits with
EXIT_INTERRUPTED = 130

KUBEFLOW_DONE = {"SUCCEEDED", "FAILED", "CANCELED", "SKIPPED"}
VERTEX_DONE = {"SUCCEEDED", "FAILED", "CANCELLED", "PAUSED"}


class WaitEnded(DemixError):
    """`submit --wait` ended without the run succeeding; `exit_code` says how (EXIT_*)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RunStatus:
    """One poll of a run: its state, its tasks as (task id, name, state), its error message."""

    state: str
    done: bool
    succeeded: bool
    tasks: list[tuple[str, str, str]] = field(default_factory=list)
    error: str = ""


def follow_run(
    run: str,
    look: Callable[[], RunStatus],
    poll_seconds: float,
    timeout: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    out: TextIO | None = None,
) -> RunStatus:
    """Poll `look` every `poll_seconds` until the run ends, printing `NAME: STATE` whenever a
    task's state changes and then `run RUN: STATE` whenever the run's does; the last status.

    Raises WaitEnded: the run ended without succeeding (EXIT_RUN_FAILED), `timeout` seconds
    passed first (EXIT_WAIT_TIMEOUT) or the wait was interrupted (EXIT_INTERRUPTED).
    """
    out = out or sys.stdout
    start = clock()
    seen: dict[str, str] = {}
    run_state = None
    try:
        while True:
            status = look()
            for task_id, name, state in status.tasks:
                if seen.get(task_id) != state:
                    seen[task_id] = state
                    print(f"{name}: {state}", file=out, flush=True)
            if status.state != run_state:
                run_state = status.state
                print(f"run {run}: {run_state}", file=out, flush=True)
            if status.done:
                break
            left = None if timeout is None else timeout - (clock() - start)
            if left is not None and left <= 0:
                raise WaitEnded(
                    f"--wait-timeout {timeout:g}: run {run} is still {status.state}; it goes on "
                    "(follow it in the UI, or wait longer)",
                    EXIT_WAIT_TIMEOUT,
                )
            sleep(poll_seconds if left is None else min(poll_seconds, left))
    except KeyboardInterrupt:
        raise WaitEnded(
            f"stopped following run {run} (interrupted); the run goes on", EXIT_INTERRUPTED
        ) from None
    if not status.succeeded:
        said = f": {status.error}" if status.error else ""
        raise WaitEnded(f"run {run} ended {status.state}{said}", EXIT_RUN_FAILED)
    return status


def check_wait(args) -> None:
    """--poll-seconds and --wait-timeout: positive, and only with --wait. Raises ConfigError."""
    for flag, value in (
        ("--poll-seconds", args.poll_seconds),
        ("--wait-timeout", args.wait_timeout),
    ):
        if value is None:
            continue
        if not args.wait:
            raise ConfigError(f"{flag} goes with --wait")
        if not value > 0:
            raise ConfigError(f"{flag} {value:g}: a number of seconds above 0")


def kubeflow_look(client, run_id: str) -> Callable[[], RunStatus]:
    """A poll of a Kubeflow run: kfp.Client.get_run (v2beta1 run_details.task_details)."""

    def look() -> RunStatus:
        run = client.get_run(run_id)
        state = run.state or "RUNTIME_STATE_UNSPECIFIED"
        details = run.run_details.task_details if run.run_details else None
        tasks = [
            (t.task_id, t.display_name or t.task_id, t.state) for t in details or [] if t.state
        ]
        error = run.error.message if run.error and run.error.message else ""
        return RunStatus(state, state in KUBEFLOW_DONE, state == "SUCCEEDED", tasks, error)

    return look


def vertex_look(job, pipeline_name: str) -> Callable[[], RunStatus]:
    """A poll of a Vertex AI pipeline job: its `state` (which refreshes the job with one GET),
    then the refreshed resource's task details. The pipeline's own task (no parent, named
    `pipeline_name`) is the run line; a task whose execution was a cache hit is CACHED."""
    from google.cloud.aiplatform_v1.types import Execution

    def look() -> RunStatus:
        state = job.state.name.removeprefix("PIPELINE_STATE_")
        resource = job.gca_resource
        tasks = []
        for task in resource.job_detail.task_details:
            if not task.parent_task_id and task.task_name == pipeline_name:
                continue
            cached = task.execution.state == Execution.State.CACHED
            tasks.append(
                (str(task.task_id), task.task_name, "CACHED" if cached else task.state.name)
            )
        error = resource.error.message if resource.error else ""
        return RunStatus(state, state in VERTEX_DONE, state == "SUCCEEDED", tasks, error)

    return look
