"""`demix reproduce`: the paper's protocol on one config, with a training-based baseline.

Runs, in one folder (every step resumes): curation, the base, the components, the merged-proxy
search, the training-based search over the same number of proxies, `validate` (merged proxies vs
trained references, next to weights-only predictors), a sweep of component budget x learning rate
(fidelity against the same references as the updates grow), and final models for both chosen
mixtures and the two baselines. Writes reproduce.json and reproduce.md (the table) and prints it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from demix.checkpoint import manifest_total
from demix.config import RunConfig, StageTraining
from demix.data.shards import CuratedData
from demix.evaluate.harness import Evaluator
from demix.fidelity import AGGREGATE, fidelity
from demix.mixtures import baseline_mixtures, seeded_names, split_seed
from demix.model import resolve_device
from demix.proxies import ProxyEvaluator, make_evaluator
from demix.recipes.run import StageClock, prepare_models, start_run_folder, train_finals
from demix.recipes.validate import validate_stage
from demix.report.summary import final_entry, format_comparison, format_interval
from demix.stages import (
    evaluate_each,
    finals_by_label,
    judge_finals,
    search_stage,
    train_components,
)
from demix.storage import atomic_write_json, atomic_write_text


def _tokens(paths) -> int:
    return int(manifest_total(paths, "tokens"))


def _with(config: RunConfig, section: str, **update) -> RunConfig:
    return config.model_copy(update={section: getattr(config, section).model_copy(update=update)})


def sweep_point(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    point: StageTraining,
    validation: dict[str, Any],
    evaluator: Evaluator,
    out: Path,
) -> dict[str, Any]:
    """Components retrained with one budget / lr; their proxies scored against the references."""
    swept = _with(config, "train", component=point)
    components = train_components(swept, data, base, out)
    proxies = ProxyEvaluator(swept, data, base, components, evaluator)
    weights = np.array([[m[n] for n in data.names] for m in validation["mixtures"]])
    results = [proxies(w) for w in weights]
    measured = fidelity(
        data.names,
        weights,
        results,
        validation["reference_results"],
        config.evaluate.categories,
        validation.get("base_result"),
        reference_training_tokens=validation["cost"]["reference_training_tokens"],
    )
    aggregate, macro = measured["categories"][AGGREGATE], measured["macro"]
    norms = proxies.stack.relative_norms
    return {
        "tokens": point.tokens,
        "lr": point.lr,
        "mean_delta_norm": float(np.mean(norms)),
        "max_delta_norm": float(np.max(norms)),
        "macro_rho_proxy": macro["proxy"]["rho"],
        "macro_rho_proxy_ci": macro["proxy"]["rho_ci"],
        "rho_proxy": aggregate["proxy"]["rho"],
        "rho_proxy_ci": aggregate["proxy"]["rho_ci"],
        "rho_weights_fit": aggregate["trivial_linear"]["rho"],
        "rho_quadratic_fit": aggregate["trivial_quadratic"]["rho"],
        "proxy_minus_quadratic_fit": aggregate["proxy_minus"]["trivial_quadratic"],
        "regret_proxy": aggregate["proxy"]["regret"],
        "crr": measured["crr"]["mean"],
        "crr_ci": measured["crr_ci"]["mean"],
    }


def reproduce(config: RunConfig, out: str | Path) -> dict[str, Any]:
    """Every step of the protocol into `out`; returns (and writes) the result table's data."""
    out = start_run_folder(config, out)
    timed = StageClock()
    merge_config = _with(config, "search", method="merge")
    trained_config = _with(config, "search", method="trained")
    data, base, components = prepare_models(config, out, timed)
    evaluator = make_evaluator(config, data, resolve_device(config.train.device))
    with timed("search_merge"):
        merged = search_stage(merge_config, data, base, components, out / "search-merge", evaluator)
    with timed("search_trained"):
        trained = search_stage(trained_config, data, base, {}, out / "search-trained", evaluator)
    with timed("validate"):
        validation = validate_stage(config, data, base, components, out / "validate", evaluator)
    sweep = []
    with timed("sweep"):
        for point in config.fidelity.sweep:
            folder = out / "sweep" / f"tokens{point.tokens}-lr{point.lr:g}"
            sweep.append(sweep_point(config, data, base, point, validation, evaluator, folder))
    mixtures = {
        "chosen_merge": merged["mixture"],
        "chosen_trained": trained["mixture"],
        **baseline_mixtures(data),
    }
    with timed("final"):
        names = seeded_names(mixtures, config.final.seeds)
        runs = {name: mixtures[split_seed(name)[0]] for name in names}
        finals = train_finals(config, data, base, runs, out / "models")
        results = finals_by_label(names, evaluate_each(config, data, finals, evaluator))
        baselines = {label: results[label] for label in baseline_mixtures(data)}
        verdicts = {
            chosen: judge_finals(config, {chosen: results[chosen], **baselines}, chosen)
            for chosen in ("chosen_merge", "chosen_trained")
        }

    merge_tokens = _tokens(components.values())
    result = {
        "datasets": data.names,
        "fidelity": {
            k: validation[k]
            for k in (
                "n",
                "bootstrap",
                "weights_only_training_tokens",
                "categories",
                "macro",
                "crr",
                "crr_ci",
                "crr_tasks",
                "crr_note",
                "tasks",
                "relative_delta_norms",
            )
            if k in validation
        },
        "sweep": sweep,
        "searches": {
            "merge": {
                "proxies_evaluated": merged["proxies_evaluated"],
                "training_tokens": merge_tokens,
            },
            "trained": {
                "proxies_evaluated": trained["proxies_evaluated"],
                "training_tokens": trained["proxy_training_tokens"],
            },
            "token_ratio": trained["proxy_training_tokens"] / max(1, merge_tokens),
        },
        "mixtures": mixtures,
        "final": {label: final_entry(label_runs) for label, label_runs in results.items()},
        "verdicts": verdicts,
        "training_tokens": {
            "base": 0 if config.model.base else _tokens([base]),
            "components": merge_tokens,
            "search_trained": trained["proxy_training_tokens"],
            "references": validation["cost"]["reference_training_tokens"],
            "final": _tokens(finals.values()),
        },
        "timings_s": timed.timings,
    }
    atomic_write_json(out / "reproduce.json", result)
    table = format_table(result)
    atomic_write_text(out / "reproduce.md", table)
    return result


def _tokens_label(tokens: int | None) -> str:
    return "tokens unknown" if tokens is None else f"{tokens:,} tokens"


def _fidelity_lines(fid: dict[str, Any]) -> list[str]:
    """The rank table (rho with intervals, regret, CRR), the paired proxy-minus-predictor table
    and the per-task signal/noise table."""
    label = _tokens_label(fid.get("weights_only_training_tokens"))
    resamples = fid.get("bootstrap", {}).get("resamples", "?")
    lines = [
        f"Fidelity over {fid['n']} mixtures (merged proxy vs trained reference; [95% bootstrap "
        f"interval over mixtures, {resamples} resamples]). Weights-only fits are trained on the "
        f"references ({label}); macro = mean of the per-category rhos (CRR: mean over "
        f"categories).",
        "",
        f"| score | rho proxy | rho linear fit ({label}) | rho quadratic fit ({label}) | "
        f"rho own weight | regret proxy | regret linear fit | CRR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = {**fid["categories"], "macro": fid["macro"]}
    for score, entry in rows.items():
        proxy, fit, quad = entry["proxy"], entry["trivial_linear"], entry["trivial_quadratic"]
        own = entry.get("trivial_weight")
        crr_key = "mean" if score == "macro" else score
        crr = (
            format_interval(fid["crr"][crr_key], fid["crr_ci"][crr_key])
            if crr_key in fid["crr"]
            else "-"
        )
        regrets = f"{proxy['regret']:.3f} | {fit['regret']:.3f}" if "regret" in proxy else "- | -"
        rhos = [
            format_interval(e["rho"], e["rho_ci"]) if e else "-" for e in (proxy, fit, quad, own)
        ]
        lines.append(f"| {score} | {' | '.join(rhos)} | {regrets} | {crr} |")
    lines += [
        "",
        "CRR per task: sum of proxy / sum of reference values where higher is better; "
        "(L_base - L_proxy) / (L_base - L_reference) for losses (1 = the references' "
        "improvement over the base, 0 = none)."
        + (f" {fid['crr_note']}." if "crr_note" in fid else ""),
        "",
        "Paired rho(proxy) - rho(predictor) on the same resamples [95% interval] and verdict:",
        "",
        "| score | proxy − linear fit | proxy − quadratic fit | proxy − own weight | overall |",
        "|---|---|---|---|---|",
    ]
    for score, entry in rows.items():
        minus = entry["proxy_minus"]
        cells = [
            format_comparison(minus[k]) if k in minus else "-"
            for k in ("trivial_linear", "trivial_quadratic", "trivial_weight")
        ]
        lines.append(f"| {score} | {' | '.join(cells)} | {entry['verdict']} |")
    lines += [
        "",
        "| task | rho proxy | reference spread | paired stderr | signal/noise | "
        "unpaired stderr | signal/noise (unpaired) |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, entry in fid["tasks"].items():
        lines.append(
            f"| {task} | {entry['rho']:.3f} | {entry['spread']:.4f} | "
            f"{entry['paired_stderr']:.4f} | {entry['snr']:.2f} | "
            f"{entry['stderr_unpaired']:.4f} | {entry['snr_unpaired']:.2f} |"
        )
    return lines


def _sweep_lines(sweep: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "| component tokens | lr | mean ‖Δ‖/‖base‖ | macro rho proxy | rho proxy | "
        "rho linear fit | rho quadratic fit | proxy − quadratic fit | regret | CRR |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for point in sweep:
        lines.append(
            f"| {point['tokens']:,} | {point['lr']:g} | {point['mean_delta_norm']:.3f} | "
            f"{format_interval(point['macro_rho_proxy'], point['macro_rho_proxy_ci'])} | "
            f"{format_interval(point['rho_proxy'], point['rho_proxy_ci'])} | "
            f"{point['rho_weights_fit']:.3f} | {point['rho_quadratic_fit']:.3f} | "
            f"{format_comparison(point['proxy_minus_quadratic_fit'])} | "
            f"{point['regret_proxy']:.3f} | {format_interval(point['crr'], point['crr_ci'])} |"
        )
    return lines


def format_table(result: dict[str, Any]) -> str:
    """The one table of `demix reproduce`, as Markdown."""
    fid = result["fidelity"]
    lines = _fidelity_lines(fid)
    norms = ", ".join(f"{n} {v:.3f}" for n, v in fid["relative_delta_norms"].items())
    searches = result["searches"]
    lines += [
        "",
        f"Component ‖Δ‖/‖base‖: {norms}",
        "",
        "| search | proxies evaluated | training tokens |",
        "|---|---|---|",
        f"| merged proxies | {searches['merge']['proxies_evaluated']} | "
        f"{searches['merge']['training_tokens']:,} (components) |",
        f"| trained proxies | {searches['trained']['proxies_evaluated']} | "
        f"{searches['trained']['training_tokens']:,} |",
        f"| ratio | | {searches['token_ratio']:.2f}x fewer with merging |",
        "",
        f"| final model | {' | '.join('w ' + n for n in result['datasets'])} |",
        "|---" * (len(result["datasets"]) + 1) + "|",
    ]
    for label, weights in result["mixtures"].items():
        row = " | ".join(f"{weights[n]:.3f}" for n in result["datasets"])
        lines.append(f"| {label} | {row} |")
    seeds = next(iter(result["final"].values()))["seeds"]
    lines += [
        "",
        f"Verdict ({seeds} seed(s); chosen − baseline, standardised, 95% bootstrap interval "
        "with Holm over the baselines):",
        "",
        "| chosen | baseline | score | difference [95% interval] verdict |",
        "|---|---|---|---|",
    ]
    for chosen, verdict in result["verdicts"].items():
        for baseline, entries in verdict.items():
            for key, entry in entries.items():
                if key != "tasks":
                    lines.append(f"| {chosen} | {baseline} | {key} | {format_comparison(entry)} |")
    if result["sweep"]:
        lines += _sweep_lines(result["sweep"])
    return "\n".join(lines) + "\n"
