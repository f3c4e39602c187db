"""Where pipeline tasks run: GPU and CPU placement, retries and the training processes of a
compile target (kubeflow, vertex, local). Compile-time settings, never constants in the code."""

from __future__ import annotations

import dataclasses

from kfp import dsl

from components.image import CPU_IMAGE, CUDA_IMAGE
from demix.config import SearchConfig


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where GPU tasks run; compile-time settings of a target, never constants in the code."""

    target: str = "kubeflow"  # kubeflow | vertex | local
    accelerator_type: str = "nvidia.com/gpu"
    accelerator_count: int = 1
    gpu_node_label: str = "nvidia-h100-80gb"  # value of cloud.google.com/gke-accelerator
    cpu: str = "8"
    memory: str = "64G"
    retries: int = 2
    # Search rounds, unrolled into the DAG; the default is the config's (search.rounds).
    rounds: int = SearchConfig.model_fields["rounds"].default
    # Concurrent loop iterations (0: unlimited). Local runs use 1: two torch processes sharing
    # a few cores run far slower than one after the other.
    parallelism: int = 0
    # Training on several machines (vertex only): a Vertex AI custom job of `nodes` machines of
    # `machine_type`, each with accelerator_count GPUs of accelerator_type.
    nodes: int = 1
    machine_type: str = ""
    # The images tasks run in: components built on the CUDA image get image_cuda, others image.
    image: str = CPU_IMAGE
    image_cuda: str = CUDA_IMAGE

    @classmethod
    def for_target(cls, target: str, **overrides) -> Placement:
        defaults = {
            "vertex": {"accelerator_type": "NVIDIA_H100_80GB"},
            "local": {"parallelism": 1},
        }.get(target, {})
        return cls(
            target=target, **{**defaults, **{k: v for k, v in overrides.items() if v is not None}}
        )


def on_gpu(task: dsl.PipelineTask, placement: Placement) -> dsl.PipelineTask:
    with_image(task, placement)
    task.set_cpu_request(placement.cpu).set_memory_request(placement.memory)
    task.set_accelerator_type(placement.accelerator_type).set_accelerator_limit(
        placement.accelerator_count
    )
    task.set_retry(num_retries=placement.retries, backoff_duration="60s", backoff_factor=2.0)
    if placement.target == "kubeflow":
        from kfp import kubernetes

        kubernetes.add_node_selector(
            task, "cloud.google.com/gke-accelerator", placement.gpu_node_label
        )
        kubernetes.add_toleration(
            task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"
        )
    return task


def training_inputs(placement: Placement) -> dict:
    """Inputs of the training components: one process per GPU (accelerate launch when there are
    several), and with nodes > 1 the worker pools of the Vertex AI custom job to run on."""
    cluster = ""
    if placement.nodes > 1:
        from demix.distributed import vertex_worker_pools

        cluster = vertex_worker_pools(
            placement.nodes,
            placement.machine_type,
            placement.accelerator_type,
            placement.accelerator_count,
            placement.image_cuda,
        )
    return {"processes": placement.accelerator_count, "cluster": cluster}


def on_training_gpus(task: dsl.PipelineTask, placement: Placement) -> dsl.PipelineTask:
    """GPU placement of a training task; with several machines the custom job holds the GPUs
    and the task only starts it and waits."""
    return on_cpu(task, placement) if placement.nodes > 1 else on_gpu(task, placement)


def on_cpu(task: dsl.PipelineTask, placement: Placement) -> dsl.PipelineTask:
    with_image(task, placement)
    task.set_cpu_request("2").set_memory_request("8G")
    task.set_retry(num_retries=placement.retries, backoff_duration="30s", backoff_factor=2.0)
    return task


def with_image(task: dsl.PipelineTask, placement: Placement) -> dsl.PipelineTask:
    """The task in the compile's image of its kind: CUDA for components built on CUDA_IMAGE."""
    cuda = task.container_spec.image in (CUDA_IMAGE, placement.image_cuda)
    return task.set_container_image(placement.image_cuda if cuda else placement.image)
