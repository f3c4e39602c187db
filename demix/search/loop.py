"""The search loop over rounds, resumable from its scores table."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from demix.config import SearchConfig
from demix.search.results import ScoresTable, mixture_id
from demix.search.rounds import propose_round, select_final


def weights_matrix(rows: list[dict], names: list[str]) -> np.ndarray:
    """Rows' data mixtures as an [n, D] array in `names` order."""
    return np.array([[row["weights"][n] for n in names] for row in rows], dtype=np.float64).reshape(
        -1, len(names)
    )


def run_search(
    names: list[str],
    prior: np.ndarray,
    cfg: SearchConfig,
    seed: int,
    evaluate: Callable[[np.ndarray], dict],
    score: Callable[[list[dict]], list[float]],
    table: ScoresTable,
    log: Callable[[str], None] = print,
) -> dict:
    """Rounds of cfg.round_sizes proxies, then the final selection.

    `evaluate(mixture)` returns task results of the proxy; `score(results)` maps task results of
    all proxies so far to ranking scores (they are relative, so recomputed every round). Proxies
    already in `table` are not evaluated again.
    """
    grid = cfg.sampler.grid
    for r, size in enumerate(cfg.round_sizes):
        rows = table.rows()
        earlier = [row for row in rows if row["round"] < r]
        y = np.array(score([row["tasks"] for row in earlier])) if earlier else np.zeros(0)
        proposals = propose_round(r, size, prior, weights_matrix(earlier, names), y, cfg, seed)
        done = {row["id"] for row in rows}
        for k, mixture in enumerate(proposals):
            pid = mixture_id(mixture, grid)
            if pid in done:
                continue
            start = time.perf_counter()
            tasks = evaluate(mixture)
            table.append(
                {
                    "id": pid,
                    "round": r,
                    "weights": dict(zip(names, mixture.round(6).tolist(), strict=True)),
                    "tasks": tasks,
                    "time_s": round(time.perf_counter() - start, 3),
                }
            )
            log(
                f"[demix] round {r} proxy {k + 1}/{len(proposals)} {pid} evaluated in {time.perf_counter() - start:.1f} s"
            )
    rows = table.rows()
    scores = score([row["tasks"] for row in rows])
    mixture, info = select_final(prior, weights_matrix(rows, names), np.array(scores), cfg, seed)
    history = [{**row, "ranking_score": s} for row, s in zip(rows, scores, strict=True)]
    return {
        "mixture": mixture,
        "rounds": len(cfg.round_sizes),
        "proxies_evaluated": len(rows),
        "history": history,
        **info,
    }
