"""`demix reproduce`: the paper's protocol on one config, with a training-based baseline.

Runs, in one folder (every step resumes): curation, the base, the components, the merged-proxy
search, the training-based search over the same number of proxies, `validate` (merged proxies vs
trained references, next to weights-only predictors), a sweep of component budget x learning rate
(fidelity against the same references as the updates grow), and final models for both chosen
mixtures and the two baselines. `fidelity.finals: false` leaves out the searches and the final
models (fidelity only; the decision is `demix reproduce-decision`'s). Writes reproduce.json and
reproduce.md (the table) and prints it. This module composes the protocol's stages
(demix.stages.reproduce); what it reports (statistics over seeds, the tables) is
demix.report.reproduce.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from demix.recipes.run import StageClock
from demix.stages import prepare_models, run_evaluator, start_run_folder
from demix.stages.reproduce import seed_folder, seed_protocol, write_reproduce

if TYPE_CHECKING:
    from demix.config import RunConfig


def reproduce(config: RunConfig, out: str | Path) -> dict[str, Any]:
    """Every step of the protocol into `out`, for each of `fidelity.seeds` seeds; returns (and
    writes) reproduce.json's data (demix.stages.reproduce.write_reproduce).

    The seeds share the curated data and the base (trained once, with the run seed); each seed
    s trains its own components, samples its own proxies and reference mixtures, trains its
    references, replicates and final models with run seed + s.
    """
    out = start_run_folder(config, out)
    timed = StageClock()
    prepared = prepare_models(config, out, timed, components=False)
    evaluator = run_evaluator(config, prepared.data)
    per_seed = [
        seed_protocol(
            prepared.using(config.model_copy(update={"seed": config.seed + s})),
            seed_folder(out, s),
            evaluator,
            timed,
            first=s == 0,
        )
        for s in range(config.fidelity.seeds)
    ]
    return write_reproduce(prepared, per_seed, out, timed.timings)
