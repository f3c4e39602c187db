"""Finished training jobs shared between runs: a content-keyed record of each model a pipeline
trained, so a later run reuses it instead of training it again.

A job's key is its fingerprint (demix.train.job): the data it reads (the token files of the
datasets it samples, the tokenizer), its mixture, budget, settings, seed and the model it
starts from, by content. Every finished job of a pipeline writes `<root>/demix-jobs/<key>.json`
naming its model artifact's URI; a training task of a later run with the same key copies that
model, verified against its manifest, into its output instead of training. Only this record is
written outside a task's own outputs, and a record whose model is gone or does not hold that
job is ignored (the job trains).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from demix.errors import DemixError
from demix.storage import fetch_files, staged_dir, write_output_bytes

log = logging.getLogger(__name__)

JOBS = "demix-jobs"


def record_uri(root: str, job_id: str) -> str:
    """Where the record of job `job_id` lives under the jobs root `root`."""
    return f"{str(root).rstrip('/')}/{JOBS}/{job_id}.json"


def find_finished(root: str, job_id: str) -> tuple[Path, str] | None:
    """(local verified folder, artifact URI) of a model an earlier run trained for `job_id`,
    or None."""
    from demix.checkpoint import MODEL_KIND, read_model_manifest
    from demix.storage import fetch_artifact

    try:
        record = json.loads(fetch_files(record_uri(root, job_id)).read_text())
        folder = fetch_artifact(record["uri"], MODEL_KIND)
    except (DemixError, OSError, ValueError, KeyError, TypeError) as err:
        if not isinstance(err, DemixError) or "no such object" not in str(err):
            log.info("no reusable model for job %s (%s)", job_id, err)
        return None
    if read_model_manifest(folder).get("fingerprint") != job_id:
        log.warning("%s: its model does not hold job %s; training", record["uri"], job_id)
        return None
    return folder, record["uri"]


def reuse_finished(root: str, job_id: str, out: Path) -> str | None:
    """Copy the model an earlier run trained for `job_id` into `out` (replacing only an empty
    folder or a demix artifact); returns the URI it came from, or None when there is none."""
    found = find_finished(root, job_id)
    if found is None:
        return None
    folder, uri = found
    with staged_dir(out) as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
    log.info("job %s: reusing the model trained by an earlier run, %s", job_id, uri)
    return uri


def reused_from(root: str, job_id: str, uri: str) -> str:
    """The URI a task's model at `uri` was copied from ("" when that task trained it)."""
    if not root or not job_id:
        return ""
    try:
        recorded = json.loads(fetch_files(record_uri(root, job_id)).read_text())["uri"]
    except (DemixError, OSError, ValueError, KeyError, TypeError):
        return ""
    return "" if recorded == str(uri) else recorded


def record_finished(root: str, job_id: str, uri: str, role: str, name: str) -> None:
    """Record that the model at `uri` (an artifact URI another task can open) holds `job_id`.

    Raises DataError when the record cannot be written.
    """
    record = {"uri": str(uri), "role": role, "name": name, "written": time.time()}
    write_output_bytes(record_uri(root, job_id), json.dumps(record).encode())
