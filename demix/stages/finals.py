"""Final stages: evaluate trained models, judge the finals (verdict) and write the run's
scores, summary.json and report; draw a finished run's report again (report_stage)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from demix import evaluate
from demix.checkpoint import RELATIVE_DELTA_NORM
from demix.config import RunConfig
from demix.data.shards import CuratedData
from demix.errors import ConfigError, DataError, DemixError
from demix.mixtures import SeededRun, components_in_order, final_runs
from demix.progress import track
from demix.report.summary import stage_timings, summarize, write_document_scores, write_summary
from demix.stages.values import Run
from demix.verdict import final_verdict

if TYPE_CHECKING:
    from demix.evaluate import Evaluator


def evaluate_each(
    config: RunConfig,
    data: CuratedData,
    models: dict[str, Path],
    evaluator: Evaluator | None = None,
) -> dict[str, dict]:
    """Each model's task results (with per-document scores), by name."""
    from demix.evaluate.models import load_for_eval
    from demix.model import resolve_device
    from demix.proxies import make_evaluator

    device = resolve_device(config.train.device)
    evaluator = evaluator or make_evaluator(config.evaluate, data, device)
    results = {}
    for name, path in track(list(models.items()), "evaluate", "model"):
        model = load_for_eval(config.evaluate, config.model, path, device)
        results[name] = evaluator.evaluate(model)
        del model
    return results


def evaluate_models_stage(
    config: RunConfig,
    data: CuratedData,
    models: dict[str, Path],
    evaluator: Evaluator | None = None,
) -> dict[str, dict]:
    """Evaluate models and rank them against each other (`demix evaluate`: a quick look, not a
    verdict; final models get one from evaluate_finals_stage)."""
    results = evaluate_each(config, data, models, evaluator)
    scores = evaluate.score_models(list(results.values()), config.evaluate.categories)
    return {
        label: {
            "ranking_score": s["ranking_score"],
            "categories": s["categories"],
            "tasks": results[label],
        }
        for label, s in zip(results, scores, strict=True)
    }


def finals_by_label(runs: list[SeededRun], results: dict[str, dict]) -> dict[str, list[dict]]:
    """The runs' results (by run name) grouped by label, one per seed in seed order."""
    grouped: dict[str, dict[int, dict]] = {}
    for run in runs:
        grouped.setdefault(run.label, {})[run.seed_offset] = results[run.name]
    return {label: [found[s] for s in sorted(found)] for label, found in grouped.items()}


def judge_finals(
    config: RunConfig, results: dict[str, list[dict]], chosen: str = "chosen"
) -> dict[str, dict]:
    """The verdict of `chosen` against every other label (demix.verdict.final_verdict)."""
    return final_verdict(
        results,
        config.evaluate.categories,
        config.evaluate.category_weights,
        chosen=chosen,
        seed=config.seed,
    )


def evaluate_finals_stage(
    run: Run,
    components: dict[str, dict],
    finals: dict[str, Path],
    selection: dict,
    out: Path,
    evaluator: Evaluator | None = None,
) -> dict:
    """Evaluate the final models (every label and seed), judge the chosen mixture against the
    baselines, write final_scores.json (per-document scores), summary.json and report.html
    into `out`; return the summary (the same for `demix run` and the pipeline).

    `components`: the component models' manifests by name (their weights are not needed, nor
    `run.components`); a selection without relative delta norms takes them from there.
    Raises DemixError when a final model of the configured labels and seeds is missing, or a
    component manifest has no relative delta norm where one is needed.
    """
    config, data, base = run.config, run.data, run.base
    runs = final_runs(config.final.seeds)
    names = [seeded.name for seeded in runs]
    missing = sorted(set(names) - set(finals))
    if missing:
        raise DemixError(f"final models {missing} are missing (final.seeds={config.final.seeds})")
    finals = {name: finals[name] for name in names}
    if selection.get("relative_delta_norms") is None and components:
        norms = {}
        for name, manifest in zip(data.names, components_in_order(data, components), strict=True):
            norms[name] = manifest.get(RELATIVE_DELTA_NORM)
            if norms[name] is None:
                raise DemixError(f"component {name!r}: its manifest has no relative delta norm")
        selection = {**selection, "relative_delta_norms": norms}
    start = time.perf_counter()
    results = finals_by_label(runs, evaluate_each(config, data, finals, evaluator))
    verdict = judge_finals(config, results)
    seconds = time.perf_counter() - start
    write_document_scores(out / "final_scores.json", results)
    timings = stage_timings(config.model, data, selection, base, components, finals, seconds)
    summary = summarize(
        config.model,
        config.train,
        config.merge,
        config.search,
        data,
        selection,
        results,
        verdict,
        base,
        components,
        finals,
        timings,
    )
    write_summary(out, summary, selection, config.model_dump())
    write_run_report(config, out, summary, selection)
    return summary


def write_run_report(config: RunConfig, out: Path, summary: dict, selection: dict) -> Path:
    """report.html of a run into `out` (demix.report.run.write_report, with the sections of
    `config` it shows); its path."""
    from demix.report.run import write_report

    return write_report(
        out, summary, selection, config.evaluate, config.search, config.merge, config.seed
    )


def report_stage(folder: Path) -> Path:
    """report.html drawn again from the finished run at or below `folder`
    (demix.report.folders.read_finished_run); its path.

    Raises DataError naming the file that is unreadable or not what a run writes, config.json
    that is not a valid run config included.
    """
    from demix.config import parse_config
    from demix.report.folders import read_finished_run

    finished = read_finished_run(folder)
    try:
        config = parse_config(finished.config, str(finished.folder / "config.json"))
    except ConfigError as err:  # a file the run wrote, not the user's config: bad data
        raise DataError(str(err)) from None
    return write_run_report(config, finished.folder, finished.summary, finished.selection)
