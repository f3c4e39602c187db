"""Training roles: which budget a model trains with and where it starts.

base: `train.base` from a fresh model of `model.architecture`; component, reference, final: from
the base, with `train.component` (references are the training-based proxies, so they get the
component budget) or `train.final`.
"""

from __future__ import annotations

from pathlib import Path

from demix.config import RunConfig, StageTraining
from demix.data.shards import CuratedData
from demix.errors import DemixError
from demix.mixtures import as_dict
from demix.search.sampler import validate_mixture
from demix.train.job import job_fingerprint
from demix.train.loop import CheckpointHook, train_model

ROLES = ("base", "component", "reference", "final")


def role_budget(config: RunConfig, role: str) -> StageTraining:
    """The token budget and learning-rate schedule of `role`.

    Raises DemixError for an unknown role.
    """
    budgets = {
        "base": config.train.base,
        "component": config.train.component,
        "reference": config.train.component,  # training-based proxies: the component budget
        "final": config.train.final,
    }
    if role not in budgets:
        raise DemixError(f"training role {role!r} is not one of {list(ROLES)}")
    return budgets[role]


def train_role(
    config: RunConfig,
    data: CuratedData,
    weights: dict[str, float],
    role: str,
    name: str,
    out: Path,
    init: Path | None = None,
    on_checkpoint: CheckpointHook = None,
) -> dict:
    """The one training loop with the budget of `role`; returns the model's manifest."""
    return train_model(
        out,
        data,
        weights,
        role_budget(config, role),
        config.train,
        config.model,
        config.seed,
        role=role,
        name=name,
        init=init,
        arch=config.model.architecture if init is None else None,
        on_checkpoint=on_checkpoint,
    )


def role_job_id(
    config: RunConfig,
    data: CuratedData,
    weights: dict[str, float],
    role: str,
    name: str,
    init: Path | None,
) -> str:
    """The fingerprint of the job that train_stage runs for `role` (train_role's or, for a
    reference or final, train_on_mixture's); the key of demix.train.reuse."""
    if role in ("reference", "final"):
        weights = as_dict(data.names, validate_mixture(weights, data.names))
    return job_fingerprint(
        data,
        weights,
        role_budget(config, role),
        config.train,
        config.seed,
        role,
        name or role,
        init,
        config.model.architecture if init is None else None,
    )


def train_on_mixture(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    role: str,
    name: str,
    mixture: dict[str, float],
    out: Path,
    on_checkpoint: CheckpointHook = None,
) -> Path:
    """Train `role` from the base on a data mixture (checked first); returns `out`.

    Raises MixtureError for weights that are not a point of the simplex over the datasets.
    """
    mix = as_dict(data.names, validate_mixture(mixture, data.names))
    train_role(config, data, mix, role, name, out, init=base, on_checkpoint=on_checkpoint)
    return out
