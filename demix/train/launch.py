"""The training loop in several processes or machines: `demix train` under `accelerate launch`,
on this machine or on the machines of a Vertex AI custom job."""

from __future__ import annotations

import json
from pathlib import Path

from demix.checkpoint import read_model_manifest
from demix.config import RunConfig, config_yaml
from demix.storage import atomic_write_text, is_remote


def launch_argv(
    role: str, name: str, data_dir: Path, init: Path | None, mixture: dict | None
) -> list[str]:
    """The `demix train` arguments of one training job (besides the config and --out)."""
    argv = ["--role", role, "--data", str(data_dir)]
    if init is not None:
        argv += ["--init", str(init)]
    if role == "component":
        argv += ["--dataset", name]
    if role == "final":
        argv += ["--name", name]
    if mixture is not None:
        argv += ["--mixture", json.dumps(mixture)]
    return argv


def launch_train(
    config: RunConfig,
    argv: list[str],
    out: Path,
    processes: int,
    cluster: str = "",
    publish_uri: str = "",
) -> dict:
    """`demix train CONFIG <argv> --out OUT` under `accelerate launch` with `processes` processes
    (per machine), on this machine or (`cluster`: vertex_worker_pools JSON) on the machines of
    a Vertex AI custom job; returns the model's manifest. The config travels as `<out>.launch.yaml`.

    `publish_uri` (gs://, where `out` is published: a pipeline task's `model.uri`) travels as
    `--publish-uri`: the main process publishes each checkpoint to `<publish_uri>.ckpt`, every
    process resumes from the newest one there (a retried task starts in an empty folder), and
    it is deleted once the model is done. A local one is ignored, as in one process.

    Raises ConfigError when the global batch does not split over the processes, LaunchError
    when a process fails.
    """
    from demix.distributed import run_launched, run_vertex_job

    pools = json.loads(cluster)["worker_pool_specs"] if cluster else [{"replica_count": 1}]
    nodes = sum(pool["replica_count"] for pool in pools)
    config.train.accumulation(processes * nodes)  # a global batch that does not split: now
    path = out.with_name(out.name + ".launch.yaml")
    atomic_write_text(path, config_yaml(config))
    command = ["train", str(path), *argv, "--out", str(out)]
    if publish_uri and is_remote(publish_uri):
        command += ["--publish-uri", publish_uri]
    if cluster:
        run_vertex_job(cluster, command, processes, out)
    else:
        run_launched(command, processes)
    path.unlink()
    return read_model_manifest(out)
