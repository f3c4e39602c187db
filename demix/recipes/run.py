"""`demix run`: every stage end to end into one run folder; each stage resumes or is skipped.

StageClock, start_run_folder, prepare_models and train_finals are what the other recipes share
(the last three are demix.stages.run's)."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from demix.stages import (
    add_wall_times,
    component_manifests,
    evaluate_finals_stage,
    final_mixtures,
    prepare_models,
    run_evaluator,
    search_stage,
    start_run_folder,
    train_finals,
)

if TYPE_CHECKING:
    from demix.config import RunConfig

log = logging.getLogger(__name__)


class StageClock:
    """Logs the start and end of named steps and keeps their wall times in `timings`."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, step: str):
        start = time.perf_counter()
        log.info("%s ...", step)
        yield
        self.timings[step] = round(time.perf_counter() - start, 1)
        log.info("%s done in %.1f s", step, self.timings[step])


def run(config: RunConfig, out: str | Path) -> dict:
    """Run every stage end to end into `out`; returns the summary (summary.json)."""
    started = time.perf_counter()
    out = start_run_folder(config, out)
    timed = StageClock()
    # the training-based search trains a model per proxy instead of components to merge
    prepared = prepare_models(config, out, timed, components=config.search.method == "merge")
    evaluator = run_evaluator(config, prepared.data)
    with timed("search"):
        selection = search_stage(prepared, out / "search", evaluator)
    with timed("final"):
        mixtures = final_mixtures(config, selection, prepared.data)
        finals = train_finals(prepared, mixtures, out / "models")
        manifests = component_manifests(prepared.components)
        summary = evaluate_finals_stage(prepared, manifests, finals, selection, out, evaluator)
    wall = {"fetch": timed.timings["fetch"], "total": time.perf_counter() - started}
    return add_wall_times(out, summary, wall)
