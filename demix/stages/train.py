"""The training stage: base, component, reference and final roles, in one process or N
(launched through demix.stages.launch), with checkpoints synced to the bucket."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from demix import merge, train
from demix.base_model import write_base_artifact
from demix.config import RunConfig
from demix.data.shards import CuratedData
from demix.errors import DemixError
from demix.stages.artifacts import base_model_dir
from demix.stages.launch import job_for, launch_train
from demix.stages.values import run_mixing
from demix.storage import checkpoint_sync, discard_checkpoint

if TYPE_CHECKING:
    from demix.train import CheckpointHook


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
    seed_offset: int = 0,
) -> Path:
    """Train one model into `out` and return its folder (the base: `model.base` when set,
    copied into `out` as a model artifact when `out` is published, demix.base_model).

    role base: from a fresh model on the token prior; component: from `init` on its dataset
    `name`'s training mix; control: from `init` on the token prior (demix.train.roles);
    reference / final: from `init` on `mixture`, with the run seed + `seed_offset` (a further
    training seed of the same mixture: demix.mixtures.SeededRun). With processes > 1 (GPUs
    of the machine) or a `cluster` (Vertex AI worker pools JSON) the loop runs under
    `accelerate launch` in that many processes (demix.stages.launch).
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
        mixture = run_mixing(config, data).training_mix(name)
    elif role in ("base", "control"):  # the control: a decay branch on the token prior
        mixture = dict(data.token_prior)
    config = _seeded(config, role, seed_offset)  # the seed travels in the config from here
    job_id = ""
    if jobs_root:
        job_id = train.role_job_id(
            config.train, config.model, config.seed, data, mixture, role, name, init
        )
        if train.reuse_finished(jobs_root, job_id, out) is not None:
            return out
    _train(config, data, role, out, name, init, mixture, processes, cluster, on_checkpoint, uri)
    if jobs_root:
        train.record_finished(jobs_root, job_id, uri or str(out), role, name or role)
    return out


def _seeded(config: RunConfig, role: str, seed_offset: int) -> RunConfig:
    """The config a reference or final run trains with: the run seed + `seed_offset`.

    Raises DemixError for an offset below 0, or given to a role that trains one model per run.
    """
    if seed_offset < 0 or (seed_offset and role not in ("reference", "final")):
        raise DemixError(f"seed offset {seed_offset}: a reference or final run takes one >= 0")
    if seed_offset:  # a further training seed of the same mixture
        return config.model_copy(update={"seed": config.seed + seed_offset})
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
        job = job_for(config, role, name, data.root, out, init, mixture, publish_uri=uri)
        launch_train(config, job, processes, cluster)
        return
    publish = checkpoint_sync(uri, out.with_name(out.name + ".ckpt")) if uri else None
    hook = _both(on_checkpoint, publish)
    if role in ("reference", "final"):
        train.train_on_mixture(
            config.train, config.model, config.seed, data, init, role, name, mixture, out, hook
        )
    else:
        train.train_role(
            config.train,
            config.model,
            config.seed,
            data,
            mixture,
            role,
            name or role,
            out,
            init=init,
            on_checkpoint=hook,
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
