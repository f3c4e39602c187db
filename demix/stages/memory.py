"""The memory plans of a run config (demix.memory_plans), checked before anything runs: the
training of its base and the search's candidate pool (and the decision's pool)."""

from __future__ import annotations

from pathlib import Path

from demix.config import RunConfig
from demix.errors import ModelError
from demix.memory_plans import (
    MemoryPlan,
    search_plan,
    shape_of_architecture,
    shape_of_folder,
    training_plan,
)


def config_search_plan(config: RunConfig, decision: bool = False) -> MemoryPlan:
    """The search pool plan of a run config (the decision's pool with `decision`)."""
    candidates = config.decision.candidates if decision else config.search.candidates
    return search_plan(
        candidates,
        len(config.data.datasets),
        len(config.evaluate.tasks),
        "decision" if decision else "search",
    )


def config_training_plan(config: RunConfig, processes: int = 1) -> MemoryPlan | None:
    """The training plan of a run config: its base (model.base when it is a local folder, else
    model.architecture with data.tokenizer.vocab_size tokens); None for a base not yet fetched
    (gs:// or a hub id) or a local one that is no model folder: planned when it is trained
    from, after the base is verified (and refused with its own error)."""
    base = config.model.base
    if base is None:
        shape = shape_of_architecture(config.model.architecture, config.data.tokenizer.vocab_size)
    elif config.model.base_form == "local" and Path(base, "config.json").is_file():
        try:
            shape = shape_of_folder(base)
        except ModelError:
            return None
    else:
        return None
    return training_plan(shape, config.train, config.model.attn_implementation, processes)


def config_plans(config: RunConfig, decision: bool = False) -> list[MemoryPlan]:
    """Every plan of a run config: training (when its base is local or built) and the search
    pool (and the decision's pool with `decision`)."""
    plans = [config_training_plan(config), config_search_plan(config)]
    if decision:
        plans.append(config_search_plan(config, decision=True))
    return [p for p in plans if p is not None]
