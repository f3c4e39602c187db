"""Search stages: the whole loop (`search_stage`), or one round of it as the pipeline runs it
(propose and select in `predict_stage`), and the selection's description."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from demix import search
from demix.config import RunConfig
from demix.data.shards import CuratedData
from demix.errors import DemixError
from demix.mixtures import HULL_TOLERANCE, as_dict, negative_share
from demix.stages.memory import config_search_plan
from demix.stages.proxies import TrainedProxyEvaluator, make_proxy
from demix.stages.values import Run, run_mixing, run_search_space
from demix.storage import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from demix.evaluate import Evaluator

log = logging.getLogger(__name__)


def describe_selection(
    config: RunConfig, data: CuratedData, found: dict, norms: dict[str, float] | None
) -> dict:
    """The search's result.json: the chosen mixture with what the report shows about it.

    min_component_weight: the chosen mixture's smallest component weight (< 0: its proxy
    extrapolates, logged as a warning for merged proxies); pool_negative_share: the share of
    the final candidate pool with some component weight < 0, under merge.weights.
    """
    mixture = found["mixture"]
    mixing = run_mixing(config, data)
    components = mixing.merge_weights(mixture)
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
        "pool_negative_share": negative_share(mixing.merge_weights(found["pool"])),
        "merge_weights": config.merge.weights,
        "mix_matrix": mixing.matrix.round(6).tolist(),
        "relative_delta_norms": norms,
        "rounds": found["rounds"],
        "proxies_evaluated": found["proxies_evaluated"],
        "predictor_spearman": found["predictor_spearman"],
        "predictor": found.get("predictor"),
        "predicted_score": found["predicted_score"],
        "history": found["history"],
    }


def search_stage(run: Run, out: Path, evaluator: Evaluator | None = None) -> dict:
    """The whole search (demix.search.run_search) into `out`: scores.jsonl, then result.json.

    Resumes from an existing scores table: proxies already scored are not evaluated again.
    Raises ConfigError, before `out` is made, when the candidate pool's memory plan
    (demix.memory_plans) exceeds the host's available memory.
    """
    config, data = run.config, run.data
    config_search_plan(config).check()
    out.mkdir(parents=True, exist_ok=True)
    proxy = make_proxy(run, out, evaluator)
    table = search.ScoresTable(out / "scores.jsonl")
    space = run_search_space(config, data)
    found = search.run_search(
        space.names,
        space.prior,
        config.search,
        config.seed,
        proxy,
        search.search_objective(config.search, config.evaluate),
        table,
        key=proxy.key,
        floor=space.floor,
        cap=space.cap,
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
    space = run_search_space(config, data)
    objective = search.search_objective(config.search, config.evaluate)
    return search.round_proposals(
        round_index,
        rows,
        space.names,
        space.prior,
        config.search,
        config.seed,
        objective,
        space.floor,
        space.cap,
    )


def select_stage(config: RunConfig, data: CuratedData, rows: list[dict]) -> dict:
    """The final mixture from every scored proxy (run_search's last step), as result.json."""
    space = run_search_space(config, data)
    objective = search.search_objective(config.search, config.evaluate)
    found = search.final_selection(
        rows,
        space.names,
        space.prior,
        config.search,
        config.seed,
        objective,
        space.floor,
        space.cap,
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
    or, with None, the selection (a JSON object) into `result_out`; returns metrics.
    Raises ConfigError when the candidate pool's memory plan exceeds the host's memory."""
    config_search_plan(config).check()
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
        objective = search.search_objective(config.search, config.evaluate)
        metrics["best_observed"] = float(max(objective.observed([row["tasks"] for row in rows])))
    atomic_write_json(result_out, result)
    return metrics
