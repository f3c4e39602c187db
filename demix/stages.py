"""The DeMix stages: one function per stage, over artifact folders.

Each stage reads its inputs (curated dataset, model folders, JSON tables), writes one artifact
folder or file (manifest last) and returns what it made. The recipes (`demix run`, validate,
reproduce) and the KFP components call these same functions, so a stage behaves the same in a
local run and in a pipeline task; neither adds logic of its own. (Over 400 lines as one
coherent thing: the list of stages a reader looks up in one place.)

    curation     curate | plan_curation_stage -> curate_group_stage -> merge_curation_stage
    training     train_stage (base, component, reference, final; 1 or N processes)
    search       search_stage (the loop) | propose/select in predict_stage + evaluate_proxies_stage
    merge        merge_stage (the chosen mixture's merged model on disk)
    finals       evaluate_models_stage, evaluate_finals_stage (scores, summary.json, report)
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from demix import evaluate, merge, search, train
from demix.base_model import base_tokenizer_dir, resolve_base, write_base_artifact
from demix.checkpoint import (
    MODEL_KIND,
    RELATIVE_DELTA_NORM,
    check_compatible,
    read_model_manifest,
)
from demix.config import RunConfig
from demix.data.curate import curate, curate_group, input_files, merge_groups, plan_curation
from demix.data.demo import fetch_demo
from demix.data.shards import CuratedData
from demix.errors import DemixError
from demix.mixtures import (
    HULL_TOLERANCE,
    as_dict,
    component_training_mix,
    components_in_order,
    final_run_names,
    merge_weights,
    mix_matrix,
    negative_share,
    prior_vector,
    search_cap,
    search_floor,
    split_seed,
)
from demix.report.summary import stage_timings, summarize, write_document_scores, write_summary
from demix.search.sampler import validate_mixture
from demix.storage import (
    atomic_write_json,
    atomic_write_text,
    checkpoint_sync,
    discard_checkpoint,
    fetch_artifact,
    fetch_manifest,
)
from demix.train.job import fingerprint
from demix.train.launch import launch_argv, launch_train
from demix.verdict import final_verdict

if TYPE_CHECKING:
    from demix.evaluate import Evaluator
    from demix.train import CheckpointHook

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------- curation


def fetch_configured_demo(config: RunConfig) -> None:
    """Fetch the embedded demo corpus when the config asks for it (cached after the first time)."""
    if config.data.fetch_demo:
        fetch_demo(Path(config.data.fetch_demo))


def base_model_dir(config: RunConfig) -> Path | None:
    """The local folder of `model.base` (a gs:// folder or hub id fetched once, every form
    verified once: demix.base_model), or None."""
    if not config.model.base:
        return None
    return resolve_base(config.model.base, config.model.trust_remote_code).folder


def curation_fingerprint(config: RunConfig, tokenizer_dir: Path | None) -> str:
    """Hash of what curation reads: the data settings (not the grouping, which does not change
    the result), the seed, the base tokenizer and each input file's path, size and stamp."""
    inputs = [(f.uri, f.size, f.stamp) for spec in config.data.all_specs for f in input_files(spec)]
    # Keys added later count only when set, so curations made before they existed stay valid.
    unset = {
        key
        for key, empty in (("max_tokens", None), ("targets", []), ("min_heldout_documents", 1))
        if getattr(config.data, key) == empty
    }
    data = config.data.model_dump(exclude={"curate_groups", *unset})
    for spec in (*data["datasets"], *data.get("targets", [])):
        if not spec["where"]:
            del spec["where"]
    return fingerprint(
        data=data,
        seed=config.seed,
        tokenizer=str(tokenizer_dir),
        inputs=inputs,
    )


def curate_stage(config: RunConfig, out: Path) -> CuratedData:
    """Curate the candidate datasets into `out` (plan, data.curate_groups groups and their merge,
    in this process); skipped when `out` holds this curation already.

    Dataset paths and `model.base` may be gs:// URIs (each file fetched when it is read).
    """
    fetch_configured_demo(config)
    tokenizer_dir = base_tokenizer_dir(config.model.base, config.model.trust_remote_code)
    fp = curation_fingerprint(config, tokenizer_dir)
    if (out / "manifest.json").is_file() and CuratedData(out).manifest.get("fingerprint") == fp:
        return CuratedData(out)
    curate(config.data, out, config.seed, tokenizer_dir=tokenizer_dir, fingerprint=fp)
    return CuratedData(out)


def plan_curation_stage(config: RunConfig, out: Path) -> list[int]:
    """Curation's plan (input files in groups, the tokenizer) into `out`; returns the group ids."""
    fetch_configured_demo(config)
    tokenizer_dir = base_tokenizer_dir(config.model.base, config.model.trust_remote_code)
    fp = curation_fingerprint(config, tokenizer_dir)
    plan = plan_curation(config.data, out, config.seed, tokenizer_dir, fingerprint=fp)
    return list(range(len(plan["groups"])))


def curate_group_stage(plan: Path, group: int, out: Path) -> dict:
    """Curate one group of the plan into `out`; returns the group's manifest."""
    return curate_group(plan, group, out)


def merge_curation_stage(plan: Path, groups: list[Path], out: Path) -> CuratedData:
    """Merge the curated groups into the dataset artifact `out`."""
    merge_groups(plan, groups, out)
    return CuratedData(out)


# ----------------------------------------------------------------------------------- training


def train_stage(
    config: RunConfig,
    data: CuratedData,
    role: str,
    out: Path,
    name: str = "",
    init: Path | None = None,
    mixture: dict[str, float] | None = None,
    processes: int = 1,
    cluster: str = "",
    on_checkpoint: CheckpointHook = None,
    uri: str = "",
    jobs_root: str = "",
) -> Path:
    """Train one model into `out` and return its folder (the base: `model.base` when set,
    copied into `out` as a model artifact when `out` is published, demix.base_model).

    role base: from a fresh model on the token prior; component: from `init` on its dataset
    `name`'s training mix; control: from `init` on the token prior (demix.train.roles);
    reference / final: from `init` on `mixture` (a name ending in
    `-seed<s>` trains with the run seed + s: demix.mixtures.seeded_names). With processes > 1 (GPUs
    of the machine) or a `cluster` (Vertex AI worker pools JSON) the loop runs under
    `accelerate launch` in that many processes (demix.train.launch).
    `uri`: where `out` is published (a pipeline task's `model.uri`). When it is gs://, each
    checkpoint is published to `<uri>.ckpt` as it is written, training resumes from the newest
    one there (a task rerun in an empty pod continues), and it is deleted once the model is done.
    `jobs_root` (a pipeline's root): a model an earlier run trained for the same job (same data
    read, mixture, settings, seed and init, by content: demix.train.reuse) is copied into `out`
    instead of training, and a model trained here is recorded there for later runs.
    Raises DemixError for a role without what it needs, MixtureError for a bad mixture,
    DataError when the bucket cannot be read or written.
    """
    if role not in train.ROLES:
        raise DemixError(f"training role {role!r} is not one of {list(train.ROLES)}")
    if role == "base" and config.model.base:  # published (`uri`): a verified copy in `out`
        if uri:
            write_base_artifact(config.model.base, out, config.model.trust_remote_code)
            return out
        return base_model_dir(config)
    if role != "base" and init is None:
        raise DemixError(f"role {role!r} trains from the base: give the base model as `init`")
    if role in ("reference", "final") and mixture is None:
        raise DemixError(f"role {role!r} needs a data mixture")
    if role == "component":
        mixture = component_training_mix(config, data, name)
    elif role in ("base", "control"):  # the control: a decay branch on the token prior
        mixture = dict(data.token_prior)
    job_id = ""
    if jobs_root:
        job_id = train.role_job_id(_seeded(config, role, name), data, mixture, role, name, init)
        if train.reuse_finished(jobs_root, job_id, out) is not None:
            return out
    _train(config, data, role, out, name, init, mixture, processes, cluster, on_checkpoint, uri)
    if jobs_root:
        train.record_finished(jobs_root, job_id, uri or str(out), role, name or role)
    return out


def _seeded(config: RunConfig, role: str, name: str) -> RunConfig:
    """The config a reference or final run trains with: a `-seed<s>` name adds s to the seed."""
    if role in ("reference", "final") and split_seed(name)[1]:  # a further training seed
        return config.model_copy(update={"seed": config.seed + split_seed(name)[1]})
    return config


def _train(
    config: RunConfig,
    data: CuratedData,
    role: str,
    out: Path,
    name: str,
    init: Path | None,
    mixture: dict[str, float],
    processes: int,
    cluster: str,
    on_checkpoint: CheckpointHook,
    uri: str,
) -> None:
    """train_stage's training, in this process or launched in several."""
    if processes > 1 or cluster:
        argv = launch_argv(
            role, name, data.root, init, mixture if role in ("reference", "final") else None
        )
        launch_train(config, argv, out, processes, cluster, publish_uri=uri)
        return
    config = _seeded(config, role, name)
    publish = checkpoint_sync(uri, out.with_name(out.name + ".ckpt")) if uri else None
    hook = _both(on_checkpoint, publish)
    if role in ("reference", "final"):
        train.train_on_mixture(config, data, init, role, name, mixture, out, hook)
    else:
        train.train_role(
            config, data, mixture, role, name or role, out, init=init, on_checkpoint=hook
        )
    if role == "component":  # its norm in its manifest: readers need no weights (finals)
        merge.record_relative_delta_norm(out, init)
    if publish is not None:
        discard_checkpoint(uri)


def _both(first: CheckpointHook, second: CheckpointHook) -> CheckpointHook:
    """A checkpoint hook calling `first` then `second` (either may be None)."""
    if first is None or second is None:
        return first or second

    def hook(folder: Path) -> None:
        first(folder)
        second(folder)

    return hook


def train_components(
    config: RunConfig, data: CuratedData, base: Path, folder: Path
) -> dict[str, Path]:
    """One component per dataset from the base, into `folder`/component-<name>."""
    return {
        name: train_stage(config, data, "component", folder / f"component-{name}", name, base)
        for name in data.names
    }


# ------------------------------------------------------------------------------------- search


def describe_selection(
    config: RunConfig, data: CuratedData, found: dict, norms: dict[str, float] | None
) -> dict:
    """The search's result.json: the chosen mixture with what the report shows about it.

    min_component_weight: the chosen mixture's smallest component weight (< 0: its proxy
    extrapolates, logged as a warning for merged proxies); pool_negative_share: the share of
    the final candidate pool with some component weight < 0, under merge.weights.
    """
    mixture = found["mixture"]
    components = merge_weights(config, data, mixture)
    lowest = float(components.min())
    if lowest < -HULL_TOLERANCE and config.search.method == "merge":
        log.warning(
            "the chosen mixture's proxy extrapolates beyond the trained components (min "
            "component weight %.4f); consider merge.weights: hull",
            lowest,
        )
    return {
        "mixture": as_dict(data.names, mixture),
        "component_weights": as_dict(data.names, components),
        "min_component_weight": lowest,
        "pool_negative_share": negative_share(merge_weights(config, data, found["pool"])),
        "merge_weights": config.merge.weights,
        "mix_matrix": mix_matrix(config, data).round(6).tolist(),
        "relative_delta_norms": norms,
        "rounds": found["rounds"],
        "proxies_evaluated": found["proxies_evaluated"],
        "predictor_spearman": found["predictor_spearman"],
        "predictor": found.get("predictor"),
        "predicted_score": found["predicted_score"],
        "history": found["history"],
    }


def make_proxy(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    components: dict[str, Path],
    folder: Path,
    evaluator: Evaluator | None = None,
):
    """The proxy evaluator of `search.method`: merged (components) or trained (under `folder`)."""
    from demix.proxies import ProxyEvaluator, TrainedProxyEvaluator  # torch: on first use

    if config.search.method == "trained":
        return TrainedProxyEvaluator(config, data, base, folder / "proxies", evaluator)
    return ProxyEvaluator(config, data, base, components, evaluator)


def search_stage(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    components: dict[str, Path],
    out: Path,
    evaluator: Evaluator | None = None,
) -> dict:
    """The whole search (demix.search.run_search) into `out`: scores.jsonl, then result.json.

    Resumes from an existing scores table: proxies already scored are not evaluated again.
    """
    from demix.proxies import TrainedProxyEvaluator

    out.mkdir(parents=True, exist_ok=True)
    proxy = make_proxy(config, data, base, components, out, evaluator)
    table = search.ScoresTable(out / "scores.jsonl")
    found = search.run_search(
        data.names,
        prior_vector(data),
        config.search,
        config.seed,
        proxy,
        search.search_objective(config),
        table,
        key=proxy.key,
        floor=search_floor(config, data),
        cap=search_cap(config, data),
    )
    trained = isinstance(proxy, TrainedProxyEvaluator)
    result = describe_selection(config, data, found, None if trained else proxy.relative_norms)
    result["search_method"] = config.search.method
    ids = [row["id"] for row in table.rows()]
    result["proxy_training_tokens"] = proxy.trained_tokens(ids) if trained else 0
    atomic_write_json(out / "result.json", result)
    return result


def propose_stage(
    config: RunConfig, data: CuratedData, rows: list[dict], round_index: int
) -> list[dict]:
    """Proposals of search round `round_index` from the rows scored so far (run_search's step).

    Raises DemixError for a round outside search.rounds.
    """
    if not 0 <= round_index < config.search.rounds:
        raise DemixError(f"round {round_index} is outside search.rounds={config.search.rounds}")
    return search.round_proposals(
        round_index,
        rows,
        data.names,
        prior_vector(data),
        config.search,
        config.seed,
        search.search_objective(config),
        search_floor(config, data),
        search_cap(config, data),
    )


def select_stage(config: RunConfig, data: CuratedData, rows: list[dict]) -> dict:
    """The final mixture from every scored proxy (run_search's last step), as result.json."""
    found = search.final_selection(
        rows,
        data.names,
        prior_vector(data),
        config.search,
        config.seed,
        search.search_objective(config),
        search_floor(config, data),
        search_cap(config, data),
    )
    return describe_selection(config, data, found, None)


def predict_stage(
    config: RunConfig,
    data: CuratedData,
    history: Path | None,
    scores: list[Path],
    round_index: int | None,
    history_out: Path,
    result_out: Path,
) -> dict:
    """A search round between evaluations, as the pipeline runs it: the scores so far (history
    plus the new shards) into `history_out`, then round `round_index`'s proposals (a JSON list)
    or, with None, the selection (a JSON object) into `result_out`; returns metrics."""
    rows = search.ScoresTable(history).rows() if history else []
    for path in scores:
        rows += search.ScoresTable(path).rows()
    rows = search.canonical_rows(rows)
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
        metrics["best_observed"] = float(
            max(search.search_objective(config).observed([row["tasks"] for row in rows]))
        )
    atomic_write_json(result_out, result)
    return metrics


def evaluate_proxies_stage(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    components: dict[str, Path],
    proposals: list[dict],
    out: Path,
) -> list[dict]:
    """Build and evaluate each proposed proxy; rows appended to the JSONL table `out`."""
    table = search.ScoresTable(out)
    if proposals and not {p["id"] for p in proposals} <= table.ids():
        proxy = make_proxy(config, data, base, components, out.parent)
        search.evaluate_proposals(proposals, data.names, proxy, table, key=proxy.key)
    return table.rows()


# -------------------------------------------------------------------------------------- merge


def merge_stage(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    components: dict[str, Path],
    mixture: dict[str, float],
    out: Path,
) -> dict:
    """Write the merged model of a data mixture to `out`; returns its manifest, with the
    relative delta norms by dataset name and the components that moved far from the base
    (`large_updates`, also logged as a warning).

    Raises MixtureError for a bad mixture, DemixError/ModelError for missing or mismatched models.
    """
    from demix.proxies import merge_method, warn_large_updates

    weights = validate_mixture(mixture, data.names)
    comp_dirs = components_in_order(data, components)
    check_compatible(base, comp_dirs)
    norms = merge.relative_delta_norms(base, comp_dirs)
    manifest = merge.merge_to_disk(
        base,
        comp_dirs,
        merge_weights(config, data, weights),
        out,
        method=merge_method(config),
        dtype=None if config.merge.output_dtype == "auto" else config.merge.output_dtype,
        shard_bytes=config.merge.shard_bytes,
        data_mixture=as_dict(data.names, weights),
        relative_delta_norms=norms,
    )
    by_name = as_dict(data.names, norms)
    large = warn_large_updates(by_name)
    return {**manifest, "relative_delta_norms": by_name, "large_updates": sorted(large)}


# ------------------------------------------------------------------------------------- finals


def evaluate_each(
    config: RunConfig,
    data: CuratedData,
    models: dict[str, Path],
    evaluator: Evaluator | None = None,
) -> dict[str, dict]:
    """Each model's task results (with per-document scores), by name."""
    from demix.model import resolve_device
    from demix.proxies import load_for_eval, make_evaluator

    device = resolve_device(config.train.device)
    evaluator = evaluator or make_evaluator(config, data, device)
    results = {}
    for name, path in models.items():
        model = load_for_eval(config, path, device)
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


def finals_by_label(names: list[str], results: dict[str, dict]) -> dict[str, list[dict]]:
    """Final models' results grouped by label, one per seed in seed order."""
    grouped: dict[str, dict[int, dict]] = {}
    for name in names:
        label, seed = split_seed(name)
        grouped.setdefault(label, {})[seed] = results[name]
    return {label: [runs[s] for s in sorted(runs)] for label, runs in grouped.items()}


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
    config: RunConfig,
    data: CuratedData,
    base: Path,
    components: dict[str, dict],
    finals: dict[str, Path],
    selection: dict,
    out: Path,
    evaluator: Evaluator | None = None,
) -> dict:
    """Evaluate the final models (every label and seed), judge the chosen mixture against the
    baselines, write final_scores.json (per-document scores), summary.json and report.html
    into `out`; return the summary (the same for `demix run` and the pipeline).

    `components`: the component models' manifests by name (their weights are not needed); a
    selection without relative delta norms takes them from there.
    Raises DemixError when a final model of the configured labels and seeds is missing, or a
    component manifest has no relative delta norm where one is needed.
    """
    names = final_run_names(config.final.seeds)
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
    results = finals_by_label(names, evaluate_each(config, data, finals, evaluator))
    verdict = judge_finals(config, results)
    seconds = time.perf_counter() - start
    write_document_scores(out / "final_scores.json", results)
    timings = stage_timings(config, data, selection, base, components, finals, seconds)
    summary = summarize(
        config, data, selection, results, verdict, base, components, finals, timings
    )
    write_summary(out, summary, selection, config)
    return summary


# --------------------------------------------------------------------- artifacts of the pipeline


def models_by_name(paths: list[str | Path]) -> dict[str, Path]:
    """Model artifact folders keyed by the `name` in their manifest (order-independent).

    Raises DemixError for a folder whose manifest names no model.
    """
    out = {}
    for path in map(Path, paths):
        name = read_model_manifest(path).get("name")
        if not name:
            raise DemixError(
                f"{path}: model manifest has no name; was it written by `demix train`?"
            )
        out[name] = path
    return out


def write_model_index(models: list[tuple[str | Path, str]], out: Path) -> dict[str, str]:
    """{name: artifact URI} of model artifacts as JSON, from (local folder, URI) pairs.

    The URI (a pipeline artifact's `.uri`: gs:// on Kubeflow and Vertex, a local path under
    kfp.local), never the local folder, is what another task can open: on Kubeflow a task's
    local paths do not exist in any other pod. Read back with `read_model_index`.
    Raises DemixError for a folder whose manifest names no model.
    """
    uris = {str(Path(folder)): uri for folder, uri in models}
    index = {name: uris[str(path)] for name, path in models_by_name(list(uris)).items()}
    atomic_write_json(out, index)
    return index


def read_component_manifests(index: Path, base: Path) -> dict[str, dict]:
    """The manifests of the models of a `write_model_index` file, by name, each read alone
    through demix.storage (no weights fetched). A model trained before relative delta norms
    were recorded at training time is fetched once and measured against `base`.

    Raises DemixError naming the index and the model when a manifest is missing or corrupt.
    """
    manifests = {}
    for name, uri in json.loads(Path(index).read_text()).items():
        try:
            manifest = fetch_manifest(uri, MODEL_KIND)
            if manifest.get(RELATIVE_DELTA_NORM) is None:
                log.warning("component %s has no relative delta norm recorded: measured", name)
                folder = fetch_artifact(uri, MODEL_KIND)
                norm = merge.relative_delta_norms(base, [folder])[0]
                manifest = {**manifest, RELATIVE_DELTA_NORM: norm}
        except DemixError as err:
            raise DemixError(f"{index}: model {name!r}: {err}") from None
        manifests[name] = manifest
    return manifests


def index_entry(folder: Path, uri: str) -> str:
    """A trained model's entry of the model index, {"name", "uri"} as JSON (a training task's
    output parameter, so the index is built without moving any weights).

    Raises DemixError for a folder whose manifest names no model.
    """
    return json.dumps({"name": next(iter(models_by_name([folder]))), "uri": str(uri)})


def write_index_entries(entries: list[str | dict], out: Path) -> dict[str, str]:
    """The model index {name: artifact URI} from index entries (index_entry's, as JSON text or
    parsed) into `out`, as write_model_index writes it from folders.

    Raises DemixError for an entry without a name or URI, or a name given twice.
    """
    index: dict[str, str] = {}
    for entry in entries:
        item = json.loads(entry) if isinstance(entry, str) else entry
        if not isinstance(item, dict) or not item.get("name") or not item.get("uri"):
            raise DemixError(f"model index entry {entry!r} has no name or uri")
        if item["name"] in index:
            raise DemixError(f"model index: {item['name']!r} is given twice")
        index[item["name"]] = item["uri"]
    atomic_write_json(out, index)
    return index


def read_model_index(path: Path) -> dict[str, Path]:
    """The models of a `write_model_index` file as local folders, each fetched by its URI
    through demix.storage (gs:// downloaded into the cache) and verified against its manifest.

    Raises DemixError naming the index and the model when one is missing, incomplete or corrupt.
    """
    index = json.loads(Path(path).read_text())
    folders = {}
    for name, uri in index.items():
        try:
            folders[name] = fetch_artifact(uri, MODEL_KIND)
        except DemixError as err:
            raise DemixError(f"{path}: model {name!r}: {err}") from None
    return folders
