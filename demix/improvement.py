"""What trained references gain over an anchor model, and what merging adds beyond training.

In the branch regime (demix.train.roles) every reference is a decay branch from the base, and
part of what a branch gains is the decay itself, whatever its data. Two anchors separate that
part: the branch point (the base) and the control (a branch on the token prior with the
references' budget and schedule). Against each anchor, per task:

- improvements: each reference's mean paired difference over documents (oriented: > 0 = the
  reference is better than the anchor), its paired standard error (the standard deviation of
  the per-document differences over sqrt(documents)) and z = difference / standard error; and
  the mean over references with a percentile bootstrap interval that resamples references and
  documents, the pairing kept (demix.verdict.paired_bootstrap with the references as its
  seeds), and its verdict.
- improvement-CRR (demix.recovery.capability_recovery_detail with the anchor as the base):
  (L_anchor - L_proxy) / (L_anchor - L_reference) per loss task. Against the control, the
  annealing every branch gets is not counted as recovered data effect.

soup bonus, per task: the merged proxy minus the trained reference of the same mixture, paired
over documents and mixtures (paired_bootstrap, mixtures as its seeds): > 0 where merging the
components beats training on the mixture, a gain that is no data effect (a model soup of
annealed branches) and that rank fidelity alone does not show.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from demix.ranking import resample_rows
from demix.recovery import capability_recovery_detail
from demix.verdict import LEVEL, RESAMPLES, oriented_documents, paired_bootstrap

ANCHORS = ("branch_point", "control")
OWN_EFFECT_Z = 4.0  # a reference's effect beyond the control counts when it exceeds 4 stderrs


def _tasks(categories: dict[str, list[str]]) -> list[str]:
    return list(dict.fromkeys(t for tasks in categories.values() for t in tasks))


def _documents(results: list[dict], task: str, where: str) -> np.ndarray:
    """[models, docs] oriented per-document scores of one task."""
    return np.vstack([oriented_documents(r, task, f"{where} {i}") for i, r in enumerate(results)])


def _per_model(differences: np.ndarray) -> list[dict[str, float]]:
    """diff, paired stderr and z of each row of per-document differences [models, docs]."""
    rows = []
    for d in differences:
        se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
        diff = float(d.mean())
        # the same difference on every document (no noise): +-inf, the sign of the difference
        no_noise = math.copysign(math.inf, diff) if diff else float("nan")
        z = diff / se if se > 0 else no_noise
        rows.append({"diff": diff, "stderr": se, "z": z})
    return rows


def improvements(
    results: list[dict],
    anchor: dict,
    tasks: list[str],
    labels: list[str] | None = None,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per task: {"mean": the mean improvement over `anchor` of the models `results` with its
    interval and verdict, "models": [{"label", "diff", "stderr", "z"}] in order, "beyond":
    how many models improve by more than OWN_EFFECT_Z paired standard errors}.

    Raises ValueError when a result lacks per-document scores or the documents differ.
    """
    out = {}
    for task in tasks:
        docs = _documents(results, task, "model")
        base = oriented_documents(anchor, task, "anchor")
        if docs.shape[1] != base.size:
            raise ValueError(
                f"task {task!r}: models scored on {docs.shape[1]} documents, the anchor on "
                f"{base.size}; evaluate them on the same documents"
            )
        anchor_rows = np.broadcast_to(base, docs.shape)
        mean = paired_bootstrap(docs, anchor_rows, resamples=resamples, level=level, seed=seed)
        models = _per_model(docs - anchor_rows)
        for k, row in enumerate(models):
            row["label"] = labels[k] if labels else str(k)
        out[task] = {
            "mean": mean.to_dict(),
            "models": models,
            "beyond": sum(1 for row in models if row["z"] > OWN_EFFECT_Z),
        }
    return out


def own_domain(
    per_task: dict[str, dict[str, Any]], names: list[str], weights: np.ndarray
) -> dict[str, dict[str, Any]]:
    """Each candidate's own-domain effect against one anchor: for a dataset `d` whose held-out
    loss `heldout:d` is among the tasks of `per_task` (an improvements result), the entry of
    the reference with the most weight on d (its vertex, where there is one): {"label",
    "weight", "diff", "stderr", "z", "beyond": z > OWN_EFFECT_Z}."""
    weights = np.asarray(weights, dtype=np.float64)
    out = {}
    for k, name in enumerate(names):
        task = f"heldout:{name}"
        if task not in per_task:
            continue
        best = int(np.argmax(weights[:, k]))
        entry = per_task[task]["models"][best]
        out[name] = {
            **entry,
            "weight": float(weights[best, k]),
            "beyond": entry["z"] > OWN_EFFECT_Z,
        }
    return out


def soup_bonus(
    proxy_results: list[dict],
    reference_results: list[dict],
    tasks: list[str],
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per task, merged proxy minus trained reference of the same mixture (oriented, paired over
    mixtures and documents): {"diff", "ci_low", "ci_high", "level", "p_value", "verdict"}.

    Raises ValueError when a result lacks per-document scores or the documents differ.
    """
    return {
        task: paired_bootstrap(
            _documents(proxy_results, task, "proxy"),
            _documents(reference_results, task, "reference"),
            resamples=resamples,
            level=level,
            seed=seed,
        ).to_dict()
        for task in tasks
    }


def against_anchors(
    proxy_results: list[dict],
    reference_results: list[dict],
    categories: dict[str, list[str]],
    anchors: dict[str, dict | None],
    labels: list[str] | None = None,
    diagnostics: list[str] = (),
    mixtures: tuple[list[str], np.ndarray] | None = None,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, Any]:
    """{"improvements": {anchor: improvements}, "crr": {anchor: capability_recovery_detail},
    "soup_bonus": soup_bonus} for each anchor given (branch_point, control; None: left out).
    Improvements and the soup bonus cover the categories' tasks and the `diagnostics` (tasks in
    no objective, e.g. held-out own-domain losses), CRR the categories. With `mixtures`
    (dataset names, the references' weights [R, D]) also "own_domain": {anchor: own_domain}.
    The CRR intervals resample mixtures as demix.fidelity.fidelity does (same seed, same draws).
    """
    tasks = list(dict.fromkeys([*_tasks(categories), *diagnostics]))
    index = resample_rows(len(reference_results), resamples, seed)
    given = {name: result for name, result in anchors.items() if result is not None}
    gains = {
        name: improvements(
            reference_results, result, tasks, labels, resamples=resamples, level=level, seed=seed
        )
        for name, result in given.items()
    }
    out = {
        "improvements": gains,
        "crr": {
            name: capability_recovery_detail(
                proxy_results, reference_results, categories, result, index, level
            )
            for name, result in given.items()
        },
        "soup_bonus": soup_bonus(
            proxy_results, reference_results, tasks, resamples=resamples, level=level, seed=seed
        ),
    }
    if mixtures is not None:
        out["own_domain"] = {name: own_domain(g, *mixtures) for name, g in gains.items()}
    return out
