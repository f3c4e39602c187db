"""What the recipes share at the stage layer: the run folder, the models every run prepares
(data, base, components), the final models of named mixtures, and the evaluator a run loads
once for its search and its finals."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from demix.checkpoint import read_model_manifest
from demix.config import RunConfig
from demix.data.shards import CuratedData
from demix.mixtures import SeededRun, final_mixture, final_runs
from demix.report.summary import add_wall_times
from demix.stages.curate import curate_stage, fetch_configured_demo
from demix.stages.train import train_components, train_stage
from demix.stages.values import Run, run_search_space
from demix.storage import atomic_write_json

if TYPE_CHECKING:
    from demix.evaluate import Evaluator

# A recipe's clock: `with timed("step"):` times and logs the step (demix.recipes.run.StageClock).
Clock = Callable[[str], AbstractContextManager]

__all__ = [
    "Clock",
    "add_wall_times",
    "component_manifests",
    "final_mixtures",
    "prepare_models",
    "run_evaluator",
    "start_run_folder",
    "train_finals",
]


def start_run_folder(config: RunConfig, out: str | Path) -> Path:
    """The run folder, created, with the config it runs; threads set for this machine."""
    from demix.model import set_threads  # torch: on first use

    set_threads()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", config.model_dump())
    return out


def prepare_models(
    config: RunConfig,
    out: Path,
    timed: Clock,
    components: bool = True,
) -> Run:
    """Fetch (demo), curate, the base and (unless `components` is False) the components, each
    step under `timed(step)` (the recipe's clock); the Run the later stages take."""
    with timed("fetch"):
        fetch_configured_demo(config)
    with timed("curate"):
        data = curate_stage(config, out / "dataset")
    # search.max_epochs that no mixture can meet fail before training
    run_search_space(config, data)
    with timed("base"):
        base = train_stage(config, data, "base", out / "models" / "base")
    with timed("components"):
        trained = train_components(config, data, base, out / "models") if components else {}
    return Run(config, data, base, trained)


def train_finals(run: Run, mixtures: dict[SeededRun, dict], folder: Path) -> dict[str, Path]:
    """A final model per seeded run and its mixture, from the base, into
    `folder`/final-<run name>, each with the run seed + its seed offset; the folders by name."""
    return {
        seeded.name: train_stage(
            run.config,
            run.data,
            "final",
            folder / f"final-{seeded.name}",
            seeded.name,
            run.base,
            mixture,
            seed_offset=seeded.seed_offset,
        )
        for seeded, mixture in mixtures.items()
    }


def run_evaluator(config: RunConfig, data: CuratedData) -> Evaluator:
    """The evaluator of a run on its training device, loaded once for the search and finals."""
    from demix.model import resolve_device  # torch and lm-eval: on first use
    from demix.proxies import make_evaluator

    return make_evaluator(config.evaluate, data, resolve_device(config.train.device))


def final_mixtures(config: RunConfig, selection: dict, data: CuratedData) -> dict[SeededRun, dict]:
    """The mixture of each final run (each label for each of final.seeds)."""
    runs = final_runs(config.final.seeds)
    return {run: final_mixture(run.label, selection, data) for run in runs}


def component_manifests(components: dict[str, Path]) -> dict[str, dict]:
    """The manifest of each component model, by name."""
    return {name: read_model_manifest(path) for name, path in components.items()}
