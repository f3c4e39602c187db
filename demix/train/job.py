"""What a training job is: its fingerprint (the resume and cache key) and whether it is done.

Two runs with the same fingerprint produce the same model, so a finished output with that
fingerprint is skipped and a checkpoint of that fingerprint is resumed. How a step is computed
(processes, micro-batches, FSDP, logging and checkpoint cadence) is not part of the job.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from demix.checkpoint import read_model_manifest
from demix.config import ArchitectureConfig, StageTraining, TrainConfig
from demix.data.shards import CuratedData
from demix.storage import read_manifest

# Settings of train.* that change how a step is computed, not what it computes.
_NOT_THE_JOB = {
    "base",
    "component",
    "final",
    "checkpoint_every",
    "log_every",
    "micro_batch_size",
    "fsdp",
}


def fingerprint(**parts) -> str:
    """Stable hash of a job's inputs: same inputs -> same outputs (resume and cache key)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def job_fingerprint(
    data: CuratedData,
    weights: dict[str, float],
    stage: StageTraining,
    train: TrainConfig,
    seed: int,
    role: str,
    name: str,
    init: str | Path | None,
    arch: ArchitectureConfig | None,
) -> str:
    """The fingerprint of one training job: role, name, mixture, budget, seed, init, data, arch."""
    return fingerprint(
        role=role,
        name=name,
        weights=weights,
        stage=stage.changed_settings(),
        seed=seed,
        init=read_model_manifest(init).get("fingerprint", str(init)) if init else None,
        train=train.model_dump(exclude=_NOT_THE_JOB),
        data=read_manifest(data.root).get("files"),
        arch=arch.model_dump() if arch else None,
    )


def finished(out: Path, job_id: str) -> dict | None:
    """The manifest of `out` when it already holds this job's model, else None."""
    if (out / "manifest.json").is_file():
        manifest = read_model_manifest(out)
        if manifest.get("fingerprint") == job_id:
            return manifest
    return None
