"""`demix reproduce-decision`: the decision at equal training tokens (demix.decision).

For each protocol seed (run seed + s, folder seed-<s>; the first in the run folder) and each
budget of `decision.budgets`: the components at that budget and the merged searches of
`decision.merged_proxies` proxies; the trained-proxy search with as many proxies as the budget
buys (the RegMix recipe: one round of Dirichlet(s * p^0.5) mixtures, LightGBM, the mean of the
top `decision.top_k` of `decision.candidates`); the linear and quadratic weights-only fits on
the same proxies; then final models (`final.seeds` training seeds) for every chosen mixture and
the token prior, and the paired verdicts. The seeds share the curated data and the base.
Everything resumes: models are not trained twice, proxies and finals not evaluated twice.
Writes decision.json and decision.md (the table) into the run folder after every protocol seed:
a run of hours shows the seeds it has finished, marked provisional until the last.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from demix.recipes.run import StageClock
from demix.stages import prepare_models, run_evaluator, start_run_folder
from demix.stages.decision import check_plan, decision_seed, write_decision
from demix.stages.reproduce import seed_folder

if TYPE_CHECKING:
    from demix.config import RunConfig


def reproduce_decision(config: RunConfig, out: str | Path) -> dict[str, Any]:
    """The decision protocol into `out` for `decision.seeds` protocol seeds; returns (and
    writes) decision.json's data: the table over seeds, each seed's rows, tokens and timings.

    Raises DemixError where a budget buys fewer than 4 trained proxies (before any training),
    and what the stages raise.
    """
    check_plan(config)
    out = start_run_folder(config, out)
    timed = StageClock()
    prepared = prepare_models(config, out, timed, components=False)
    evaluator = run_evaluator(config, prepared.data)
    per_seed: list[dict[str, Any]] = []
    for s in range(config.decision.seeds):
        seeded = prepared.using(config.model_copy(update={"seed": config.seed + s}))
        per_seed.append(decision_seed(seeded, seed_folder(out, s), evaluator, timed))
        result = write_decision(
            prepared.data, per_seed, out, timed.timings, planned=config.decision.seeds
        )
    return result
