"""The search over rounds, as two pure steps (propose a round, select the final mixture) and a
resumable loop over them. The local run uses the loop; the KFP pipeline calls the steps."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from demix.config import SearchConfig
from demix.search.results import ScoresTable, mixture_id
from demix.search.rounds import propose_round, select_final

Score = Callable[[list[dict]], list[float]]


def weights_matrix(rows: list[dict], names: list[str]) -> np.ndarray:
    """Rows' data mixtures as an [n, D] array in `names` order."""
    return np.array([[row["weights"][n] for n in names] for row in rows], dtype=np.float64).reshape(
        -1, len(names)
    )


def round_proposals(
    round_index: int,
    rows: list[dict],
    names: list[str],
    prior: np.ndarray,
    cfg: SearchConfig,
    seed: int,
    score: Score,
) -> list[dict]:
    """Proposals {"id", "round", "weights"} of a round, from the rows scored in earlier rounds.

    Ranking scores are relative to all proxies so far, so `score` recomputes them from the rows'
    task results. The same inputs always give the same proposals.
    """
    earlier = [row for row in rows if row["round"] < round_index]
    y = np.array(score([row["tasks"] for row in earlier])) if earlier else np.zeros(0)
    size = cfg.round_sizes[round_index]
    proposals = propose_round(
        round_index, size, prior, weights_matrix(earlier, names), y, cfg, seed
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
    score: Score,
) -> dict:
    """The final mixture (mean of the top-k predictions) and the scored history."""
    scores = score([row["tasks"] for row in rows])
    mixture, info = select_final(prior, weights_matrix(rows, names), np.array(scores), cfg, seed)
    history = [{**row, "ranking_score": s} for row, s in zip(rows, scores, strict=True)]
    rounds = max((row["round"] for row in rows), default=-1) + 1
    return {
        "mixture": mixture,
        "rounds": rounds,
        "proxies_evaluated": len(rows),
        "history": history,
        **info,
    }


def evaluate_proposals(
    proposals: list[dict],
    names: list[str],
    evaluate: Callable[[np.ndarray], dict],
    table: ScoresTable,
    log: Callable[[str], None] = print,
) -> int:
    """Evaluate proposals not yet in `table`, appending one row each; return how many ran."""
    done = table.ids()
    ran = 0
    for k, proposal in enumerate(proposals):
        if proposal["id"] in done:
            continue
        start = time.perf_counter()
        tasks = evaluate(np.array([proposal["weights"][n] for n in names]))
        elapsed = time.perf_counter() - start
        table.append({**proposal, "tasks": tasks, "time_s": round(elapsed, 3)})
        log(
            f"[demix] round {proposal['round']} proxy {k + 1}/{len(proposals)} {proposal['id']}: {elapsed:.1f} s"
        )
        ran += 1
    return ran


def run_search(
    names: list[str],
    prior: np.ndarray,
    cfg: SearchConfig,
    seed: int,
    evaluate: Callable[[np.ndarray], dict],
    score: Score,
    table: ScoresTable,
    log: Callable[[str], None] = print,
) -> dict:
    """Rounds of cfg.round_sizes proxies, then the final selection; resumes from `table`.

    `evaluate(mixture)` returns a proxy's task results; proxies already in `table` are skipped.
    """
    for r in range(len(cfg.round_sizes)):
        proposals = round_proposals(r, table.rows(), names, prior, cfg, seed, score)
        evaluate_proposals(proposals, names, evaluate, table, log)
    return final_selection(table.rows(), names, prior, cfg, seed, score)
