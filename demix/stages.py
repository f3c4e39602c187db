"""The DeMix stages as plain functions over artifact folders.

Each stage reads its inputs by path, writes one artifact folder (manifest last) and can be
called from Python, from the `demix` CLI or from one KFP component. `run` chains them.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch

from demix.config import RunConfig
from demix.data.curate import curate, dataset_files
from demix.data.demo import fetch_demo
from demix.data.shards import CuratedData
from demix.errors import DemixError
from demix.evaluate import Evaluator, score_models
from demix.merge import DeltaStack, component_mix_matrix, data_to_component, merge_to_disk
from demix.merge.delta_stack import relative_delta_norms
from demix.model import (
    check_compatible,
    load_model,
    read_model_manifest,
    resolve_device,
    set_threads,
)
from demix.search import ScoresTable, run_search, validate_mixture
from demix.storage import atomic_write_json, read_manifest
from demix.train import component_weights, fingerprint, train_model

BASELINES = ("uniform", "token_prior")


def general_mix(config: RunConfig, data: CuratedData) -> np.ndarray:
    """The general data every component sees: the named general dataset, else the token prior."""
    names = data.names
    if config.data.general is not None:
        g = np.zeros(len(names))
        g[names.index(config.data.general)] = 1.0
        return g
    return np.array([data.token_prior[n] for n in names])


def mix_matrix(config: RunConfig, data: CuratedData) -> np.ndarray:
    """M: column i is component i's training data mix."""
    return component_mix_matrix(data.names, general_mix(config, data), config.train.general_ratio)


def merge_weights(config: RunConfig, data: CuratedData, mixture: np.ndarray) -> np.ndarray:
    """Component weights of the proxy for a data mixture (`merge.weights: data | component`)."""
    if config.merge.weights == "component":
        return np.asarray(mixture, dtype=np.float64)
    return data_to_component(mix_matrix(config, data), mixture)


def as_dict(names: list[str], weights) -> dict[str, float]:
    return {n: float(w) for n, w in zip(names, weights, strict=True)}


def curate_stage(config: RunConfig, out: Path) -> CuratedData:
    """Fetch the demo corpus when configured, then curate the candidate datasets into `out`."""
    if config.data.fetch_demo:
        fetch_demo(Path(config.data.fetch_demo))
    tokenizer_dir = Path(config.model.base) if config.model.base else None
    inputs = [
        (str(p), p.stat().st_size, p.stat().st_mtime_ns)
        for spec in config.data.datasets
        for p in dataset_files(spec)
    ]
    fp = fingerprint(
        data=config.data.model_dump(), seed=config.seed, tokenizer=str(tokenizer_dir), inputs=inputs
    )
    if (out / "manifest.json").is_file() and read_manifest(out).get("fingerprint") == fp:
        return CuratedData(out)
    curate(config.data, out, config.seed, tokenizer_dir=tokenizer_dir, fingerprint=fp)
    return CuratedData(out)


def base_stage(config: RunConfig, data: CuratedData, out: Path) -> Path:
    """The shared base: `model.base` when given, else a tiny Llama pretrained on the token prior."""
    if config.model.base:
        return Path(config.model.base)
    train_model(
        out,
        data,
        data.token_prior,
        config.train.base,
        config.train,
        config.model,
        config.seed,
        role="base",
        name="base",
        arch=config.model.architecture,
    )
    return out


def component_stage(
    config: RunConfig, data: CuratedData, base: Path, dataset: str, out: Path
) -> Path:
    """Train the component for `dataset` from the base."""
    if dataset not in data.names:
        raise DemixError(f"--dataset {dataset!r} is not one of {data.names}")
    weights = component_weights(
        data.names, dataset, general_mix(config, data), config.train.general_ratio
    )
    train_model(
        out,
        data,
        weights,
        config.train.component,
        config.train,
        config.model,
        config.seed,
        role="component",
        name=dataset,
        init=base,
    )
    return out


def make_evaluator(config: RunConfig, data: CuratedData, device: torch.device) -> Evaluator:
    """Evaluator over the configured tasks, built once."""
    data_dir = Path(config.evaluate.data_dir) if config.evaluate.data_dir else None
    return Evaluator(
        config.evaluate, data.load_tokenizer(), str(device), data=data, eval_data_dir=data_dir
    )


def search_stage(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    components: dict[str, Path],
    out: Path,
    evaluator: Evaluator | None = None,
) -> dict:
    """Search the mixture simplex with merged proxies; write scores.jsonl and result.json to `out`.

    Resumes from an existing scores table: proxies already scored are not evaluated again.
    """
    names = data.names
    comp_dirs = [components[n] for n in names]
    check_compatible(base, comp_dirs)
    device = resolve_device(config.train.device)
    model = load_model(
        base,
        device,
        torch.float32,
        config.model.trust_remote_code,
        config.model.attn_implementation,
    )
    model.eval()
    stack = DeltaStack(model, base, comp_dirs)
    evaluator = evaluator or make_evaluator(config, data, device)
    categories = config.evaluate.categories

    def evaluate(mixture: np.ndarray) -> dict:
        stack.write(merge_weights(config, data, mixture))
        return evaluator.evaluate(model)

    def score(results: list[dict]) -> list[float]:
        return [s["ranking_score"] for s in score_models(results, categories)]

    out.mkdir(parents=True, exist_ok=True)
    prior = np.array([data.token_prior[n] for n in names])
    found = run_search(
        names, prior, config.search, config.seed, evaluate, score, ScoresTable(out / "scores.jsonl")
    )
    mixture = found["mixture"]
    result = {
        "mixture": as_dict(names, mixture),
        "component_weights": as_dict(names, merge_weights(config, data, mixture)),
        "merge_weights": config.merge.weights,
        "mix_matrix": mix_matrix(config, data).round(6).tolist(),
        "relative_delta_norms": as_dict(names, stack.relative_norms),
        "rounds": found["rounds"],
        "proxies_evaluated": found["proxies_evaluated"],
        "predictor_spearman": found.get("predictor_spearman"),
        "predicted_score": found.get("predicted_score"),
        "history": found["history"],
    }
    atomic_write_json(out / "result.json", result)
    return result


def final_stage(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    label: str,
    mixture: dict[str, float],
    out: Path,
) -> Path:
    """Train a final model from the base on a data mixture (the chosen one or a baseline)."""
    weights = validate_mixture(mixture, data.names)
    train_model(
        out,
        data,
        as_dict(data.names, weights),
        config.train.final,
        config.train,
        config.model,
        config.seed,
        role="final",
        name=label,
        init=base,
    )
    return out


def evaluate_models(
    config: RunConfig,
    data: CuratedData,
    models: dict[str, Path],
    evaluator: Evaluator | None = None,
) -> dict[str, dict]:
    """Evaluate finished models and rank them against each other."""
    device = resolve_device(config.train.device)
    evaluator = evaluator or make_evaluator(config, data, device)
    results = {}
    for label, path in models.items():
        model = load_model(
            path,
            device,
            torch.float32,
            config.model.trust_remote_code,
            config.model.attn_implementation,
        )
        results[label] = evaluator.evaluate(model)
        del model
    scores = score_models(list(results.values()), config.evaluate.categories)
    return {
        label: {
            "ranking_score": s["ranking_score"],
            "categories": s["categories"],
            "tasks": results[label],
        }
        for label, s in zip(results, scores, strict=True)
    }


def baseline_mixtures(data: CuratedData) -> dict[str, dict[str, float]]:
    """Uniform over datasets and the token-proportional prior."""
    n = len(data.names)
    return {
        "uniform": {name: 1.0 / n for name in data.names},
        "token_prior": dict(data.token_prior),
    }


def run(config: RunConfig, out: str | Path, log=print) -> dict:
    """Run every stage end to end into `out`; each stage resumes or is skipped when done."""
    from demix.report import write_report

    set_threads()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", config.model_dump())
    timings: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(stage: str):
        start = time.perf_counter()
        log(f"[demix] {stage} ...")
        yield
        timings[stage] = round(time.perf_counter() - start, 1)
        log(f"[demix] {stage} done in {timings[stage]:.1f} s")

    if config.data.fetch_demo:
        with timed("fetch"):
            fetch_demo(Path(config.data.fetch_demo))
    with timed("curate"):
        data = curate_stage(config, out / "dataset")
    with timed("base"):
        base = base_stage(config, data, out / "models" / "base")
    components = {}
    with timed("components"):
        for name in data.names:
            components[name] = component_stage(
                config, data, base, name, out / "models" / f"component-{name}"
            )
    device = resolve_device(config.train.device)
    evaluator = make_evaluator(config, data, device)
    with timed("search"):
        found = search_stage(config, data, base, components, out / "search", evaluator)
    mixtures = {"chosen": found["mixture"], **baseline_mixtures(data)}
    finals = {}
    with timed("final"):
        for label, mixture in mixtures.items():
            finals[label] = final_stage(
                config, data, base, label, mixture, out / "models" / f"final-{label}"
            )
        final_scores = evaluate_models(config, data, finals, evaluator)

    def tokens(path: Path) -> int:
        return int(read_model_manifest(path).get("tokens", 0))

    summary = {
        "datasets": data.names,
        "token_prior": {n: round(p, 6) for n, p in data.token_prior.items()},
        "mixture": found["mixture"],
        "component_weights": found["component_weights"],
        "proxies_evaluated": found["proxies_evaluated"],
        "search_rounds": found["rounds"],
        "predictor_spearman": found["predictor_spearman"],
        "relative_delta_norms": found["relative_delta_norms"],
        "baselines": {k: mixtures[k] for k in BASELINES},
        "final": final_scores,
        "training_tokens": {
            "base": tokens(base) if not config.model.base else 0,
            "components": sum(tokens(p) for p in components.values()),
            "final": sum(tokens(p) for p in finals.values()),
        },
        "timings_s": timings,
    }
    atomic_write_json(out / "summary.json", summary)
    write_report(out, summary, found, config)
    return summary


def materialize_merge(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    components: dict[str, Path],
    mixture: dict[str, float],
    out: Path,
) -> dict:
    """Write the merged model of a data mixture to disk (`demix merge`)."""
    weights = validate_mixture(mixture, data.names)
    missing = sorted(set(data.names) - set(components))
    if missing:
        raise DemixError(f"no component model given for dataset(s) {missing}")
    comp_dirs = [components[n] for n in data.names]
    check_compatible(base, comp_dirs)
    return merge_to_disk(
        base,
        comp_dirs,
        merge_weights(config, data, weights),
        out,
        data_mixture=as_dict(data.names, weights),
        relative_delta_norms=relative_delta_norms(base, comp_dirs),
    )
