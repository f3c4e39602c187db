"""`demix run`: every stage end to end into one run folder; each stage resumes or is skipped."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from demix.checkpoint import read_model_manifest
from demix.config import RunConfig
from demix.data.shards import CuratedData
from demix.mixtures import final_mixture, final_run_names, search_cap
from demix.model import resolve_device, set_threads
from demix.proxies import make_evaluator
from demix.report.summary import add_wall_times
from demix.stages import (
    curate_stage,
    evaluate_finals_stage,
    fetch_configured_demo,
    search_stage,
    train_components,
    train_stage,
)
from demix.storage import atomic_write_json

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


def start_run_folder(config: RunConfig, out: str | Path) -> Path:
    """The run folder, created, with the config it runs; threads set for this machine."""
    set_threads()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", config.model_dump())
    return out


def prepare_models(
    config: RunConfig, out: Path, timed: StageClock, components: bool = True
) -> tuple[CuratedData, Path, dict[str, Path]]:
    """Fetch (demo), curate, the base and (unless `components` is False) the components."""
    with timed("fetch"):
        fetch_configured_demo(config)
    with timed("curate"):
        data = curate_stage(config, out / "dataset")
    search_cap(config, data)  # search.max_epochs that no mixture can meet fail before training
    with timed("base"):
        base = train_stage(config, data, "base", out / "models" / "base")
    with timed("components"):
        trained = train_components(config, data, base, out / "models") if components else {}
    return data, base, trained


def train_finals(
    config: RunConfig, data: CuratedData, base: Path, mixtures: dict[str, dict], folder: Path
) -> dict[str, Path]:
    """A final model per named mixture, from the base, into `folder`/final-<name> (a name
    `label-seed<s>` trains with the run seed + s)."""
    return {
        label: train_stage(config, data, "final", folder / f"final-{label}", label, base, mixture)
        for label, mixture in mixtures.items()
    }


def run(config: RunConfig, out: str | Path) -> dict:
    """Run every stage end to end into `out`; returns the summary (summary.json)."""
    started = time.perf_counter()
    out = start_run_folder(config, out)
    timed = StageClock()
    # the training-based search trains a model per proxy instead of components to merge
    data, base, components = prepare_models(
        config, out, timed, components=config.search.method == "merge"
    )
    evaluator = make_evaluator(config, data, resolve_device(config.train.device))
    with timed("search"):
        selection = search_stage(config, data, base, components, out / "search", evaluator)
    with timed("final"):
        names = final_run_names(config.final.seeds)
        mixtures = {name: final_mixture(name, selection, data) for name in names}
        finals = train_finals(config, data, base, mixtures, out / "models")
        manifests = {name: read_model_manifest(path) for name, path in components.items()}
        summary = evaluate_finals_stage(
            config, data, base, manifests, finals, selection, out, evaluator
        )
    wall = {"fetch": timed.timings["fetch"], "total": time.perf_counter() - started}
    return add_wall_times(out, summary, wall)
