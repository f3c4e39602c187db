"""summary.json of a run: one function builds it for `demix run` and the pipeline alike.

`timings_s` are the seconds of work each stage's artifacts record (curation, training of the
base, the components and the final models, proxy evaluations, and the evaluation of the final
models), so they mean the same on every path and survive a resume; the end-to-end wall time of
a run, which includes what was skipped or cached, is `wall_s`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from demix.base_model import base_lineage
from demix.checkpoint import manifest_total
from demix.config import MergeConfig, ModelConfig, SearchConfig, TrainConfig
from demix.data.shards import CuratedData
from demix.mixtures import FINAL_LABELS, baseline_mixtures, epoch_caps, epochs, max_epochs
from demix.storage import atomic_write_json


def stage_timings(
    model: ModelConfig,
    data: CuratedData,
    selection: dict,
    base: Path,
    components: dict[str, dict],
    finals: dict[str, Path],
    final_eval_seconds: float,
) -> dict[str, float]:
    """Seconds of work per stage, read from the artifacts (`components`: their manifests)."""
    return {
        "curate": round(float(data.manifest.get("seconds", 0.0)), 1),
        "base": 0.0 if model.base else round(manifest_total([base], "seconds"), 1),
        "components": round(_total(components.values(), "seconds"), 1),
        "search": round(sum(row.get("time_s", 0.0) for row in selection["history"]), 1),
        "final": round(manifest_total(finals.values(), "seconds") + final_eval_seconds, 1),
    }


def _total(manifests, field: str) -> float:
    """The sum of a numeric field over manifests (0 where it is missing), as manifest_total."""
    return sum(manifest.get(field) or 0 for manifest in manifests)


def final_entry(runs: list[dict]) -> dict:
    """A final mixture's raw scores: per task the mean over seeds with its standard error (the
    evaluation's own with one seed; with several, sqrt(between-seed variance / S + mean squared
    evaluation stderr / S)) and the per-seed values. No rank among the finals."""
    tasks = {}
    for task, first in runs[0].items():
        values = np.array([float(run[task]["value"]) for run in runs])
        stderrs = np.array([float(run[task].get("stderr") or 0.0) for run in runs])
        seeds = len(runs)
        between = float(np.var(values, ddof=1)) if seeds > 1 else 0.0
        tasks[task] = {
            "metric": first["metric"],
            "higher_is_better": first["higher_is_better"],
            "value": float(values.mean()),
            "stderr": float(np.sqrt(between / seeds + np.mean(stderrs**2) / seeds)),
            "per_seed": values.tolist(),
        }
    return {"seeds": len(runs), "tasks": tasks}


def summarize(
    model: ModelConfig,
    train: TrainConfig,
    merge: MergeConfig,
    search: SearchConfig,
    data: CuratedData,
    selection: dict,
    results: dict[str, list[dict]],
    verdict: dict[str, dict],
    base: Path,
    components: dict[str, dict],
    finals: dict[str, Path],
    timings: dict[str, float],
) -> dict:
    """The run's summary.json contract (`components`: the component models' manifests).

    epochs: of each dataset's train tokens under the chosen mixture at train.final.tokens;
    max_epochs and epoch_weight_caps: search.max_epochs of each dataset and the weight it
    allows (None where not capped); base_model: model.base's source, revision and content
    fingerprint (None when the base was trained).
    """
    return {
        "datasets": data.names,
        "token_prior": dict(data.token_prior),
        "dataset_train_tokens": dict(data.full_train_tokens),
        "final_tokens": train.final.tokens,
        "mixture": selection["mixture"],
        "epochs": epochs(selection["mixture"], data.full_train_tokens, train.final.tokens),
        "max_epochs": max_epochs(search, data),
        "epoch_weight_caps": epoch_caps(train, search, data),
        "component_weights": selection["component_weights"],
        "merge_weights": merge.weights,
        "min_component_weight": selection.get("min_component_weight"),
        "pool_negative_share": selection.get("pool_negative_share"),
        "proxies_evaluated": selection["proxies_evaluated"],
        "search_rounds": selection["rounds"],
        "search_objective": search.objective,
        "predictor_spearman": selection["predictor_spearman"],
        "predictor": selection.get("predictor"),
        "relative_delta_norms": selection["relative_delta_norms"],
        "baselines": baseline_mixtures(data),
        "final": {label: final_entry(runs) for label, runs in results.items()},
        "verdict": verdict,
        "search_method": search.method,
        "training_tokens": {
            "base": 0 if model.base else int(manifest_total([base], "tokens")),
            "components": int(_total(components.values(), "tokens")),
            "search_proxies": int(selection.get("proxy_training_tokens", 0)),
            "final": int(manifest_total(finals.values(), "tokens")),
        },
        "timings_s": timings,
        "base_model": base_lineage(model.base, base, model.trust_remote_code),
    }


def write_document_scores(path: Path, results: dict[str, list[dict]]) -> None:
    """final_scores.json: every final model's per-document scores, {label: [{task: [..]} per
    seed]}, floats to 7 significant digits (what the verdict resamples)."""
    compact = {
        label: [
            {
                task: [float(f"{v:.7g}") for v in entry.get("per_doc") or []]
                for task, entry in run.items()
            }
            for run in runs
        ]
        for label, runs in results.items()
    }
    atomic_write_json(path, compact)


REPORT_INPUTS = ("summary.json", "selection.json", "config.json")


def write_summary(out: Path, summary: dict, selection: dict, config_record: dict) -> None:
    """summary.json and what report.html is drawn from (the search's selection with its
    history, and `config_record`: the run config as config.json records it) into `out`, so
    `demix report` can draw the report again from this folder alone, wherever it was copied
    to (the run's stage writes report.html beside them, demix.report.run.write_report)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "selection.json", selection)
    atomic_write_json(out / "config.json", config_record)
    atomic_write_json(out / "summary.json", summary)


def add_wall_times(out: Path, summary: dict, wall: dict[str, float]) -> dict:
    """Record end-to-end wall times (`wall_s`) in the summary and rewrite summary.json."""
    summary["wall_s"] = {k: round(v, 1) for k, v in wall.items()}
    atomic_write_json(out / "summary.json", summary)
    return summary


def format_comparison(entry: dict) -> str:
    """`+0.123 [+0.010, +0.240] better` for one verdict entry."""
    return (
        f"{entry['diff']:+.3f} [{entry['ci_low']:+.3f}, {entry['ci_high']:+.3f}] {entry['verdict']}"
    )


def format_interval(value: float, interval: list[float]) -> str:
    """`0.812 [0.640, 0.905]`: a value and its [low, high] interval."""
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def verdict_text(summary: dict) -> str:
    """The mixtures, then the chosen mixture against each baseline with 95% intervals (Holm over
    the baselines): what `make demo` prints and the pipeline's verdict Markdown holds."""
    names = summary["datasets"]
    mixtures = {"chosen": summary["mixture"], **summary["baselines"]}
    width = max(12, *(len(n) for n in names))
    lines = [f"{'mixture':<12}" + "".join(f"{n:>{width}}" for n in names)]
    for label in FINAL_LABELS:
        lines.append(f"{label:<12}" + "".join(f"{mixtures[label][n]:>{width}.3f}" for n in names))
    verdict = summary["verdict"]
    keys = [k for k in next(iter(verdict.values())) if k != "tasks"]
    lines += [
        "",
        f"chosen vs baseline: paired difference (standardised; > 0: chosen better), "
        f"95% bootstrap interval, Holm over {len(verdict)} baselines, "
        f"{summary['final']['chosen']['seeds']} seed(s)",
    ]
    for baseline, entries in verdict.items():
        for key in ["objective", *[k for k in keys if k != "objective"]]:
            lines.append(f"  vs {baseline:<12} {key:<10} {format_comparison(entries[key])}")
    return "\n".join(lines)


def verdict_markdown(summary: dict) -> str:
    """verdict_text as a Markdown page (the KFP UI renders the pipeline's `verdict` artifact)."""
    return f"# DeMix: the chosen mixture and its verdict\n\n```\n{verdict_text(summary)}\n```\n"


def print_summary(summary: dict, out: Path) -> None:
    """The short table `demix run` and `make demo` print at the end (verdict_text), the search's
    size and the stage times."""
    print("\n" + verdict_text(summary))
    print(
        f"\n{summary['proxies_evaluated']} proxies in {summary['search_rounds']} rounds; "
        f"work per stage (s): {summary['timings_s']}; wall (s): {summary.get('wall_s', {})}"
    )
    print(f"wrote {out / 'summary.json'} and {out / 'report.html'}")
