"""`demix validate`: do merged proxies rank mixtures like models trained on them, on this data?

Reference mixtures are R draws of the search sampler plus every vertex and the uniform mixture.
For each, a reference model is trained from the base with the component budget (the
training-based proxy) and the merged proxy of the same mixture is built; both are evaluated on
the run's tasks and compared (demix.fidelity), always next to predictors that see only the
weights. The base model is evaluated once too: capability recovery of a loss-type task is the
share of the base's improvement the proxies recover. So is the control, a branch from the base
on the token prior with the references' budget and schedule: the references' improvements and
the CRR are reported against the branch point AND against the control (annealing is not counted
as a data effect), with the merge's soup bonus per task (demix.improvement). Writes
fidelity.json (with `base_result`, `control_result`, `anchors`) and fidelity.html; reference
models are kept under `references/` and the control in `control/`, so a rerun trains nothing
again.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from demix.checkpoint import read_model_manifest
from demix.config import RunConfig
from demix.data.shards import CuratedData
from demix.evaluate.harness import Evaluator
from demix.evaluate.models import load_for_eval
from demix.fidelity import AGGREGATE, fidelity, reliability, seed_noise, task_signal
from demix.improvement import against_anchors
from demix.mixtures import (
    as_dict,
    data_to_component,
    in_hull,
    prior_vector,
)
from demix.model import resolve_device
from demix.progress import track
from demix.proxies import SMALL_UPDATE, large_updates, make_evaluator, model_id, score_key
from demix.report.fidelity import write_fidelity_report
from demix.search.predictor import seed_entropy
from demix.search.results import mixture_id
from demix.search.sampler import sample_mixtures
from demix.stages.artifacts import read_model_index
from demix.stages.proxies import ProxyEvaluator
from demix.stages.train import train_stage
from demix.stages.values import Run, run_mixing
from demix.storage import atomic_write_json, atomic_write_text, kept_json

log = logging.getLogger(__name__)

VALIDATE_STREAM = 0x7A11D
MIN_HULL_SPLIT = 4  # fewest references a side of fidelity_by_hull is measured on


def reference_mixtures(config: RunConfig, data: CuratedData) -> np.ndarray:
    """Sampled mixtures, then the vertices and the centre of the searched space, without
    duplicates: the simplex's vertices and the uniform mixture, or under `merge.weights: hull`
    the components' training mixes (the hull's vertices) and their mean, with the sample drawn
    inside the hull as the search draws it. References lie where the search looks."""
    prior = prior_vector(data)
    rng = np.random.default_rng([seed_entropy(config.seed), VALIDATE_STREAM])
    mixing = run_mixing(config, data)
    floor = mixing.floor
    sampled = sample_mixtures(
        prior, config.fidelity.references, rng, config.search.sampler, floor=floor
    )
    d = len(data.names)
    corners = np.eye(d) if floor is None else mixing.matrix.T
    fixed = np.vstack([corners, corners.mean(axis=0)[None]])
    out, seen = [], set()
    for w in np.vstack([sampled, fixed]):
        key = mixture_id(w, config.search.sampler.grid)
        if key not in seen:
            seen.add(key)
            out.append(w)
    return np.array(out)


def validate_stage(run: Run, out: Path, evaluator: Evaluator | None = None) -> dict[str, Any]:
    """Train references, build proxies, evaluate both, write fidelity.json/.html into `out`."""
    config, data, base, components = run.config, run.data, run.base, run.components
    out.mkdir(parents=True, exist_ok=True)
    mixtures = reference_mixtures(config, data)
    device = resolve_device(config.train.device)
    evaluator = evaluator or make_evaluator(config.evaluate, data, device)
    grid = config.search.sampler.grid
    ids = [mixture_id(w, grid) for w in mixtures]

    start = time.perf_counter()
    proxies = ProxyEvaluator(config, data, base, components, evaluator)
    proxy_results = [proxies(w) for w in mixtures]
    proxy_seconds = time.perf_counter() - start
    norms = proxies.relative_norms
    del proxies

    start = time.perf_counter()
    reference_results, reference_tokens = train_references(
        run, mixtures, out / "references", evaluator
    )
    reference_seconds = time.perf_counter() - start
    k = config.fidelity.replicates
    replicate_results, replicate_tokens = train_references(
        run, mixtures[:k], out / "references", evaluator, seed_offset=1
    )

    model = load_for_eval(config.evaluate, config.model, base, device)
    base_result = evaluator.evaluate(model)
    del model
    control_result = train_control(run, out, evaluator)

    result = {
        "datasets": data.names,
        "mixtures": [
            {"id": key, **as_dict(data.names, w)} for key, w in zip(ids, mixtures, strict=True)
        ],
        **fidelity(
            data.names,
            mixtures,
            proxy_results,
            reference_results,
            config.evaluate.categories,
            base_result,
            reference_training_tokens=reference_tokens,
        ),
        "relative_delta_norms": norms,
        "cost": {
            "reference_training_tokens": reference_tokens,
            "replicate_training_tokens": replicate_tokens,
            "control_training_tokens": int(read_model_manifest(out / "control").get("tokens", 0)),
            "reference_seconds": round(reference_seconds, 1),
            "proxy_seconds": round(proxy_seconds, 1),
        },
        "anchors": against_anchors(
            proxy_results,
            reference_results,
            config.evaluate.categories,
            {"branch_point": base_result, "control": control_result},
            ids,
            config.evaluate.diagnostic_tasks,
            (data.names, mixtures),
        ),
        # tasks in no objective (held-out own-domain losses): rho and signal/noise beside it
        "diagnostics": task_signal(
            proxy_results, reference_results, config.evaluate.diagnostic_tasks
        ),
        "proxy_results": proxy_results,
        "reference_results": reference_results,
        "base_result": base_result,
        "control_result": control_result,
    }
    if k:
        result["reliability"] = reliability(
            proxy_results[:k], reference_results[:k], replicate_results, config.evaluate.categories
        )
        noise = seed_noise(reference_results[:k], replicate_results, result["tasks"])
        for task, entry in noise.items():
            result["tasks"][task].update(entry)
        result["replicate_results"] = replicate_results
    tags, result["fidelity_by_hull"] = fidelity_by_hull(
        data.names,
        mixtures,
        run_mixing(config, data).matrix,
        proxy_results,
        reference_results,
        config.evaluate.categories,
        base_result=base_result,
        reference_training_tokens=reference_tokens,
    )
    for entry, tag in zip(result["mixtures"], tags, strict=True):
        entry.update(tag)
    result["warnings"] = fidelity_warnings(result)
    for warning in result["warnings"]:
        log.warning(warning)
    atomic_write_json(out / "fidelity.json", result)
    write_fidelity_report(out / "fidelity.html", result)
    return result


def train_references(
    run: Run,
    mixtures: np.ndarray,
    folder: Path,
    evaluator: Evaluator,
    seed_offset: int = 0,
    role_label: str = "reference",
) -> tuple[list[dict], int]:
    """A model per mixture trained from the base with the reference recipe (the component
    budget of `config`) into `folder`/reference-<mixture id>[-seed<s>] and evaluated; returns the
    results and the training tokens. seed_offset s > 0 trains with the run seed + s (another
    data order and initialisation of the same recipe). A model already there is not trained
    again (resume)."""
    config, data = run.config, run.data
    device = resolve_device(config.train.device)
    results, tokens = [], 0
    for k, w in enumerate(track(mixtures, f"{role_label} models", "model")):
        key = mixture_id(w, config.search.sampler.grid)
        name = f"reference-{key}" + (f"-seed{seed_offset}" if seed_offset else "")
        log.info("%s %d/%d %s", role_label, k + 1, len(mixtures), name)
        path = folder / name
        mixture = as_dict(data.names, w)
        train_stage(
            config, data, "reference", path, name, run.base, mixture, seed_offset=seed_offset
        )
        tokens += int(read_model_manifest(path).get("tokens", 0))
        results.append(evaluate_once(run, path, evaluator, device))
    return results, tokens


def train_control(run: Run, folder: Path, evaluator: Evaluator) -> dict:
    """The control branch (role control: the token prior, the references' budget and schedule,
    the run seed) trained into `folder`/control and evaluated; its result."""
    path = folder / "control"
    log.info("control (the token prior, the reference budget)")
    train_stage(run.config, run.data, "control", path, "control", run.base)
    return evaluate_once(run, path, evaluator, resolve_device(run.config.train.device))


def evaluate_once(run: Run, model_dir: Path, evaluator: Evaluator, device) -> dict:
    """The evaluation of a trained model, kept beside it (<folder>.eval.json, stamped with the
    model's fingerprint and score_key): a resumed protocol evaluates no model twice."""

    def evaluate() -> dict:
        model = load_for_eval(run.config.evaluate, run.config.model, model_dir, device)
        return evaluator.evaluate(model)

    key = score_key(
        run.config.evaluate,
        run.data,
        run.base,
        device=resolve_device(run.config.train.device),
        model=model_id(model_dir),
    )
    return kept_json(model_dir.with_name(model_dir.name + ".eval.json"), key, evaluate)


def fidelity_by_hull(
    names: list[str],
    mixtures: np.ndarray,
    mix: np.ndarray,
    proxy_results: list[dict],
    reference_results: list[dict],
    categories: dict[str, list[str]],
    **fidelity_kwargs: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Fidelity inside and outside the components' hull (every c = M^-1 d >= 0, M = `mix`);
    `fidelity_kwargs` (the base's result, the references' tokens) go to demix.fidelity.fidelity.

    Returns each mixture's {"min_component_weight", "in_hull"} and {"in_hull": fidelity over
    those mixtures, "out_of_hull": the same over the rest, "counts": {side: mixtures}}; a side
    with fewer than MIN_HULL_SPLIT mixtures gets None.
    """
    mixtures = np.asarray(mixtures, dtype=np.float64)
    components = data_to_component(mix, mixtures.T).T
    inside = in_hull(components)
    tags = [
        {"min_component_weight": float(c.min()), "in_hull": bool(i)}
        for c, i in zip(components, inside, strict=True)
    ]
    split: dict[str, Any] = {"counts": {}}
    for side, rows in (
        ("in_hull", np.flatnonzero(inside)),
        ("out_of_hull", np.flatnonzero(~inside)),
    ):
        split["counts"][side] = len(rows)
        split[side] = (
            fidelity(
                names,
                mixtures[rows],
                [proxy_results[i] for i in rows],
                [reference_results[i] for i in rows],
                categories,
                **fidelity_kwargs,
            )
            if len(rows) >= MIN_HULL_SPLIT
            else None
        )
    return tags, split


def fidelity_warnings(result: dict[str, Any]) -> list[str]:
    """Plain-language warnings: proxies not shown to beat weights alone, tasks without signal,
    large component updates."""
    warnings = []
    aggregate = result["categories"][AGGREGATE]
    if not aggregate["proxy_beats_trivial"]:
        versus = aggregate["proxy_minus"]["trivial_linear"]
        warnings.append(
            f"merged proxies are not shown to rank mixtures better than predictors that see "
            f"only the weights "
            f"(aggregate rho {aggregate['proxy']['rho']:.3f} vs "
            f"{aggregate['trivial_linear']['rho']:.3f} for the linear fit, paired difference "
            f"{versus['diff']:+.3f} [{versus['ci_low']:+.3f}, {versus['ci_high']:+.3f}]; "
            f"against every weights-only predictor: {aggregate['verdict']}); do not trust a "
            f"search on this data"
        )
    quiet = {t: round(snr, 2) for t, snr in _signal_to_noise(result).items() if snr < 1}
    if quiet:
        warnings.append(
            f"tasks whose scores differ between references by less than the standard error of "
            f"a difference (signal/noise {quiet}): they add noise to every ranking; drop them "
            f"or raise evaluate.limit"
        )
    large = large_updates(result["relative_delta_norms"])
    if large:
        warnings.append(
            f"components moved far from the base (||delta||/||base|| > {SMALL_UPDATE}): {large}; "
            f"merged proxies assume small updates (lower the component lr or budget)"
        )
    return warnings


def _signal_to_noise(result: dict[str, Any]) -> dict[str, float]:
    """Each task's paired signal/noise; the unpaired one where it has no per-document scores."""
    out = {}
    for task, entry in result.get("tasks", {}).items():
        snr = entry["snr"]
        out[task] = snr if math.isfinite(snr) else entry.get("snr_unpaired", float("nan"))
    return out


def validate_step(
    config: RunConfig,
    data_dir: Path,
    base: Path,
    component_index: Path,
    fidelity_out: Path,
    report_out: Path,
) -> dict[str, Any]:
    """The pipeline's validate task: references and proxies, fidelity JSON and HTML as artifacts.

    Works under `fidelity_out`.work (references are kept there for a retried task).
    """
    work = fidelity_out.with_name(fidelity_out.name + ".work")
    run = Run(config, CuratedData(data_dir), base, read_model_index(component_index))
    result = validate_stage(run, work)
    atomic_write_json(fidelity_out, result)
    report_out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report_out, (work / "fidelity.html").read_text())
    return result
