"""The DeMix stages as plain functions over artifact folders.

Each stage reads its inputs by path, writes one artifact folder (manifest last) and can be
called from Python, from the `demix` CLI or from one KFP component. `run` chains them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from demix.checkpoint import check_compatible, read_model_manifest
from demix.config import RunConfig
from demix.data.curate import (
    curate,
    curate_group,
    input_files,
    merge_groups,
    plan_curation,
)
from demix.data.demo import fetch_demo
from demix.data.shards import CuratedData
from demix.errors import DemixError
from demix.evaluate import Evaluator, score_models
from demix.merge import (
    DeltaStack,
    MergeMethod,
    component_mix_matrix,
    data_to_component,
    make_method,
    merge_to_disk,
)
from demix.merge.delta_stack import relative_delta_norms
from demix.model import load_model, resolve_device, set_threads
from demix.search import (
    ScoresTable,
    evaluate_proposals,
    final_selection,
    round_proposals,
    validate_mixture,
)
from demix.search.results import mixture_id
from demix.storage import (
    atomic_write_json,
    atomic_write_text,
    fetch_artifact,
    fetch_files,
    read_manifest,
)
from demix.train import component_weights, fingerprint, train_model

FINAL_LABELS = ("chosen", "uniform", "token_prior")
# Runs after each training checkpoint is saved (publishes checkpoints of a gs:// output).
CheckpointHook = Callable[[Path], None] | None
# The method assumes components stay close to the base (the paper: about 0.1 or less).
SMALL_UPDATE = 0.1
log = logging.getLogger(__name__)


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


def merge_method(config: RunConfig) -> MergeMethod:
    """The configured merge method with its parameters."""
    return make_method(config.merge.method, **config.merge.parameters)


def as_dict(names: list[str], weights) -> dict[str, float]:
    return {n: float(w) for n, w in zip(names, weights, strict=True)}


def base_model_dir(config: RunConfig) -> Path | None:
    """The local folder of `model.base` (a gs:// URI is fetched and verified), or None."""
    if not config.model.base:
        return None
    from demix.checkpoint import MODEL_KIND

    return fetch_artifact(config.model.base, MODEL_KIND, require_manifest=False)


def curation_fingerprint(config: RunConfig, tokenizer_dir: Path | None) -> str:
    """Hash of what curation reads: the data settings (not the grouping, which does not change
    the result), the seed, the base tokenizer and each input file's path, size and stamp."""
    inputs = [(f.uri, f.size, f.stamp) for spec in config.data.datasets for f in input_files(spec)]
    return fingerprint(
        data=config.data.model_dump(exclude={"curate_groups"}),
        seed=config.seed,
        tokenizer=str(tokenizer_dir),
        inputs=inputs,
    )


def curate_stage(config: RunConfig, out: Path) -> CuratedData:
    """Fetch the demo corpus when configured, then curate the candidate datasets into `out`.

    Plan, data.curate_groups groups and their merge, all in this process (the pipeline runs
    the same three steps as tasks: curate_plan_step, curate_group_step, curate_merge_step).
    Dataset paths and `model.base` may be gs:// URIs (each file fetched when it is read).
    """
    if config.data.fetch_demo:
        fetch_demo(Path(config.data.fetch_demo))
    tokenizer_dir = base_model_dir(config)
    fp = curation_fingerprint(config, tokenizer_dir)
    if (out / "manifest.json").is_file() and read_manifest(out).get("fingerprint") == fp:
        return CuratedData(out)
    curate(config.data, out, config.seed, tokenizer_dir=tokenizer_dir, fingerprint=fp)
    return CuratedData(out)


def curate_plan_step(config: RunConfig, out: Path) -> list[int]:
    """The pipeline's plan task: fetch the demo corpus when configured, write the curation
    plan to `out`; return the group indices to fan out over."""
    if config.data.fetch_demo:
        fetch_demo(Path(config.data.fetch_demo))
    tokenizer_dir = base_model_dir(config)
    fp = curation_fingerprint(config, tokenizer_dir)
    plan = plan_curation(config.data, out, config.seed, tokenizer_dir, fingerprint=fp)
    return list(range(len(plan["groups"])))


def curate_group_step(plan: Path, group: int, out: Path) -> dict:
    """The pipeline's map task: curate one group of the plan into `out`."""
    return curate_group(plan, group, out)


def curate_merge_step(plan: Path, groups: list[Path], out: Path) -> CuratedData:
    """The pipeline's reduce task: merge the curated groups into the dataset artifact `out`."""
    merge_groups(plan, groups, out)
    return CuratedData(out)


def base_stage(
    config: RunConfig, data: CuratedData, out: Path, on_checkpoint: CheckpointHook = None
) -> Path:
    """The shared base: `model.base` when given, else a tiny Llama pretrained on the token prior."""
    if config.model.base:
        return base_model_dir(config)
    _train_role(config, data, data.token_prior, "base", "base", out, on_checkpoint=on_checkpoint)
    return out


def _train_role(
    config: RunConfig,
    data: CuratedData,
    weights: dict[str, float],
    role: str,
    name: str,
    out: Path,
    init: Path | None = None,
    on_checkpoint: CheckpointHook = None,
) -> dict:
    """The one training loop with the budget of `role` (base | component | reference | final)."""
    stage = {
        "base": config.train.base,
        "component": config.train.component,
        "reference": config.train.component,  # training-based proxies: the component budget
        "final": config.train.final,
    }[role]
    return train_model(
        out,
        data,
        weights,
        stage,
        config.train,
        config.model,
        config.seed,
        role=role,
        name=name,
        init=init,
        arch=config.model.architecture if init is None else None,
        on_checkpoint=on_checkpoint,
    )


def component_stage(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    dataset: str,
    out: Path,
    on_checkpoint: CheckpointHook = None,
) -> Path:
    """Train the component for `dataset` from the base."""
    if dataset not in data.names:
        raise DemixError(f"--dataset {dataset!r} is not one of {data.names}")
    weights = component_weights(
        data.names, dataset, general_mix(config, data), config.train.general_ratio
    )
    _train_role(
        config, data, weights, "component", dataset, out, init=base, on_checkpoint=on_checkpoint
    )
    return out


def reference_stage(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    mixture: dict[str, float],
    out: Path,
    on_checkpoint: CheckpointHook = None,
) -> Path:
    """Train a model from the base on a data mixture with the component budget: the reference
    of `demix validate` and the proxy of the training-based search (`search.method: trained`)."""
    return _train_on_mixture(config, data, base, "reference", out.name, mixture, out, on_checkpoint)


def load_for_eval(config: RunConfig, path: Path, device: torch.device | str):
    """A model folder loaded in fp32 for evaluation, with the config's loading options."""
    return load_model(
        path,
        device,
        torch.float32,
        config.model.trust_remote_code,
        config.model.attn_implementation,
    )


def make_evaluator(config: RunConfig, data: CuratedData, device: torch.device) -> Evaluator:
    """Evaluator over the configured tasks, built once."""
    data_dir = fetch_files(config.evaluate.data_dir) if config.evaluate.data_dir else None
    return Evaluator(
        config.evaluate, data.load_tokenizer(), str(device), data=data, eval_data_dir=data_dir
    )


def _model_id(folder: Path) -> str:
    return read_model_manifest(folder).get("fingerprint") or str(folder)


def merge_settings(config: RunConfig) -> dict:
    """The merge settings a merged proxy's scores depend on (not how merged models are saved)."""
    return config.merge.model_dump(exclude={"output_dtype", "shard_bytes"})


def score_key(config: RunConfig, data: CuratedData, base: Path, **what) -> str:
    """Fingerprint of everything a proxy's scores depend on besides its mixture.

    Stamped on every scores row; a resumed search refuses rows stamped differently (changed
    tasks, limits, merge settings or models) instead of mixing them. Settings that do not change
    scores (evaluation engine, batch size) are left out.
    """
    return fingerprint(
        evaluate=config.evaluate.model_dump(exclude={"engine", "batch_size"}),
        data=read_manifest(data.root).get("files"),
        base=_model_id(base),
        **what,
    )


class ProxyEvaluator:
    """Base + components loaded once; each call writes a proxy in place and evaluates it.

    `key` identifies what the scores depend on (see score_key).
    """

    def __init__(
        self,
        config: RunConfig,
        data: CuratedData,
        base: Path,
        components: dict[str, Path],
        evaluator: Evaluator | None = None,
    ):
        missing = sorted(set(data.names) - set(components))
        if missing:
            raise DemixError(f"no component model given for dataset(s) {missing}")
        comp_dirs = [Path(components[n]) for n in data.names]
        check_compatible(base, comp_dirs)
        device = resolve_device(config.train.device)
        self.config, self.data = config, data
        self.model = load_for_eval(config, base, device)
        self.model.eval()
        self.stack = DeltaStack(
            self.model,
            base,
            comp_dirs,
            merge_method(config),
            delta_dtype=getattr(torch, config.merge.delta_dtype),
        )
        self.evaluator = evaluator or make_evaluator(config, data, device)
        self.key = score_key(
            config,
            data,
            base,
            merge=merge_settings(config),
            general_ratio=config.train.general_ratio,
            components=[_model_id(d) for d in comp_dirs],
        )

    def __call__(self, mixture: np.ndarray) -> dict:
        self.stack.write(merge_weights(self.config, self.data, mixture))
        return self.evaluator.evaluate(self.model)


class TrainedProxyEvaluator:
    """The training-based baseline: each call trains a proxy model on the mixture from the base
    (component budget, kept under `folder` so a resumed search trains nothing again) and
    evaluates it. `tokens` counts the training tokens spent so far."""

    def __init__(
        self,
        config: RunConfig,
        data: CuratedData,
        base: Path,
        folder: Path,
        evaluator: Evaluator | None = None,
    ):
        self.config, self.data, self.base, self.folder = config, data, base, folder
        self.device = resolve_device(config.train.device)
        self.evaluator = evaluator or make_evaluator(config, data, self.device)
        self.key = score_key(
            config,
            data,
            base,
            trained=config.train.model_dump(
                exclude={"checkpoint_every", "log_every", "device", "micro_batch_size", "fsdp"}
            ),
            seed=config.seed,
            model=config.model.model_dump(),
        )

    def __call__(self, mixture: np.ndarray) -> dict:
        out = self._folder(mixture_id(mixture, self.config.search.sampler.grid))
        reference_stage(self.config, self.data, self.base, as_dict(self.data.names, mixture), out)
        model = load_for_eval(self.config, out, self.device)
        return self.evaluator.evaluate(model)

    def _folder(self, mixture_key: str) -> Path:
        return self.folder / f"proxy-{mixture_key}"

    def trained_tokens(self, ids: list[str]) -> int:
        """Training tokens of the proxies of mixtures `ids` (the rows of this search; other
        proxies left in the folder by an earlier search are not counted)."""
        return sum(int(read_model_manifest(self._folder(i)).get("tokens", 0)) for i in ids)


def scorer(config: RunConfig):
    """Task results of proxies -> their ranking scores (relative to each other)."""

    def score(results: list[dict]) -> list[float]:
        return [s["ranking_score"] for s in score_models(results, config.evaluate.categories)]

    return score


def _prior(data: CuratedData) -> np.ndarray:
    return np.array([data.token_prior[n] for n in data.names])


def propose_stage(
    config: RunConfig, data: CuratedData, rows: list[dict], round_index: int
) -> list[dict]:
    """Proposals of one search round from the rows scored so far."""
    if not 0 <= round_index < config.search.rounds:
        raise DemixError(f"round {round_index} is outside search.rounds={config.search.rounds}")
    return round_proposals(
        round_index, rows, data.names, _prior(data), config.search, config.seed, scorer(config)
    )


def evaluate_proxies_stage(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    components: dict[str, Path],
    proposals: list[dict],
    out: Path,
) -> list[dict]:
    """Build and evaluate each proposed proxy in memory; rows appended to the JSONL table `out`."""
    table = ScoresTable(out)
    if proposals and not {p["id"] for p in proposals} <= table.ids():
        if config.search.method == "trained":
            proxy = TrainedProxyEvaluator(config, data, base, out.parent / "proxies")
        else:
            proxy = ProxyEvaluator(config, data, base, components)
        evaluate_proposals(proposals, data.names, proxy, table, key=proxy.key)
    return table.rows()


def select_stage(
    config: RunConfig,
    data: CuratedData,
    rows: list[dict],
    relative_norms: dict[str, float] | None = None,
) -> dict:
    """The final mixture from every scored proxy, with what the report shows about it."""
    names = data.names
    found = final_selection(rows, names, _prior(data), config.search, config.seed, scorer(config))
    mixture = found["mixture"]
    return {
        "mixture": as_dict(names, mixture),
        "component_weights": as_dict(names, merge_weights(config, data, mixture)),
        "merge_weights": config.merge.weights,
        "mix_matrix": mix_matrix(config, data).round(6).tolist(),
        "relative_delta_norms": relative_norms,
        "rounds": found["rounds"],
        "proxies_evaluated": found["proxies_evaluated"],
        "predictor_spearman": found["predictor_spearman"],
        "predicted_score": found["predicted_score"],
        "history": found["history"],
    }


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
    out.mkdir(parents=True, exist_ok=True)
    if config.search.method == "trained":
        proxy = TrainedProxyEvaluator(config, data, base, out / "proxies", evaluator)
        norms = None
    else:
        proxy = ProxyEvaluator(config, data, base, components, evaluator)
        norms = as_dict(data.names, proxy.stack.relative_norms)
    table = ScoresTable(out / "scores.jsonl")
    for r in range(config.search.rounds):
        evaluate_proposals(
            propose_stage(config, data, table.rows(), r), data.names, proxy, table, key=proxy.key
        )
    result = select_stage(config, data, table.rows(), norms)
    result["search_method"] = config.search.method
    result["proxy_training_tokens"] = (
        proxy.trained_tokens([row["id"] for row in table.rows()])
        if isinstance(proxy, TrainedProxyEvaluator)
        else 0
    )
    atomic_write_json(out / "result.json", result)
    return result


def final_stage(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    label: str,
    mixture: dict[str, float],
    out: Path,
    on_checkpoint: CheckpointHook = None,
) -> Path:
    """Train a final model from the base on a data mixture (the chosen one or a baseline)."""
    return _train_on_mixture(config, data, base, "final", label, mixture, out, on_checkpoint)


def _train_on_mixture(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    role: str,
    name: str,
    mixture: dict[str, float],
    out: Path,
    on_checkpoint: CheckpointHook,
) -> Path:
    """Train `role` from the base on a data mixture (checked first); returns `out`."""
    mix = as_dict(data.names, validate_mixture(mixture, data.names))
    _train_role(config, data, mix, role, name, out, init=base, on_checkpoint=on_checkpoint)
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
        model = load_for_eval(config, path, device)
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


class StageClock:
    """Logs the start and end of named stages and keeps their wall times in `timings`."""

    def __init__(self, log=print) -> None:
        self.log, self.timings = log, {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        self.log(f"[demix] {stage} ...")
        yield
        self.timings[stage] = round(time.perf_counter() - start, 1)
        self.log(f"[demix] {stage} done in {self.timings[stage]:.1f} s")


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
    if config.data.fetch_demo:
        with timed("fetch"):
            fetch_demo(Path(config.data.fetch_demo))
    with timed("curate"):
        data = curate_stage(config, out / "dataset")
    with timed("base"):
        base = base_stage(config, data, out / "models" / "base")
    trained = {}
    with timed("components"):
        for name in data.names if components else []:
            trained[name] = component_stage(
                config, data, base, name, out / "models" / f"component-{name}"
            )
    return data, base, trained


def run(config: RunConfig, out: str | Path, log=print) -> dict:
    """Run every stage end to end into `out`; each stage resumes or is skipped when done."""
    out = start_run_folder(config, out)
    timed = StageClock(log)
    # the training-based search trains a model per proxy instead of components to merge
    data, base, components = prepare_models(
        config, out, timed, components=config.search.method == "merge"
    )
    device = resolve_device(config.train.device)
    evaluator = make_evaluator(config, data, device)
    with timed("search"):
        found = search_stage(config, data, base, components, out / "search", evaluator)
    finals = {}
    with timed("final"):
        for label in FINAL_LABELS:
            mixture = final_mixture(label, found, data)
            finals[label] = final_stage(
                config, data, base, label, mixture, out / "models" / f"final-{label}"
            )
        final_scores = evaluate_models(config, data, finals, evaluator)
    summary = summarize(config, data, found, final_scores, base, components, finals, timed.timings)
    write_outputs(out, summary, found, config)
    return summary


def final_mixture(label: str, selection: dict, data: CuratedData) -> dict[str, float]:
    """The data mixture of a final model: the chosen one or a baseline."""
    if label == "chosen":
        return selection["mixture"]
    baselines = baseline_mixtures(data)
    if label not in baselines:
        raise DemixError(f"final model label {label!r} is not one of {list(FINAL_LABELS)}")
    return baselines[label]


def summarize(
    config: RunConfig,
    data: CuratedData,
    selection: dict,
    final_scores: dict,
    base: Path,
    components: dict[str, Path],
    finals: dict[str, Path],
    timings: dict[str, float],
) -> dict:
    """The run's summary.json contract."""

    def tokens(path: Path) -> int:
        return int(read_model_manifest(path).get("tokens", 0))

    return {
        "datasets": data.names,
        "token_prior": dict(data.token_prior),
        "mixture": selection["mixture"],
        "component_weights": selection["component_weights"],
        "proxies_evaluated": selection["proxies_evaluated"],
        "search_rounds": selection["rounds"],
        "predictor_spearman": selection["predictor_spearman"],
        "relative_delta_norms": selection["relative_delta_norms"],
        "baselines": baseline_mixtures(data),
        "final": final_scores,
        "search_method": config.search.method,
        "training_tokens": {
            "base": 0 if config.model.base else tokens(base),
            "components": sum(tokens(p) for p in components.values()),
            "search_proxies": int(selection.get("proxy_training_tokens", 0)),
            "final": sum(tokens(p) for p in finals.values()),
        },
        "timings_s": timings,
    }


def write_outputs(out: Path, summary: dict, selection: dict, config: RunConfig) -> None:
    """summary.json and report.html into `out`."""
    from demix.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "summary.json", summary)
    write_report(out, summary, selection, config)


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
        method=merge_method(config),
        dtype=None if config.merge.output_dtype == "auto" else config.merge.output_dtype,
        shard_bytes=config.merge.shard_bytes,
        data_mixture=as_dict(data.names, weights),
        relative_delta_norms=relative_delta_norms(base, comp_dirs),
    )


# Steps of the KFP pipeline: each component calls exactly one of these.


def models_by_name(paths: list[str | Path]) -> dict[str, Path]:
    """Model artifact folders keyed by the `name` in their manifest (order-independent)."""
    out = {}
    for path in map(Path, paths):
        name = read_model_manifest(path).get("name")
        if not name:
            raise DemixError(
                f"{path}: model manifest has no name; was it written by `demix train`?"
            )
        out[name] = path
    return out


def launch_train(
    config: RunConfig, argv: list[str], out: Path, processes: int, cluster: str = ""
) -> dict:
    """`demix train CONFIG <argv> --out OUT` under `accelerate launch` with `processes` processes
    (per machine), on this machine or (`cluster`: vertex_worker_pools JSON) on the machines of
    a Vertex AI custom job; returns the model's manifest. The config travels as `<out>.launch.yaml`.
    """
    from demix.config import config_yaml
    from demix.distributed import run_launched, run_vertex_job

    pools = json.loads(cluster)["worker_pool_specs"] if cluster else [{"replica_count": 1}]
    nodes = sum(pool["replica_count"] for pool in pools)
    config.train.accumulation(processes * nodes)  # a global batch that does not split: now
    path = out.with_name(out.name + ".launch.yaml")
    atomic_write_text(path, config_yaml(config))
    command = ["train", str(path), *argv, "--out", str(out)]
    if cluster:
        run_vertex_job(cluster, command, processes, out)
    else:
        run_launched(command, processes)
    path.unlink()
    return read_model_manifest(out)


def train_step(
    config: RunConfig,
    data_dir: Path,
    role: str,
    name: str,
    init: Path | None,
    out: Path,
    processes: int = 1,
    cluster: str = "",
) -> dict:
    """Train the base (role "base") or one component (role "component", name = dataset).

    With processes > 1 (GPUs of the machine) or a `cluster` of machines, the training runs in
    that many processes (see launch_train); otherwise in this one.
    """
    if role not in ("base", "component"):
        raise DemixError(
            f"train role {role!r} is not base or component (final models use train_final)"
        )
    if role == "component" and init is None:
        raise DemixError("role 'component' needs the base model as `init`")
    if processes > 1 or cluster:
        argv = ["--role", role, "--data", str(data_dir)]
        argv += ["--init", str(init), "--dataset", name] if role == "component" else []
        return launch_train(config, argv, out, processes, cluster)
    data = CuratedData(data_dir)
    if role == "base":
        base_stage(config, data, out)
    else:
        component_stage(config, data, init, name, out)
    return read_model_manifest(out)


def merge_step(
    config: RunConfig,
    data_dir: Path,
    base: Path,
    components: list[Path],
    selection: Path,
    out: Path,
) -> dict:
    """Check the components, measure ||theta_i - base|| / ||base||, write the chosen mixture's merge."""
    data = CuratedData(data_dir)
    by_name = models_by_name(components)
    chosen = json.loads(Path(selection).read_text())["mixture"]
    manifest = materialize_merge(config, data, base, by_name, chosen, out)
    norms = dict(zip(data.names, manifest["relative_delta_norms"], strict=True))
    large = {n: round(v, 4) for n, v in norms.items() if v > SMALL_UPDATE}
    if large:
        log.warning(
            "components moved far from the base (||delta||/||base|| > %s): %s; merged proxies "
            "may not track trained models",
            SMALL_UPDATE,
            large,
        )
    return {"relative_delta_norms": norms, "large_updates": sorted(large)}


def evaluate_proxies_step(
    config: RunConfig,
    data_dir: Path,
    base: Path,
    component_index: Path,
    proposals: Path,
    shard: int,
    num_shards: int,
    out: Path,
) -> list[dict]:
    """Evaluate shard `shard` of `num_shards` of a round's proposals; rows written to `out`."""
    data = CuratedData(data_dir)
    mine = json.loads(Path(proposals).read_text())[shard::num_shards]
    return evaluate_proxies_stage(config, data, base, read_model_index(component_index), mine, out)


def predict_step(
    config: RunConfig,
    data_dir: Path,
    history: Path | None,
    scores: list[Path],
    round_index: int | None,
    history_out: Path,
    result_out: Path,
) -> dict:
    """Fold new scores into the history, then propose round `round_index` or (None) select.

    Writes the accumulated rows to `history_out` and the proposals (a JSON list) or the
    selection (a JSON object) to `result_out`; returns metrics for the KFP UI.
    """
    data = CuratedData(data_dir)
    rows = ScoresTable(history).rows() if history else []
    for path in scores:
        rows += ScoresTable(path).rows()
    rows.sort(key=lambda row: (row["round"], row["id"]))
    # Written whole, not appended: a retried task gives the same file, not duplicated rows.
    atomic_write_text(history_out, "".join(json.dumps(row) + "\n" for row in rows))
    metrics: dict = {"proxies_scored": len(rows)}
    if round_index is None:
        result = select_stage(config, data, rows)
        metrics.update(
            predictor_spearman=result["predictor_spearman"],
            predicted_score=result["predicted_score"],
        )
    else:
        result = propose_stage(config, data, rows, round_index)
        metrics["proposals"] = len(result)
    if rows:
        best = max(
            zip(scorer(config)([row["tasks"] for row in rows]), rows, strict=True),
            key=lambda t: t[0],
        )
        metrics["best_ranking_score"] = best[0]
    atomic_write_json(result_out, result)
    return metrics


def final_step(
    config: RunConfig,
    data_dir: Path,
    base: Path,
    selection: Path,
    label: str,
    out: Path,
    processes: int = 1,
    cluster: str = "",
) -> dict:
    """Train the final model `label` (chosen | uniform | token_prior) from the base, in
    `processes` processes (or on a `cluster` of machines) as train_step."""
    data = CuratedData(data_dir)
    mixture = final_mixture(label, json.loads(Path(selection).read_text()), data)
    if processes > 1 or cluster:
        argv = ["--role", "final", "--name", label, "--data", str(data_dir), "--init", str(base)]
        return launch_train(
            config, [*argv, "--mixture", json.dumps(mixture)], out, processes, cluster
        )
    final_stage(config, data, base, label, mixture, out)
    return read_model_manifest(out)


def evaluate_final_step(
    config: RunConfig,
    data_dir: Path,
    base: Path,
    components: list[Path],
    finals: list[Path],
    selection: Path,
    out: Path,
) -> dict:
    """Evaluate the final models, write summary.json and report.html into `out`; return the summary."""
    data = CuratedData(data_dir)
    by_label = models_by_name(finals)
    chosen = json.loads(Path(selection).read_text())
    comps = models_by_name(components)
    if chosen.get("relative_delta_norms") is None:
        chosen["relative_delta_norms"] = as_dict(
            data.names, relative_delta_norms(base, [comps[n] for n in data.names])
        )
    scores = evaluate_models(config, data, {label: by_label[label] for label in FINAL_LABELS})

    def seconds(paths) -> float:
        return round(sum(read_model_manifest(p).get("seconds", 0.0) for p in paths), 1)

    timings = {
        "curate": data.manifest.get("seconds", 0.0),
        "base": 0.0 if config.model.base else seconds([base]),
        "components": seconds(comps.values()),
        "search": round(sum(row.get("time_s", 0.0) for row in chosen["history"]), 1),
        "final": seconds(by_label.values()),
    }
    summary = summarize(config, data, chosen, scores, base, comps, by_label, timings)
    write_outputs(out, summary, chosen, config)
    return summary


def write_model_index(models: list[Path], out: Path) -> dict[str, str]:
    """{name: absolute path} of model artifacts, as JSON (read back by `read_model_index`)."""
    index = {name: str(Path(path).resolve()) for name, path in models_by_name(models).items()}
    atomic_write_json(out, index)
    return index


def read_model_index(path: Path) -> dict[str, Path]:
    """The {name: path} written by `write_model_index`, each a complete model artifact.

    Raises DemixError when an indexed model is missing or incomplete.
    """
    index = {name: Path(p) for name, p in json.loads(Path(path).read_text()).items()}
    for name, folder in index.items():
        if not (folder / "manifest.json").is_file():
            raise DemixError(f"{path}: model {name!r} at {folder} is missing or incomplete")
    return index
