"""Capability recovery (CRR): how much of the trained references' quality, or of their
improvement on the base, the merged proxies recover, per task and per category, with intervals
from the fidelity check's resamples of mixtures (see demix.fidelity for the definitions)."""

from __future__ import annotations

from typing import Any

import numpy as np

from demix.ranking import percentile_ci
from demix.verdict import LEVEL


def _values(results: list[dict], tasks: list[str]) -> np.ndarray:
    """Task values [R, T]."""
    return np.array([[float(r[t]["value"]) for t in tasks] for r in results], dtype=np.float64)


def crr_per_task(proxy, reference, base, higher_is_better) -> np.ndarray:
    """CRR per task from values [..., R, T] (mixtures on axis -2): sum proxy / sum reference
    where higher is better, (base - mean proxy) / (base - mean reference) for losses; NaN where
    the base is NaN or the references do not improve on it (base - mean reference <= 0: there
    is no improvement to recover, and a ratio of two losses of ground would read as one)."""
    proxy, reference = np.asarray(proxy), np.asarray(reference)
    gained = base - reference.mean(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = proxy.sum(axis=-2) / reference.sum(axis=-2)
        improvement = np.where(gained > 0, (base - proxy.mean(axis=-2)) / gained, np.nan)
    out = np.where(np.asarray(higher_is_better), ratio, improvement)
    return np.where(np.isfinite(out), out, np.nan)


def _crr_categories(per_task: np.ndarray, columns: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Per category the mean of its tasks' CRR, and "mean" over categories ([...] arrays)."""
    out = {c: per_task[..., cols].mean(axis=-1) for c, cols in columns.items()}
    out["mean"] = np.mean(list(out.values()), axis=0)
    return out


def _crr_inputs(proxy_results, reference_results, categories, base_result):
    """Tasks, proxy and reference values [R, T], base values [T] (NaN without a base result),
    higher_is_better [T] and each category's task columns."""
    tasks = list(dict.fromkeys(t for names in categories.values() for t in names))
    higher = np.array([bool(reference_results[0][t]["higher_is_better"]) for t in tasks])
    base = np.array([float(base_result[t]["value"]) if base_result else np.nan for t in tasks])
    columns = {c: [tasks.index(t) for t in names] for c, names in categories.items()}
    return (
        tasks,
        _values(proxy_results, tasks),
        _values(reference_results, tasks),
        base,
        higher,
        columns,
    )


def capability_recovery(
    proxy_results: list[dict],
    reference_results: list[dict],
    categories: dict[str, list[str]],
    base_result: dict | None = None,
) -> dict[str, float]:
    """CRR per category and their mean (key "mean"); see the module docstring for the definition."""
    _, proxy, reference, base, higher, columns = _crr_inputs(
        proxy_results, reference_results, categories, base_result
    )
    per_task = crr_per_task(proxy, reference, base, higher)
    return {c: float(v) for c, v in _crr_categories(per_task, columns).items()}


def capability_recovery_detail(
    proxy_results: list[dict],
    reference_results: list[dict],
    categories: dict[str, list[str]],
    base_result: dict | None,
    index: np.ndarray,
    level: float = LEVEL,
) -> dict[str, Any]:
    """{"crr": per category and "mean", "crr_ci": their intervals over the resampled mixtures
    `index`, "crr_tasks": {task: {"crr", "kind": "ratio" | "improvement"}}}, and "crr_note"
    when loss tasks have no base result."""
    tasks, proxy, reference, base, higher, columns = _crr_inputs(
        proxy_results, reference_results, categories, base_result
    )
    per_task = crr_per_task(proxy, reference, base, higher)
    resampled = crr_per_task(proxy[index], reference[index], base, higher)
    out: dict[str, Any] = {
        "crr": {c: float(v) for c, v in _crr_categories(per_task, columns).items()},
        "crr_ci": {
            c: percentile_ci(v, level) for c, v in _crr_categories(resampled, columns).items()
        },
        "crr_tasks": {
            t: {
                "crr": float(per_task[k]),
                "kind": "ratio" if higher[k] else "improvement",
                # mean over mixtures, raw units: base - reference (the improvement to recover)
                # and base - proxy (what the proxies recovered); < 0: worse than the base
                "base_minus_reference": float(base[k] - reference[:, k].mean()),
                "base_minus_proxy": float(base[k] - proxy[:, k].mean()),
            }
            for k, t in enumerate(tasks)
        },
    }
    if base_result is None and not higher.all():
        out["crr_note"] = (
            "No base model result: the CRR of loss-type tasks (the share of the base's "
            "improvement recovered) is NaN, and so is that of their categories"
        )
    lost = [
        t for k, t in enumerate(tasks) if not higher[k] and base[k] - reference[:, k].mean() <= 0
    ]
    if lost:
        out["crr_note"] = (
            f"the trained references do not improve on the base on {lost} (mean loss at or "
            "above the base's): there is no improvement to recover, so their CRR is NaN; see "
            "crr_tasks for the raw gaps"
        )
    return out
