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
    """The fingerprint of one training job: role, name, mixture, budget, seed, init, data read
    (data_read), arch."""
    return fingerprint(
        role=role,
        name=name,
        weights={name: w for name, w in weights.items() if w > 0},
        stage=stage.changed_settings(),
        seed=seed,
        init=read_model_manifest(init).get("fingerprint", str(init)) if init else None,
        train=train.model_dump(exclude=_NOT_THE_JOB),
        data=data_read(data, weights),
        arch=arch.model_dump() if arch else None,
    )


def data_read(data: CuratedData, weights: dict[str, float]) -> dict:
    """What a job reads of a curated dataset: the token files of the datasets it samples (with
    their place in the dataset order, which seeds their sampling), the tokenizer and the token
    format. Another dataset changing, or one added at the end, leaves the job the same."""
    manifest = read_manifest(data.root)
    files = manifest.get("files") or {}
    sampled = [name for name in data.names if weights.get(name, 0.0) > 0]
    read = {
        rel: info
        for rel, info in files.items()
        if rel.startswith(f"{manifest.get('tokenizer', 'tokenizer')}/")
        or rel.split("/", 1)[0] in sampled
    }
    return {
        "files": read,
        "order": {name: data.names.index(name) for name in sampled},
        "format": [manifest.get(key) for key in ("dtype", "vocab_size", "eos_token_id")],
    }


def finished(out: Path, job_id: str) -> dict | None:
    """The manifest of `out` when it already holds this job's model, else None."""
    if (out / "manifest.json").is_file():
        manifest = read_model_manifest(out)
        if manifest.get("fingerprint") == job_id:
            return manifest
    return None
