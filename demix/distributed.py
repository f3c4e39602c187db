"""Several processes for the one training loop: accelerate's Accelerator and `accelerate launch`.

One process (tests, the demo, the CLI, kfp.local) uses only `make_accelerator`, whose
Accelerator then wraps nothing. Several processes on one machine: `demix train ... --processes N`
re-runs itself under `accelerate launch` (`launch_command`, `run_launched`); several machines of
a Vertex AI custom job: each runs the same command and `cluster_from_env` tells it its place
(`vertex_worker_pools` and `run_vertex_job` start such a job from a pipeline step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from demix.config import TrainConfig
from demix.errors import DemixError

ERROR_PREFIX = "demix: error: "
log = logging.getLogger(__name__)


class LaunchError(DemixError):
    """A launch of several training processes that failed or cannot be set up."""


def launched() -> bool:
    """True in one of several processes started by `accelerate launch` (or torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _precision(train: TrainConfig) -> tuple[bool, str]:
    """(CPU only, accelerate's mixed precision) of a training config."""
    import torch

    from demix.model import resolve_device, resolve_dtype

    device = resolve_device(train.device)
    bf16 = resolve_dtype(train.dtype, device) == torch.bfloat16
    return device.type == "cpu", "bf16" if bf16 else "no"


def make_accelerator(train: TrainConfig):
    """The Accelerator of one training run: the processes of the launch (or just this one),
    bf16 autocast when train.dtype resolves to bfloat16, FSDP2 when train.fsdp on GPUs, else DDP.
    """
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState

    cpu, mixed = _precision(train)
    state = AcceleratorState._shared_state
    if state and not launched():
        other_device = cpu and getattr(state.get("device"), "type", "cpu") != "cpu"
        if state.get("_mixed_precision") != mixed or other_device:
            # accelerate keeps one state per process, and refuses other settings once set; one
            # process may train (or evaluate, lm-eval makes an Accelerator too) with other
            # settings one run after another. Launched processes run one job each.
            AcceleratorState._reset_state()
    fsdp = None
    if train.fsdp and not cpu:
        fsdp = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",  # one shard unit per decoder layer
            state_dict_type="FULL_STATE_DICT",
            reshard_after_forward=True,
        )
    # Devices are placed by the loop (one process keeps train.device); accumulation is explicit.
    return Accelerator(cpu=cpu, mixed_precision=mixed, fsdp_plugin=fsdp, device_placement=False)


@contextlib.contextmanager
def node_first(train: TrainConfig) -> Iterator[None]:
    """Run the block on each machine's first process first (it fills the shared local cache)."""
    if not launched():
        yield
        return
    from accelerate import PartialState

    # cpu=True matters: without it, processes launched on a machine without GPUs run apart
    with PartialState(cpu=_precision(train)[0]).local_main_process_first():
        yield


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The machines of a multi-node job and this machine's place among them."""

    nodes: int
    rank: int
    address: str
    port: int


def cluster_from_env(environ: Mapping[str, str] = os.environ) -> Cluster | None:
    """The machines of a Vertex AI custom job, from its CLUSTER_SPEC (None outside one).

    The primary replica (worker pool 0) is machine 0 and the rendezvous address; replica i of
    worker pool 1 is machine i + 1. Raises LaunchError for a CLUSTER_SPEC it cannot read.
    """
    text = environ.get("CLUSTER_SPEC")
    if not text:
        return None
    try:
        spec = json.loads(text)
        pools, task = spec["cluster"], spec["task"]
        host, _, port = pools["workerpool0"][0].rpartition(":")
        workers = pools.get("workerpool1", [])
        rank = 0 if task["type"] == "workerpool0" else 1 + int(task["index"])
        return Cluster(nodes=1 + len(workers), rank=rank, address=host, port=int(port))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
        raise LaunchError(
            f"CLUSTER_SPEC is not a Vertex AI cluster spec ({type(err).__name__}: {err}); "
            "unset it to train on this machine alone"
        ) from None


def launch_command(
    argv: list[str],
    processes: int,
    cluster: Cluster | None = None,
    python: str = sys.executable,
    module: str = "demix.cli",
) -> list[str]:
    """`accelerate launch` of `python -m <module> <argv>` (the `demix` command by default) with
    `processes` processes on each machine of `cluster` (this machine alone when None)."""
    nodes = cluster.nodes if cluster else 1
    cmd = [python, "-m", "accelerate.commands.launch", "--multi_gpu"]
    cmd += ["--num_processes", str(processes * nodes), "--num_machines", str(nodes)]
    # settings accelerate would otherwise warn about; the run config decides precision
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    if cluster and nodes > 1:
        cmd += ["--machine_rank", str(cluster.rank), "--main_process_ip", cluster.address]
        cmd += ["--main_process_port", str(cluster.port)]
    return [*cmd, "--module", module, *argv]


def run_launched(
    argv: list[str], processes: int, cluster: Cluster | None = None, module: str = "demix.cli"
) -> None:
    """Run `python -m <module> <argv>` (`demix <argv>` by default) under `accelerate launch` and
    wait; the processes' log passes through.

    Raises DemixError with the processes' own one-line error when they report one (the
    launcher's report of the failed processes is then dropped), LaunchError otherwise.
    """
    cmd = launch_command(argv, processes, cluster, module=module)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace")
    error = None
    for line in proc.stderr or ():
        if line.startswith(ERROR_PREFIX):
            error = error or line[len(ERROR_PREFIX) :].strip()
        elif error is None:
            sys.stderr.write(line)
            sys.stderr.flush()
    code = proc.wait()
    if code == 0:
        return
    if error:
        raise DemixError(error)
    raise LaunchError(
        f"accelerate launch of {processes} process(es) per machine exited with {code}; "
        "see the log above"
    )


# ------------------------------------------------------------------ Vertex AI, several machines


def vertex_worker_pools(
    nodes: int,
    machine_type: str,
    accelerator_type: str,
    accelerator_count: int,
    image: str,
    *,
    service_account: str = "",
    encryption_key: str = "",
    labels: Mapping[str, str] | None = None,
    timeout_s: int = 0,
    spot: bool = False,
) -> str:
    """A Vertex AI custom job of `nodes` machines, as JSON (a pipeline input): its worker pools
    and the settings of the job (service account, CMEK key, labels, timeout in seconds with 0
    for Vertex's default of 7 days, spot machines).

    Pool 0 is the primary replica, pool 1 the other nodes - 1; every replica runs the same
    image and command (filled in by vertex_job). Raises LaunchError for fewer than 2 nodes.
    """
    if nodes < 2:
        raise LaunchError(f"nodes={nodes}: a multi-node job needs at least 2 machines")
    pool = {
        "machine_spec": {
            "machine_type": machine_type,
            "accelerator_type": accelerator_type,
            "accelerator_count": accelerator_count,
        },
        "replica_count": 1,
        "container_spec": {"image_uri": image},
    }
    job = {
        "service_account": service_account,
        "encryption_key": encryption_key,
        "labels": dict(labels or {}),
        "timeout_s": timeout_s,
        "spot": spot,
    }
    return json.dumps(
        {"worker_pool_specs": [pool, {**pool, "replica_count": nodes - 1}], "job": job}
    )


def job_settings(cluster_json: str) -> dict:
    """The job settings of a vertex_worker_pools JSON (defaults for JSON written without)."""
    found = json.loads(cluster_json).get("job") or {}
    return {
        "service_account": found.get("service_account") or "",
        "encryption_key": found.get("encryption_key") or "",
        "labels": dict(found.get("labels") or {}),
        "timeout_s": int(found.get("timeout_s") or 0),
        "spot": bool(found.get("spot")),
    }


# Vertex AI sets this in every pipeline task: the run's labels as a JSON object (its billing id
# label among them), to be attached to the resources a task creates.
RUN_LABELS_ENV = "VERTEX_AI_PIPELINES_RUN_LABELS"


def run_labels(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The labels of the Vertex AI pipeline run this task belongs to ({} outside one)."""
    try:
        labels = json.loads(environ.get(RUN_LABELS_ENV) or "{}")
    except json.JSONDecodeError:
        return {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def gcs_uri(path: str | Path) -> str:
    """gs://bucket/key of a /gcs/bucket/key path (Cloud Storage FUSE, as in Vertex AI).

    Raises LaunchError for a path outside /gcs/.
    """
    parts = Path(path).parts
    if len(parts) < 4 or parts[:2] != ("/", "gcs"):
        raise LaunchError(
            f"{path}: a multi-node training job reads and writes through /gcs/; run the pipeline "
            "on Vertex AI with a gs:// pipeline root"
        )
    return "gs://" + "/".join(parts[2:])


def vertex_job(
    cluster_json: str,
    argv: list[str],
    processes: int,
    out: Path,
    module: str = "demix.cli",
    **client,
):
    """A Vertex AI custom job (not yet run) whose replicas each run `python -m <module> <argv>
    --processes <processes>` (`demix <argv>` by default), each finding its place in CLUSTER_SPEC.

    The job carries the compiled labels and the run's (run_labels; compiled ones win) and the
    CMEK key. The job's own files go beside `out` (`<out>.job`); `client` (project, location,
    credentials) defaults to the environment, as inside a Vertex AI pipeline task.
    Raises LaunchError when `out` is not on /gcs/.
    """
    from google.cloud import aiplatform

    command = ["python", "-m", module, *argv, "--processes", str(processes)]
    pools = [
        {**pool, "container_spec": {**pool["container_spec"], "command": command}}
        for pool in json.loads(cluster_json)["worker_pool_specs"]
    ]
    settings = job_settings(cluster_json)
    job_dir = gcs_uri(Path(out).with_name(Path(out).name + ".job"))
    return aiplatform.CustomJob(
        display_name=f"demix-{Path(out).name}",
        worker_pool_specs=pools,
        base_output_dir=job_dir,
        staging_bucket=job_dir,
        labels={**run_labels(), **settings["labels"]} or None,
        encryption_spec_key_name=settings["encryption_key"] or None,
        **client,
    )


def console_url(resource_name: str) -> str:
    """The Cloud console page of a custom job, projects/P/locations/L/customJobs/ID."""
    found = re.fullmatch(r"projects/([^/]+)/locations/([^/]+)/customJobs/([^/]+)", resource_name)
    if not found:
        return resource_name
    project, location, job = found.groups()
    return (
        f"https://console.cloud.google.com/vertex-ai/locations/{location}/training/{job}/cpu"
        f"?project={project}"
    )


def _resource_name(job) -> str:
    """The job's resource name, "" when it was not created."""
    try:
        return job.resource_name or ""
    except RuntimeError:  # aiplatform: the resource does not exist yet
        return ""


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_vertex_job(
    cluster_json: str, argv: list[str], processes: int, out: Path, module: str = "demix.cli"
) -> None:
    """Run `python -m <module> <argv>` (`demix <argv>` by default) on the machines of
    `cluster_json` as a Vertex AI custom job; wait.

    The job runs as the compiled service account, with its timeout and scheduling (spot).
    Its console link is logged as soon as it exists. When the waiting task is stopped (SIGTERM,
    as when its pipeline task is cancelled, or Ctrl-C) the job is cancelled too.
    Raises LaunchError when the job fails or is cancelled that way.
    """
    from google.cloud.aiplatform.compat.types import custom_job

    settings = job_settings(cluster_json)
    job = vertex_job(cluster_json, argv, processes, out, module=module)
    strategy = custom_job.Scheduling.Strategy.SPOT if settings["spot"] else None
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    name = ""
    try:
        job.submit(
            service_account=settings["service_account"] or None,
            timeout=settings["timeout_s"] or None,
            scheduling_strategy=strategy,
        )
        name = job.resource_name
        log.info("Vertex AI custom job %s: %s", job.display_name, console_url(name))
        job.wait_for_completion()
    except KeyboardInterrupt:
        name = name or _resource_name(job)  # stopped between the create call and here
        if name:
            job.cancel()
        raise LaunchError(
            f"interrupted; Vertex AI custom job {job.display_name} "
            + (f"cancelled: {console_url(name)}" if name else "was not created")
        ) from None
    except RuntimeError as err:
        where = f" ({console_url(name)})" if name else ""
        raise LaunchError(f"Vertex AI custom job {job.display_name} failed{where}: {err}") from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
