"""Training roles: which budget a model trains with and where it starts.

base: `train.base` from a fresh model of `model.architecture`; component, reference, control,
final: from the base, with `train.component` (references are the training-based proxies and the
control is their anneal-only twin, so they get the component budget) or `train.final`.

Branch regime: a base trained with `schedule: wsd` stays at its peak lr after warmup and is
written at that point, with its optimizer state: the branch point. Every other role is a decay
branch from it (warmup to its own peak lr, decay to min_lr_ratio x that lr, its optimizer fresh
or carried from the base). Part of what any branch gains is the decay itself, whatever its
data: the `control` branch, on the token prior with the component budget and schedule, measures
that part, so fidelity reports data effects against it (demix.stages.validate). A user's
`model.base` is the branch point as it is (export a checkpoint from before its lr decayed).
"""

from __future__ import annotations

from pathlib import Path

from demix.config import TRAINING_ROLES, ModelConfig, StageTraining, TrainConfig
from demix.data.shards import CuratedData
from demix.errors import DemixError
from demix.mixtures import as_dict, validate_mixture
from demix.train.job import job_fingerprint
from demix.train.loop import CheckpointHook, train_model

ROLES = TRAINING_ROLES


def role_budget(train: TrainConfig, role: str) -> StageTraining:
    """The token budget and learning-rate schedule of `role`.

    Raises DemixError for an unknown role.
    """
    budgets = {
        "base": train.base,
        "component": train.component,
        "reference": train.component,  # training-based proxies: the component budget
        "control": train.component,  # the references' anneal-only twin
        "final": train.final,
    }
    if role not in budgets:
        raise DemixError(f"training role {role!r} is not one of {list(ROLES)}")
    return budgets[role]


def train_role(
    train: TrainConfig,
    model: ModelConfig,
    seed: int,
    data: CuratedData,
    weights: dict[str, float],
    role: str,
    name: str,
    out: Path,
    init: Path | None = None,
    on_checkpoint: CheckpointHook = None,
) -> dict:
    """The one training loop with the budget of `role`; returns the model's manifest. A base
    with `decay_tokens` also gets its decayed copy (decayed_base_dir(out), decay_base)."""
    stage = role_budget(train, role)
    manifest = train_model(
        out,
        data,
        weights,
        stage,
        train,
        model,
        seed,
        role=role,
        name=name,
        init=init,
        arch=model.architecture if init is None else None,
        on_checkpoint=on_checkpoint,
    )
    if role == "base" and stage.decay_tokens:
        decay_base(train, model, seed, data, weights, out, decayed_base_dir(out))
    return manifest


def decayed_base_dir(base: Path) -> Path:
    """Where the decayed copy of a warmup-stable base is written: beside it, `<base>-decayed`."""
    return base.with_name(base.name + "-decayed")


def decay_schedule(stage: StageTraining) -> StageTraining:
    """The decayed copy's schedule: `decay_tokens` from the base's peak lr, no warmup, cosine to
    min_lr_ratio x lr, the base's optimizer state carried (the end of one WSD run).

    Raises DemixError when `stage` is not a warmup-stable base with decay_tokens.
    """
    if stage.schedule != "wsd" or not stage.decay_tokens:
        raise DemixError("a decayed copy needs train.base.schedule: wsd and decay_tokens")
    return stage.model_copy(
        update={
            "tokens": stage.decay_tokens,
            "warmup_fraction": 0.0,
            "schedule": "cosine",
            "decay_tokens": None,
            "optimizer": "carried",
        }
    )


def decay_base(
    train: TrainConfig,
    model: ModelConfig,
    seed: int,
    data: CuratedData,
    weights: dict[str, float],
    base: Path,
    out: Path,
) -> dict:
    """The finished copy of a warmup-stable base (decay_schedule) into `out`; its manifest."""
    return train_model(
        out,
        data,
        weights,
        decay_schedule(role_budget(train, "base")),
        train,
        model,
        seed,
        role="base",
        name="base-decayed",
        init=base,
    )


def role_job_id(
    train: TrainConfig,
    model: ModelConfig,
    seed: int,
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
        role_budget(train, role),
        train,
        seed,
        role,
        name or role,
        init,
        model.architecture if init is None else None,
    )


def train_on_mixture(
    train: TrainConfig,
    model: ModelConfig,
    seed: int,
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
    train_role(
        train, model, seed, data, mix, role, name, out, init=base, on_checkpoint=on_checkpoint
    )
    return out
