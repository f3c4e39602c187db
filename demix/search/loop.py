"""The search over rounds, as two pure steps (propose a round, select the final mixture) and the
one resumable loop over them, `run_search`. `demix run`, `demix search`, validate and reproduce
run the loop; the KFP pipeline unrolls it into tasks that call the same two steps (a `predict`
task per round) with the evaluation in between.

Both steps see the scored rows as a set: duplicates (same id) are dropped and the rest sorted
by (round, id) before fitting, so rows merged from parallel evaluation shards in any order give
the same proposals and the same final mixture as a sequential run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from demix.config import SearchConfig
from demix.errors import SearchError
from demix.progress import progress
from demix.search.objective import Objective
from demix.search.results import ScoresTable, mixture_id
from demix.search.rounds import propose_round, select_final

log = logging.getLogger(__name__)


def weights_matrix(rows: list[dict], names: list[str]) -> np.ndarray:
    """Rows' data mixtures as an [n, D] array in `names` order.

    Raises SearchError for a row without a weight for one of `names`.
    """
    out = np.zeros((len(rows), len(names)))
    for i, row in enumerate(rows):
        missing = [n for n in names if n not in row.get("weights", {})]
        if missing:
            raise SearchError(
                f"scored row {row.get('id')!r} has no weight for {missing}: it was written for "
                f"other datasets; use a fresh search folder"
            )
        out[i] = [row["weights"][n] for n in names]
    return out


def unique_rows(rows: list[dict]) -> list[dict]:
    """Rows with duplicate ids dropped (the first kept), in the given order."""
    unique: dict[str, dict] = {}
    for row in rows:
        unique.setdefault(row["id"], row)
    return list(unique.values())


def canonical_rows(rows: list[dict]) -> list[dict]:
    """Rows with duplicate ids dropped (the first kept), sorted by (round, id)."""
    return sorted(unique_rows(rows), key=lambda row: (row["round"], row["id"]))


def _targets(rows: list[dict], objective: Objective) -> np.ndarray:
    """The rows' regression targets [n, k] under the objective."""
    return objective.targets([row["tasks"] for row in rows])


def round_proposals(
    round_index: int,
    rows: list[dict],
    names: list[str],
    prior: np.ndarray,
    cfg: SearchConfig,
    seed: int,
    objective: Objective,
    floor: np.ndarray | None = None,
    cap: np.ndarray | None = None,
) -> list[dict]:
    """Proposals {"id", "round", "weights"} of a round, from the rows scored in earlier rounds.

    Targets are relative to all proxies so far, so `objective` recomputes them from the rows'
    task results. Every mixture lies above `floor` and under `cap` (see sample_mixtures; None:
    the whole simplex). Depends only on (seed, round, floor, cap, the set of earlier rows): a
    rerun proposes the same. Raises MixtureError when the grid runs out of unscored mixtures.
    """
    earlier = canonical_rows([row for row in rows if row["round"] < round_index])
    size = cfg.round_sizes[round_index]
    proposals = propose_round(
        round_index,
        size,
        prior,
        weights_matrix(earlier, names),
        _targets(earlier, objective),
        cfg,
        seed,
        objective.combine,
        floor,
        cap,
    )
    return [
        {
            "id": mixture_id(w, cfg.sampler.grid),
            "round": round_index,
            "weights": dict(zip(names, w.tolist(), strict=True)),
        }
        for w in proposals
    ]


def final_selection(
    rows: list[dict],
    names: list[str],
    prior: np.ndarray,
    cfg: SearchConfig,
    seed: int,
    objective: Objective,
    floor: np.ndarray | None = None,
    cap: np.ndarray | None = None,
) -> dict:
    """The final mixture (mean of the top-k predictions), its info and the scored history.

    history: the rows in the given order (duplicates dropped), each with its objective value
    among the evaluated proxies ("ranking_score"); pool: the candidates ranked (fresh ones above
    `floor` and under `cap`, as in round_proposals, and the scored ones), an array. The mixture
    lies under `cap` too (see select_final).
    Raises SearchError when there are no scored rows.
    """
    rows = unique_rows(rows)
    fitted = canonical_rows(rows)
    targets = _targets(fitted, objective)
    mixture, info = select_final(
        prior, weights_matrix(fitted, names), targets, cfg, seed, objective.combine, floor, cap
    )
    scores = objective.combine(targets) if len(fitted) else np.zeros(0)
    by_id = {row["id"]: float(s) for row, s in zip(fitted, scores, strict=True)}
    history = [{**row, "ranking_score": by_id[row["id"]]} for row in rows]
    rounds = max((row["round"] for row in rows), default=-1) + 1
    return {
        "mixture": mixture,
        "rounds": rounds,
        "proxies_evaluated": len(rows),
        "history": history,
        **info,
    }


def check_table_matches(proposals: list[dict], table: ScoresTable) -> None:
    """Refuse a table holding rows of the proposals' round that this search did not propose.

    Such rows come from another seed or search config; resuming would mix two searches.
    Raises SearchError naming the table and the first stray row.
    """
    if not proposals:
        return
    round_index = proposals[0]["round"]
    proposed = {p["id"] for p in proposals}
    stray = [
        row["id"]
        for row in table.rows()
        if row["round"] == round_index and row["id"] not in proposed
    ]
    if stray:
        raise SearchError(
            f"{table.path}: row {stray[0]!r} of round {round_index} is not a proposal of this "
            f"search ({len(stray)} such rows); it was written with another seed or search config, "
            f"use a fresh output folder"
        )


def check_scored_with(table: ScoresTable, key: str) -> None:
    """Refuse a table holding rows scored under another setup (row field "scored_with").

    Such rows come from changed tasks, limits, merge settings or models; mixing them with new
    rows would rank proxies on different scales. Raises SearchError naming the table.
    """
    stale = [row["id"] for row in table.rows() if row.get("scored_with") != key]
    if stale:
        raise SearchError(
            f"{table.path}: {len(stale)} row(s) (first {stale[0]!r}) were scored with other "
            "evaluation, merge or model settings; delete the table or use a fresh output folder"
        )


def evaluate_proposals(
    proposals: list[dict],
    names: list[str],
    evaluate: Callable[[np.ndarray], dict],
    table: ScoresTable,
    key: str | None = None,
) -> int:
    """Evaluate proposals not yet in `table`, appending one row each; return how many ran.

    With `key` (what the scores depend on, see demix.proxies.score_key) rows are stamped with it
    and a table holding rows stamped differently is refused.
    Raises SearchError when the table holds rows of this round that were not proposed, or rows
    scored with another key.
    """
    check_table_matches(proposals, table)
    if key is not None:
        check_scored_with(table, key)
    done = table.ids()
    ran = 0
    scored = sum(proposal["id"] in done for proposal in proposals)
    label = f"search round {proposals[0]['round']}" if proposals else "search round"
    with progress(len(proposals), label, "proxy", initial=scored) as bar:
        for k, proposal in enumerate(proposals):
            if proposal["id"] in done:
                continue
            start = time.perf_counter()
            tasks = evaluate(np.array([proposal["weights"][n] for n in names]))
            elapsed = time.perf_counter() - start
            row = {**proposal, "tasks": tasks, "time_s": round(elapsed, 3)}
            table.append(row if key is None else {**row, "scored_with": key})
            log.info(
                "round %s proxy %d/%d %s: %.1f s",
                proposal["round"],
                k + 1,
                len(proposals),
                proposal["id"],
                elapsed,
            )
            bar.update()
            ran += 1
    return ran


def run_search(
    names: list[str],
    prior: np.ndarray,
    cfg: SearchConfig,
    seed: int,
    evaluate: Callable[[np.ndarray], dict],
    objective: Objective,
    table: ScoresTable,
    key: str | None = None,
    floor: np.ndarray | None = None,
    cap: np.ndarray | None = None,
) -> dict:
    """Rounds of cfg.round_sizes proxies, then the final selection; resumes from `table`.

    `evaluate(mixture)` returns a proxy's task results; proxies already in `table` are skipped.
    `key` stamps the rows (see evaluate_proposals); every mixture searched, and the one chosen,
    lies above `floor` and under `cap` (see sample_mixtures; None: the whole simplex).
    Returns final_selection's dict (mixture, rounds, proxies_evaluated, predictor_spearman,
    predicted_score, top_prediction, best_observed, history, pool).
    Raises SearchError for a table of another search, MixtureError when the grid runs out.
    """
    if len(prior) != len(names):
        raise ValueError(f"{len(names)} dataset names but a prior of {len(prior)} weights")
    for r in range(len(cfg.round_sizes)):
        rows = table.rows()
        proposals = round_proposals(r, rows, names, prior, cfg, seed, objective, floor, cap)
        ran = evaluate_proposals(proposals, names, evaluate, table, key=key)
        if ran < len(proposals):
            log.info("round %d: %d proxies already scored (resumed)", r, len(proposals) - ran)
    return final_selection(table.rows(), names, prior, cfg, seed, objective, floor, cap)
