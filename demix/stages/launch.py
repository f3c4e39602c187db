"""One training job in several processes or machines, without the `demix` command line.

The job (the seeded run config, the role, the name, the inputs, the output) is written beside
its output as `<out>.launch.json`; `accelerate launch` starts the worker's entry point in each
process (`python -m demix.stages.worker JOB`, demix.stages.worker), on this machine or, in a
Vertex AI custom job, on each machine (`... JOB --processes N`, which launches that machine's
processes). The job file sits beside the output, so every machine reads it where it reads the
output's checkpoints (on Vertex AI a /gcs/ path).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from demix.checkpoint import read_model_manifest
from demix.config import RunConfig, config_yaml
from demix.errors import DemixError
from demix.storage import atomic_write_json, is_remote

MODULE = "demix.stages.worker"  # the entry point every launched process runs
JOB_SUFFIX = ".launch.json"


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """What every process of a launched training job needs, as JSON."""

    config: str  # the run config's YAML, its seed already the run's (train_stage's _seeded)
    role: str
    name: str
    data: str  # the curated dataset: a folder, or a gs:// URI
    out: str  # the model: a folder, or a gs:// URI
    init: str | None = None  # the model it trains from
    mixture: dict[str, float] | None = None  # a reference's or final's data mixture
    publish_uri: str = ""  # gs://, where a local `out` is published (a pipeline's model.uri)
    verbose: bool = False  # the processes log DEBUG records too, as the launching process does

    @classmethod
    def read(cls, path: Path) -> TrainJob:
        """Raises DemixError naming the file when it is no job this module wrote."""
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise DemixError(f"{path}: not a training job of demix ({err})") from None


def launch_train(
    config: RunConfig,
    job: TrainJob,
    processes: int,
    cluster: str = "",
) -> dict:
    """Run `job` in `processes` processes per machine under `accelerate launch`, on this machine
    or (`cluster`: vertex_worker_pools JSON) on the machines of a Vertex AI custom job; returns
    the model's manifest. The job file is removed when the processes end, whatever the outcome.

    The job's `publish_uri` (gs://): the main process publishes each checkpoint to
    `<publish_uri>.ckpt`, every process resumes from the newest one there (a retried task starts
    in an empty folder), and it is deleted once the model is done. A local one is dropped.

    Raises ConfigError when the global batch does not split over the processes, LaunchError
    when a process fails, DemixError with the processes' own one-line error when they report
    one.
    """
    from demix.distributed import run_launched, run_vertex_job

    pools = json.loads(cluster)["worker_pool_specs"] if cluster else [{"replica_count": 1}]
    nodes = sum(pool["replica_count"] for pool in pools)
    config.train.accumulation(processes * nodes)  # a global batch that does not split: now
    if not is_remote(job.publish_uri):
        job = dataclasses.replace(job, publish_uri="")
    out = Path(job.out)
    path = out.with_name(out.name + JOB_SUFFIX)
    atomic_write_json(path, dataclasses.asdict(job))
    try:
        if cluster:
            run_vertex_job(cluster, [str(path)], processes, out, module=MODULE)
        else:
            run_launched([str(path)], processes, module=MODULE)
    finally:
        path.unlink(missing_ok=True)
    return read_model_manifest(out)


def job_for(
    config: RunConfig,
    role: str,
    name: str,
    data: Path,
    out: Path,
    init: Path | None,
    mixture: dict[str, float] | None,
    publish_uri: str = "",
) -> TrainJob:
    """The job of one training run of train_stage (its config already seeded)."""
    return TrainJob(
        config=config_yaml(config),
        role=role,
        name=name,
        data=str(data),
        out=str(out),
        init=str(init) if init is not None else None,
        mixture=mixture if role in ("reference", "final") else None,
        publish_uri=publish_uri,
        verbose=logging.getLogger("demix").isEnabledFor(logging.DEBUG),
    )
