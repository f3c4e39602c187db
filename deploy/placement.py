"""Where pipeline tasks run: GPU and CPU placement, limits, timeouts, spot nodes, volumes,
retries and the training processes of a compile target (kubeflow, vertex, local).
Compile-time settings, never constants in the code."""

from __future__ import annotations

import dataclasses
import json
import re

from kfp import dsl

from components.image import CPU_IMAGE, CUDA_IMAGE
from demix.config import SearchConfig
from demix.errors import ConfigError
from deploy.checks import (
    BYTE_SETTINGS,
    CPU_SETTINGS,
    DEFAULT_GPU_NODE_SELECTOR,
    DEFAULT_GPU_TOLERATIONS,
    Toleration,
    check_accelerator,
    check_bytes,
    check_cpu,
)

# Where the kfp-kubernetes volumes go in a pod. The v2 launcher keeps a task's gs:// artifacts
# under /gcs/ (inputs downloaded there, outputs uploaded from there), so a volume there holds
# the models; the storage layer's mirror of gs:// inputs goes on it too (DEMIX_CACHE).
SHM_PATH = "/dev/shm"
EPHEMERAL_PATH = "/gcs"
EPHEMERAL_CACHE = f"{EPHEMERAL_PATH}/.demix-cache"  # a bucket name never starts with '.'
SPOT_LABEL = "cloud.google.com/gke-spot"


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where tasks run; compile-time settings of a target, never constants in the code."""

    target: str = "kubeflow"  # kubeflow | vertex | local
    accelerator_type: str = "nvidia.com/gpu"
    accelerator_count: int = 1  # GPUs of a training task (one process each)
    eval_accelerator_count: int = 1  # GPUs of an evaluation task: an evaluation shard uses one
    # kubeflow: the node selector and tolerations of GPU tasks (default GKE's H100 pools)
    gpu_node_selector: tuple[tuple[str, str], ...] = DEFAULT_GPU_NODE_SELECTOR
    gpu_tolerations: tuple[Toleration, ...] = DEFAULT_GPU_TOLERATIONS
    # Requests and limits alike (Vertex AI sizes its machines from the limits; Kubernetes gives
    # a pod whose requests equal its limits the Guaranteed class, the last to be evicted).
    cpu: str = "8"
    memory: str = "64G"
    cpu_task_cpu: str = "2"
    cpu_task_memory: str = "8G"
    # kubeflow: a memory-backed /dev/shm of this size on tasks with several GPUs (NCCL fails on
    # the container default of 64 MB); it counts against the task's memory limit.
    shm_size: str = "16Gi"
    retries: int = 2
    # Seconds a task may run (0: no limit), by kind: GPU training, GPU evaluation, CPU tasks.
    # kubeflow: the pod's activeDeadlineSeconds; vertex: the multi-node training job's timeout.
    train_timeout: int = 0
    eval_timeout: int = 0
    cpu_timeout: int = 0
    spot: bool = False  # kubeflow: GPU tasks on GKE spot nodes; vertex: the multi-node job's
    # kubeflow: a generic ephemeral volume of this size at /gcs/ on each task that holds
    # models ("" none).
    ephemeral_volume: str = ""
    storage_class: str = ""  # the ephemeral volume's StorageClass ("" the cluster's default)
    # Search rounds, unrolled into the DAG; the default is the config's (search.rounds).
    rounds: int = SearchConfig.model_fields["rounds"].default
    # Concurrent iterations of the GPU loops (0: unlimited) and of the curation loop. Local runs
    # use 1: two torch processes sharing a few cores run far slower than one after the other.
    parallelism: int = 0
    cpu_parallelism: int = 0
    # Training on several machines (vertex only): a Vertex AI custom job of `nodes` machines of
    # `machine_type`, each with accelerator_count GPUs of accelerator_type, run as
    # job_service_account, encrypted with job_encryption_key, labelled job_labels (JSON).
    nodes: int = 1
    machine_type: str = ""
    job_service_account: str = ""
    job_encryption_key: str = ""
    job_labels: str = ""
    # The images tasks run in: components built on the CUDA image get image_cuda, others image.
    image: str = CPU_IMAGE
    image_cuda: str = CUDA_IMAGE
    # The spec's default pipeline root (gs://): what a run started from the UI or a schedule
    # gets when it names none ("": the backend's default, minio:// on Kubeflow).
    pipeline_root: str = ""

    @classmethod
    def for_target(cls, target: str, **overrides) -> Placement:
        defaults = {
            "vertex": {"accelerator_type": "NVIDIA_H100_80GB"},
            # locally a failure is a bug or bad input, not a lost node: fail at once
            "local": {"parallelism": 1, "cpu_parallelism": 1, "retries": 0},
        }.get(target, {})
        return cls(
            target=target, **{**defaults, **{k: v for k, v in overrides.items() if v is not None}}
        )


# Compile settings only one target can apply, with the flag that sets them.
KUBEFLOW_ONLY = {
    "gpu_node_selector": "--gpu-node-selector/--gpu-node-label",
    "gpu_tolerations": "--gpu-toleration",
    "shm_size": "--shm-size",
    "ephemeral_volume": "--ephemeral-volume",
    "storage_class": "--storage-class",
    "eval_timeout": "--eval-timeout",
    "cpu_timeout": "--cpu-timeout",
}
MULTI_NODE_ONLY = {
    "machine_type": "--machine-type",
    "job_service_account": "--service-account",
    "job_encryption_key": "--encryption-key",
    "job_labels": "--labels",
}


def check_settings(target: str, settings: dict) -> None:
    """Refuse a compile setting the target cannot apply, or a value it cannot take, with one
    line naming the flag.

    Vertex AI Pipelines has no per-task timeout, spot scheduling, node selector or volume in
    the compiled spec: there `--train-timeout` / `--timeout` and `--spot` apply to the
    multi-node training job (`--nodes`), and the Kubernetes settings are refused. Accelerator
    names are the target's (deploy.checks.check_accelerator); CPU and byte sizes Kubernetes
    quantities. Raises ConfigError.
    """
    given = {k: v for k, v in settings.items() if v is not None and v is not False and v != ""}
    nodes = given.get("nodes") or 1
    if target == "vertex":
        for key, flag in KUBEFLOW_ONLY.items():
            if key in given:
                raise ConfigError(
                    f"{flag} is a Kubeflow setting: Vertex AI Pipelines has no such setting per "
                    "task in the compiled spec; compile with --target kubeflow"
                )
        for key, flag, what in (
            ("train_timeout", "--timeout/--train-timeout", "timeout"),
            ("spot", "--spot", "spot scheduling"),
        ):
            if key in given and nodes < 2:
                raise ConfigError(
                    f"{flag}: Vertex AI Pipelines sets no per-task {what} in the compiled "
                    "spec; on Vertex it applies to multi-node training (--nodes N)"
                )
    if nodes > 1 and target != "vertex":
        raise ConfigError(
            f"--nodes {nodes} runs training as a Vertex AI custom job; compile with --target vertex"
        )
    if nodes > 1 and not given.get("machine_type"):
        raise ConfigError(f"--nodes {nodes} needs --machine-type (e.g. a3-highgpu-8g)")
    if nodes < 2:
        for key, flag in MULTI_NODE_ONLY.items():
            if key in given:
                raise ConfigError(
                    f"{flag} is a setting of the multi-node training job: compile with "
                    "--target vertex --nodes N"
                )
    for key in ("accelerator_count", "eval_accelerator_count", "nodes"):
        if key in given and given[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} {given[key]}: at least 1")
    for key in ("parallelism", "retries"):
        if key in given and given[key] < 0:
            raise ConfigError(f"--{key} {given[key]}: 0 or more")
    if "accelerator_type" in given:
        check_accelerator(target, given["accelerator_type"])
    for key, flag in CPU_SETTINGS.items():
        if key in given:
            check_cpu(given[key], flag)
    for key, flag in BYTE_SETTINGS.items():
        if key in given:
            check_bytes(given[key], flag)


_DURATION = re.compile(r"(\d+)([smhd]?)")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | None, flag: str) -> int | None:
    """`--timeout 12h` as seconds: a whole number with an optional unit s, m, h or d.

    Raises ConfigError naming the flag and the value.
    """
    if text is None:
        return None
    found = _DURATION.fullmatch(text.strip())
    if not found or int(found.group(1)) == 0:
        raise ConfigError(f"{flag} {text}: expected a positive duration such as 90m, 12h or 2d")
    return int(found.group(1)) * _SECONDS[found.group(2)]


def parse_job_labels(text: str | None) -> str | None:
    """`--labels k=v,k2=v2` of the multi-node training job as a JSON object (sorted keys), as
    submit reads them. Raises ConfigError for an item that is not a Vertex AI label."""
    from deploy.parameters import parse_labels

    labels = parse_labels(text)
    return json.dumps(labels, sort_keys=True) if labels else None


def _limits(task: dsl.PipelineTask, cpu: str, memory: str) -> None:
    task.set_cpu_request(cpu).set_cpu_limit(cpu)
    task.set_memory_request(memory).set_memory_limit(memory)


def _on_kubernetes(
    task: dsl.PipelineTask, placement: Placement, timeout: int, holds_models: bool
) -> None:
    """The kfp-kubernetes settings of a kubeflow task: its timeout, and the ephemeral volume
    when it holds models (the launcher downloads its input models there)."""
    from kfp import kubernetes

    if timeout:
        kubernetes.set_timeout(task, timeout)
    if placement.ephemeral_volume and holds_models:
        kubernetes.add_ephemeral_volume(
            task,
            volume_name="scratch",
            mount_path=EPHEMERAL_PATH,
            access_modes=["ReadWriteOnce"],
            size=placement.ephemeral_volume,
            storage_class_name=placement.storage_class or None,
        )
        task.set_env_variable("DEMIX_CACHE", EPHEMERAL_CACHE)


def on_gpu(
    task: dsl.PipelineTask,
    placement: Placement,
    gpus: int | None = None,
    timeout: int | None = None,
) -> dsl.PipelineTask:
    """A task on `gpus` GPUs (default: the training count) with the given timeout (default:
    the training timeout), on the target's GPU nodes (kubeflow: the GPU node selector and
    tolerations). Every GPU task holds models: the ephemeral volume, when set, is its."""
    gpus = placement.accelerator_count if gpus is None else gpus
    timeout = placement.train_timeout if timeout is None else timeout
    with_image(task, placement)
    _limits(task, placement.cpu, placement.memory)
    task.set_accelerator_type(placement.accelerator_type).set_accelerator_limit(gpus)
    task.set_retry(num_retries=placement.retries, backoff_duration="60s", backoff_factor=2.0)
    if placement.target == "kubeflow":
        from kfp import kubernetes

        for key, value in placement.gpu_node_selector:
            kubernetes.add_node_selector(task, key, value)
        for toleration in placement.gpu_tolerations:
            kubernetes.add_toleration(
                task,
                key=toleration.key,
                operator=toleration.operator,
                value=toleration.value,
                effect=toleration.effect,
            )
        if placement.spot:
            kubernetes.add_node_selector(task, SPOT_LABEL, "true")
            kubernetes.add_toleration(
                task, key=SPOT_LABEL, operator="Equal", value="true", effect="NoSchedule"
            )
        if gpus > 1:
            kubernetes.empty_dir_mount(
                task, "dshm", SHM_PATH, medium="Memory", size_limit=placement.shm_size
            )
        _on_kubernetes(task, placement, timeout, holds_models=True)
    return task


def on_eval_gpu(task: dsl.PipelineTask, placement: Placement) -> dsl.PipelineTask:
    """An evaluation task: eval_accelerator_count GPUs (one by default; a shard uses one) and
    the evaluation timeout."""
    return on_gpu(task, placement, placement.eval_accelerator_count, placement.eval_timeout)


def training_inputs(placement: Placement) -> dict:
    """Inputs of the training components: one process per GPU (accelerate launch when there are
    several), and with nodes > 1 the Vertex AI custom job to run on (worker pools, service
    account, CMEK key, labels, timeout, spot)."""
    cluster = ""
    if placement.nodes > 1:
        from demix.distributed import vertex_worker_pools

        cluster = vertex_worker_pools(
            placement.nodes,
            placement.machine_type,
            placement.accelerator_type,
            placement.accelerator_count,
            placement.image_cuda,
            service_account=placement.job_service_account,
            encryption_key=placement.job_encryption_key,
            labels=json.loads(placement.job_labels or "{}"),
            timeout_s=placement.train_timeout,
            spot=placement.spot,
        )
    return {"processes": placement.accelerator_count, "cluster": cluster}


def on_training_gpus(task: dsl.PipelineTask, placement: Placement) -> dsl.PipelineTask:
    """GPU placement of a training task; with several machines the custom job holds the GPUs
    and the task only starts it and waits."""
    if placement.nodes > 1:
        return on_cpu(task, placement, holds_models=True)
    return on_gpu(task, placement)


def on_cpu(
    task: dsl.PipelineTask, placement: Placement, holds_models: bool = False
) -> dsl.PipelineTask:
    """A CPU task: cpu_task_cpu and cpu_task_memory, the CPU timeout, retries; the ephemeral
    volume only when it `holds_models` (merge): bookkeeping tasks read small files."""
    with_image(task, placement)
    _limits(task, placement.cpu_task_cpu, placement.cpu_task_memory)
    task.set_retry(num_retries=placement.retries, backoff_duration="30s", backoff_factor=2.0)
    if placement.target == "kubeflow":
        _on_kubernetes(task, placement, placement.cpu_timeout, holds_models)
    return task


def with_image(task: dsl.PipelineTask, placement: Placement) -> dsl.PipelineTask:
    """The task in the compile's image of its kind: CUDA for components built on CUDA_IMAGE."""
    cuda = task.container_spec.image in (CUDA_IMAGE, placement.image_cuda)
    return task.set_container_image(placement.image_cuda if cuda else placement.image)
