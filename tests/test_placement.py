"""Resources that take effect: the compiled spec of each target read back for limits, /dev/shm,
evaluation GPUs, timeouts, GPU node selectors and tolerations, spot nodes, the ephemeral
volume and loop parallelism; what compile refuses (one line, exit 2, nothing written); the
multi-node Vertex AI training job (mocked) for its settings, console link and cancellation."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from pathlib import Path
from unittest import mock

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

import pipeline
from components.image import CPU_IMAGE
from demix.distributed import LaunchError, run_vertex_job
from demix.errors import ConfigError
from deploy.checks import (
    KUBERNETES_ACCELERATORS,
    check_accelerator,
    check_bytes,
    check_cpu,
    vertex_accelerators,
)
from deploy.placement import parse_duration

from .test_pipeline import offline_vertex_job

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ("exec-train-model", "exec-train-model-2", "exec-train-final")
EVALUATION = ("exec-evaluate-proxies", "exec-evaluate-proxies-2", "exec-evaluate-final")
VALIDATE = "exec-validate-fidelity"
CPU_TASKS = ("exec-resolve-config", "exec-plan-curation", "exec-curate-group", "exec-merge")
# Tasks that hold models (the ephemeral volume's) and bookkeeping tasks (small files only).
MODEL_TASKS = (*TRAINING, *EVALUATION, "exec-evaluate-proxies-3", VALIDATE, "exec-merge")
BOOKKEEPING = (
    *("exec-resolve-config", "exec-dataset-names", "exec-collect-models", "exec-predict"),
    *("exec-predict-4", "exec-export-mixture", "exec-final-runs"),
)
KEY = "projects/p/locations/us-central1/keyRings/k/cryptoKeys/c"
ACCOUNT = "trainer@p.iam.gserviceaccount.com"


def _compile(out: Path, *flags: str) -> list[dict]:
    assert pipeline.main(["compile", "--out", str(out), "--allow-local-images", *flags]) == 0
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())  # still a PipelineSpec
    if len(docs) > 1:
        json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())
    return docs


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict[str, list[dict]]:
    """Kubeflow with every setting, Kubeflow with the defaults, Vertex multi-node."""
    out = tmp_path_factory.mktemp("placement")
    full = _compile(
        out / "full.yaml",
        *("--target", "kubeflow", "--accelerator-count", "4", "--cpu", "12"),
        *("--memory", "96G", "--cpu-task-cpu", "4", "--cpu-task-memory", "16G"),
        *("--shm-size", "32Gi", "--timeout", "2d", "--train-timeout", "12h"),
        *("--eval-timeout", "90m", "--parallelism", "3", "--spot"),
        *("--ephemeral-volume", "500Gi", "--storage-class", "premium-rwo"),
    )
    plain = _compile(out / "plain.yaml", "--target", "kubeflow")
    vertex = _compile(
        out / "vertex.yaml",
        *("--target", "vertex", "--nodes", "2", "--machine-type", "a3-highgpu-8g"),
        *("--accelerator-count", "8", "--eval-accelerator-count", "2", "--memory", "200G"),
        *("--timeout", "1d", "--spot", "--service-account", ACCOUNT),
        *("--encryption-key", KEY, "--labels", "team=ml,cost-center=research"),
    )
    return {"full": full, "plain": plain, "vertex": vertex, "vertex_path": out / "vertex.yaml"}


def _containers(docs) -> dict[str, dict]:
    return {k: v["container"] for k, v in docs[0]["deploymentSpec"]["executors"].items()}


def _kubernetes(docs) -> dict[str, dict]:
    return docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _gpus(container: dict) -> int:
    return int(container["resources"].get("accelerator", {}).get("resourceCount", 0))


def test_cpu_and_memory_limits_equal_the_requests_on_every_task(specs):
    for name, (cpu, memory, cpu_task_cpu, cpu_task_memory) in {
        "full": ("12", "96G", "4", "16G"),
        "plain": ("8", "64G", "2", "8G"),
    }.items():
        containers = _containers(specs[name])
        for executor, container in containers.items():
            resources = container["resources"]
            gpu = _gpus(container) > 0
            assert resources["resourceCpuLimit"] == (cpu if gpu else cpu_task_cpu), executor
            assert resources["resourceMemoryLimit"] == (memory if gpu else cpu_task_memory)
            assert resources["resourceCpuRequest"] == resources["resourceCpuLimit"]
            assert resources["resourceMemoryRequest"] == resources["resourceMemoryLimit"]
        assert all(_gpus(containers[e]) > 0 for e in (*TRAINING, *EVALUATION, VALIDATE))
    # Vertex sizes its machines from the limits: the evaluation tasks ask for their own GPUs
    containers = _containers(specs["vertex"])
    assert containers["exec-evaluate-proxies"]["resources"]["resourceMemoryLimit"] == "200G"
    assert containers["exec-train-model"]["resources"]["resourceCpuLimit"] == "2"  # waits only


def test_evaluation_takes_its_own_gpu_count_and_training_the_training_count(specs):
    full, vertex = _containers(specs["full"]), _containers(specs["vertex"])
    assert {_gpus(full[e]) for e in TRAINING} == {4}
    assert {_gpus(full[e]) for e in (*EVALUATION, VALIDATE)} == {1}  # a shard uses one GPU
    assert {_gpus(vertex[e]) for e in (*EVALUATION, VALIDATE)} == {2}
    assert {_gpus(vertex[e]) for e in TRAINING} == {0}  # the custom job holds the GPUs


def test_memory_backed_shm_on_multi_gpu_tasks_only(specs):
    platform = _kubernetes(specs["full"])
    for executor in TRAINING:
        assert platform[executor]["emptyDirMounts"] == [
            {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "32Gi"}
        ]
    for executor in (*EVALUATION, VALIDATE, *CPU_TASKS):
        assert "emptyDirMounts" not in platform[executor], executor
    plain = _kubernetes(specs["plain"])  # one GPU per training task: no shm needed
    assert not any("emptyDirMounts" in settings for settings in plain.values())


def test_timeouts_by_kind_are_the_pods_deadlines(specs):
    platform = _kubernetes(specs["full"])
    deadlines = {k: int(v.get("activeDeadlineSeconds", 0)) for k, v in platform.items()}
    assert {deadlines[e] for e in TRAINING} == {12 * 3600}
    assert deadlines[VALIDATE] == 12 * 3600  # it trains reference models
    assert {deadlines[e] for e in EVALUATION} == {90 * 60}
    assert {deadlines[e] for e in CPU_TASKS} == {2 * 86400}  # --timeout for the rest
    assert set(deadlines) == set(_containers(specs["full"]))  # every task has one
    assert not any("activeDeadlineSeconds" in v for v in _kubernetes(specs["plain"]).values())


def test_spot_selector_and_toleration_on_gpu_tasks(specs):
    platform = _kubernetes(specs["full"])
    for executor in (*TRAINING, *EVALUATION, VALIDATE):
        settings = platform[executor]
        assert settings["nodeSelector"]["labels"] == {
            "cloud.google.com/gke-accelerator": "nvidia-h100-80gb",
            "cloud.google.com/gke-spot": "true",
        }
        assert {
            "key": "cloud.google.com/gke-spot",
            "operator": "Equal",
            "value": "true",
            "effect": "NoSchedule",
        } in settings["tolerations"]
    for settings in _kubernetes(specs["plain"]).values():
        assert "cloud.google.com/gke-spot" not in json.dumps(settings)


GKE_H100 = {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
NVIDIA_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
GPU_TASKS = (*TRAINING, *EVALUATION, VALIDATE)


def test_gpu_node_selector_and_tolerations_default_to_gkes_and_are_settable(specs, tmp_path):
    for executor in GPU_TASKS:  # the default: GKE's H100 pools and the taint GKE puts on GPUs
        settings = _kubernetes(specs["plain"])[executor]
        assert settings["nodeSelector"]["labels"] == GKE_H100
        assert settings["tolerations"] == [NVIDIA_TAINT]
    docs = _compile(
        tmp_path / "own.yaml",
        *("--accelerator-type", "amd.com/gpu", "--timeout", "1h"),
        *("--gpu-node-selector", "node.example.com/gpu=mi300x"),
        *("--gpu-node-selector", "pool=training"),
        *(
            "--gpu-toleration",
            "dedicated=ml:NoSchedule",
            "--gpu-toleration",
            "amd.com/gpu:NoExecute",
        ),
    )
    platform, containers = _kubernetes(docs), _containers(docs)
    gpu = {e for e, container in containers.items() if _gpus(container)}
    assert gpu >= set(GPU_TASKS)
    for executor in gpu:
        assert platform[executor]["nodeSelector"]["labels"] == {
            "node.example.com/gpu": "mi300x",
            "pool": "training",
        }
        assert platform[executor]["tolerations"] == [
            {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
            {"key": "amd.com/gpu", "operator": "Exists", "effect": "NoExecute"},
        ]
        assert containers[executor]["resources"]["accelerator"]["resourceType"] == "amd.com/gpu"
    for executor in set(containers) - gpu:  # CPU tasks go anywhere
        assert "nodeSelector" not in platform[executor] and "tolerations" not in platform[executor]

    shorthand = _kubernetes(_compile(tmp_path / "l.yaml", "--gpu-node-label", "nvidia-l4"))
    assert shorthand["exec-train-model"]["nodeSelector"]["labels"] == {
        "cloud.google.com/gke-accelerator": "nvidia-l4"
    }
    assert shorthand["exec-train-model"]["tolerations"] == [NVIDIA_TAINT]
    docs = _compile(
        tmp_path / "none.yaml",
        *("--gpu-node-selector", "none", "--gpu-toleration", "none", "--timeout", "1h"),
    )
    for executor, settings in _kubernetes(docs).items():
        assert "nodeSelector" not in settings and "tolerations" not in settings, executor


def test_compile_says_where_gpu_pods_would_stay_pending(tmp_path, capsys):
    """The default selector is GKE's H100 pools: compile says so on standard error (Kubernetes
    has no scheduling timeout a pipeline can set, so a pod no node fits waits)."""
    _compile(tmp_path / "d.yaml")
    (note,) = capsys.readouterr().err.splitlines()
    assert note.startswith("pipeline.py: note: GPU tasks require nodes labelled ")
    assert "cloud.google.com/gke-accelerator=nvidia-h100-80gb" in note
    _compile(tmp_path / "s.yaml", "--gpu-node-selector", "pool=gpu")
    _compile(tmp_path / "v.yaml", "--target", "vertex")
    assert capsys.readouterr().err == ""


def test_ephemeral_volume_at_gcs_with_the_storage_class_on_tasks_that_hold_models(specs):
    platform, containers = _kubernetes(specs["full"]), _containers(specs["full"])
    assert set(platform) == set(containers)  # every task has its timeout
    held = {e for e, settings in platform.items() if "genericEphemeralVolume" in settings}
    assert held == set(MODEL_TASKS)
    assert not held & set(BOOKKEEPING)
    for executor in sorted(set(containers) - held):
        assert "DEMIX_CACHE" not in json.dumps(containers[executor].get("env", [])), executor
    for executor in sorted(held):
        settings = platform[executor]
        assert settings["genericEphemeralVolume"] == [
            {
                "volumeName": "scratch",
                "mountPath": "/gcs",
                "accessModes": ["ReadWriteOnce"],
                "size": "500Gi",
                "storageClassName": "premium-rwo",
            }
        ], executor
        # the storage layer's mirror of gs:// inputs goes on the volume too
        assert {"name": "DEMIX_CACHE", "value": "/gcs/.demix-cache"} in containers[executor]["env"]
    assert not any("genericEphemeralVolume" in v for v in _kubernetes(specs["plain"]).values())


def _loops(docs) -> dict[str, int]:
    """{display name of each ParallelFor: its parallelism limit (0: none)}."""
    found = {}

    def walk(dag):
        for task in dag.get("tasks", {}).values():
            name = task["componentRef"]["name"]
            component = docs[0]["components"][name]
            if "parameterIterator" in task or "artifactIterator" in task:
                limit = task.get("iteratorPolicy", {}).get("parallelismLimit", 0)
                found[task["taskInfo"]["name"]] = limit
            if "dag" in component:
                walk(component["dag"])

    walk(docs[0]["root"]["dag"])
    return found


def test_parallelism_caps_the_gpu_loops_only(specs):
    loops = _loops(specs["full"])
    assert loops == {
        "curate / groups": 0,
        "train components": 3,
        "round 0 / proxies": 3,
        "round 1 / proxies": 3,
        "round 2 / proxies": 3,
        "train finals": 3,
    }
    assert set(_loops(specs["plain"]).values()) == {0}


def _cluster(docs) -> dict:
    """The cluster input of the base's training task (in the models sub-graph)."""
    dags = [
        docs[0]["root"]["dag"],
        *(c["dag"] for c in docs[0]["components"].values() if "dag" in c),
    ]
    (task,) = [dag["tasks"]["train-model"] for dag in dags if "train-model" in dag["tasks"]]
    return json.loads(task["inputs"]["parameters"]["cluster"]["runtimeValue"]["constant"])


def test_vertex_multi_node_job_settings_and_an_offline_pipeline_job(specs):
    assert len(specs["vertex"]) == 1
    assert _cluster(specs["vertex"])["job"] == {
        "service_account": ACCOUNT,
        "encryption_key": KEY,
        "labels": {"cost-center": "research", "team": "ml"},
        "timeout_s": 86400,
        "spot": True,
    }
    offline_vertex_job(specs["vertex_path"])


NAME = "projects/p/locations/us-central1/customJobs/123"
CONSOLE = (
    "https://console.cloud.google.com/vertex-ai/locations/us-central1/training/123/cpu?project=p"
)


@pytest.fixture
def custom_job(monkeypatch):
    """aiplatform.CustomJob mocked; the task's environment carries the run's labels."""
    monkeypatch.setenv(
        "VERTEX_AI_PIPELINES_RUN_LABELS",
        json.dumps({"vertex-ai-pipelines-run-billing-id": "42", "team": "other"}),
    )
    with mock.patch("google.cloud.aiplatform.CustomJob") as job:
        job.return_value.display_name = "demix-model"
        job.return_value.resource_name = NAME
        yield job


ARGV = ["train", "/gcs/b/run/model.launch.yaml", "--out", "/gcs/b/run/model"]


def test_the_training_job_runs_with_the_runs_identity_key_labels_and_timeout(
    specs, custom_job, caplog, monkeypatch
):
    from google.cloud.aiplatform.compat.types import custom_job as types

    monkeypatch.setattr(logging.getLogger("demix"), "propagate", True)  # to caplog
    cluster = json.dumps(_cluster(specs["vertex"]))
    with caplog.at_level(logging.INFO, logger="demix"):
        run_vertex_job(cluster, ARGV, 8, Path("/gcs/b/run/model"))
    kwargs = custom_job.call_args.kwargs
    assert kwargs["encryption_spec_key_name"] == KEY
    assert kwargs["labels"] == {  # the run's labels, the compiled ones winning
        "vertex-ai-pipelines-run-billing-id": "42",
        "team": "ml",
        "cost-center": "research",
    }
    assert kwargs["base_output_dir"] == "gs://b/run/model.job"
    custom_job.return_value.submit.assert_called_once_with(
        service_account=ACCOUNT, timeout=86400, scheduling_strategy=types.Scheduling.Strategy.SPOT
    )
    custom_job.return_value.wait_for_completion.assert_called_once_with()
    custom_job.return_value.cancel.assert_not_called()
    assert CONSOLE in caplog.text  # the console link, in the task's log


def test_the_training_job_is_cancelled_when_its_task_is_stopped(specs, custom_job):
    def stopped():  # the pipeline task cancelled: its pod gets SIGTERM while it waits
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

    custom_job.return_value.wait_for_completion.side_effect = stopped
    before = signal.getsignal(signal.SIGTERM)
    cluster = json.dumps(_cluster(specs["vertex"]))
    with pytest.raises(LaunchError, match=f"cancelled: {re.escape(CONSOLE)}"):
        run_vertex_job(cluster, ARGV, 8, Path("/gcs/b/run/model"))
    custom_job.return_value.cancel.assert_called_once_with()
    assert signal.getsignal(signal.SIGTERM) is before

    custom_job.return_value.cancel.reset_mock()
    custom_job.return_value.wait_for_completion.side_effect = KeyboardInterrupt
    with pytest.raises(LaunchError, match="cancelled"):
        run_vertex_job(cluster, ARGV, 8, Path("/gcs/b/run/model"))
    custom_job.return_value.cancel.assert_called_once_with()

    custom_job.return_value.wait_for_completion.side_effect = RuntimeError("Job failed with: OOM")
    with pytest.raises(LaunchError, match=f"failed \\({re.escape(CONSOLE)}\\): Job failed"):
        run_vertex_job(cluster, ARGV, 8, Path("/gcs/b/run/model"))


def test_submit_refuses_other_job_settings_than_the_compiled_ones(specs, capsys):
    base = ["submit", "--package", str(specs["vertex_path"]), "--vertex", "--project", "p"]
    base += ["--region", "us-central1", "--pipeline-root", "gs://b/root"]
    base += ["--config", str(ROOT / "configs" / "demo.yaml")]
    same = ["--service-account", ACCOUNT, "--encryption-key", KEY]
    same += ["--labels", "cost-center=research,team=ml"]
    with mock.patch("google.cloud.aiplatform.PipelineJob") as job:
        job.return_value.resource_name = "projects/p/locations/us-central1/pipelineJobs/demix-1"
        assert pipeline.main(base + same) == 0
        job.reset_mock()
        for changed, flag in (
            (["--service-account", "other@p.iam.gserviceaccount.com"], "--service-account"),
            (["--labels", "team=ml"], "--labels"),
        ):
            capsys.readouterr()
            argv = base + same + changed  # a later flag wins in argparse
            assert pipeline.main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"{flag}: the package's multi-node" in err, err
        assert pipeline.main(base) == 2  # none given: the job would run as another identity
    job.assert_not_called()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--target", "vertex", "--spot"], "--spot: Vertex AI Pipelines sets no per-task spot"),
        (["--target", "vertex", "--timeout", "2h"], "on Vertex it applies to multi-node"),
        (["--target", "vertex", "--eval-timeout", "2h"], "--eval-timeout is a Kubeflow setting"),
        (["--target", "vertex", "--ephemeral-volume", "1Ti"], "--ephemeral-volume is a Kube"),
        (["--target", "vertex", "--shm-size", "1Gi"], "--shm-size is a Kubeflow setting"),
        (["--target", "kubeflow", "--service-account", ACCOUNT], "--service-account is a set"),
        (["--target", "kubeflow", "--nodes", "2"], "compile with --target vertex"),
        (["--target", "vertex", "--nodes", "2"], "needs --machine-type"),
        (["--target", "kubeflow", "--timeout", "soon"], "--timeout soon: expected a positive"),
        (["--target", "kubeflow", "--train-timeout", "0h"], "--train-timeout 0h: expected"),
        (["--target", "kubeflow", "--eval-accelerator-count", "0"], "at least 1"),
        (["--target", "kubeflow", "--parallelism", "-1"], "--parallelism -1: 0 or more"),
        # images a cluster cannot pull
        pytest.param(
            [],
            f"--image {CPU_IMAGE} (the default): an image under localhost/",
            marks=pytest.mark.skipif(
                not CPU_IMAGE.startswith("localhost/"), reason="DEMIX_IMAGE_REPO is set"
            ),
        ),
        (["--image", "localhost/demix:1-cpu", "--image-cuda", "reg/demix:1"], "--image local"),
        (["--image", "reg/demix:1", "--image-cuda", "localhost/d:1"], "--image-cuda localhost/"),
        # Kubernetes quantities
        (["--memory", "64GB"], "--memory 64GB: not a Kubernetes quantity; say 64G or 64Gi"),
        (["--cpu", "abc"], "--cpu abc: not a Kubernetes CPU quantity; give cores (8, 0.5) or"),
        (["--cpu-task-cpu", "0"], "--cpu-task-cpu 0: not a Kubernetes CPU quantity"),
        (["--cpu-task-memory", "8gb"], "--cpu-task-memory 8gb: not a Kubernetes quantity; say 8G"),
        (["--shm-size", "16GiB"], "--shm-size 16GiB: not a Kubernetes quantity; say 16G or 16Gi"),
        (["--ephemeral-volume", "500"], "--ephemeral-volume 500 is less than 1Mi bytes"),
        (["--memory", "1.5Gi"], "--memory 1.5Gi: not a Kubernetes quantity; give a whole number"),
        # accelerator names of the other backend, or of none
        (["--accelerator-type", "NVIDIA_H100_80GB"], "NVIDIA_H100_80GB is a Vertex AI accelerator"),
        (["--accelerator-type", "h100"], "h100 is not a Kubernetes extended resource name"),
        (["--accelerator-type", "kubernetes.io/gpu"], "is not a Kubernetes extended resource"),
        (["--target", "vertex", "--accelerator-type", "nvidia.com/gpu"], "is a Kubernetes reso"),
        (["--target", "vertex", "--accelerator-type", "NVIDIA_H100"], "not a Vertex AI accel"),
        # GPU node selectors and tolerations
        (["--gpu-node-selector", "pool"], "--gpu-node-selector pool: give KEY=VALUE"),
        (["--gpu-node-selector", "a=b c"], "'b c' is not a Kubernetes label value"),
        (["--gpu-node-selector", "Ex.com/x=y"], "'Ex.com/x' is not a Kubernetes label key"),
        (["--gpu-node-selector", "none", "--gpu-node-selector", "a=b"], "none means no node"),
        (["--gpu-node-label", "x", "--gpu-node-selector", "a=b"], "give --gpu-node-selector alone"),
        (["--gpu-toleration", "k=v:Never"], "EFFECT one of NoSchedule, PreferNoSchedule, NoEx"),
        (["--gpu-toleration", "dedicated"], "--gpu-toleration dedicated: give KEY=VALUE:EFFECT"),
        (["--target", "vertex", "--gpu-node-selector", "a=b"], "--gpu-node-selector/--gpu-node"),
        (["--target", "vertex", "--gpu-toleration", "k:NoSchedule"], "--gpu-toleration is a Kub"),
    ],
)
def test_compile_refuses_a_setting_the_target_cannot_apply(tmp_path, capsys, flags, expected):
    assert pipeline.main(["compile", "--out", str(tmp_path / "x.yaml"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "x.yaml").exists()


def test_accelerator_names_per_target():
    """Vertex AI takes its AcceleratorType names (read from google-cloud-aiplatform), Kubeflow
    the extended resource names device plugins advertise; each refuses the other's."""
    vertex = vertex_accelerators()
    assert {"NVIDIA_TESLA_T4", "NVIDIA_L4", "NVIDIA_TESLA_A100", "NVIDIA_A100_80GB"} <= set(vertex)
    assert {"NVIDIA_H100_80GB", "NVIDIA_H100_MEGA_80GB", "NVIDIA_H200_141GB"} <= set(vertex)
    assert {"NVIDIA_B200", "TPU_V5_LITEPOD"} <= set(vertex)
    assert "ACCELERATOR_TYPE_UNSPECIFIED" not in vertex
    for name in vertex:
        assert check_accelerator("vertex", name) == name
        with pytest.raises(ConfigError, match="is a Vertex AI accelerator name"):
            check_accelerator("kubeflow", name)
    for name in (*KUBERNETES_ACCELERATORS, "nvidia.com/mig-1g.10gb"):
        assert check_accelerator("kubeflow", name) == name
        with pytest.raises(ConfigError, match="is a Kubernetes resource name"):
            check_accelerator("vertex", name)


def test_kubernetes_quantities():
    for text in ("8", "0.5", ".5", "500m", "96"):
        assert check_cpu(text, "--cpu") == text
    for text in ("abc", "0", "0m", "-1", "1.5m", "8 cores", ""):
        with pytest.raises(ConfigError, match="not a Kubernetes CPU quantity"):
            check_cpu(text, "--cpu")
    for text in ("64G", "64Gi", "500Gi", "1Mi", "1048576", "2T", "1Ei"):
        assert check_bytes(text, "--memory") == text
    for text, said in {
        "64GB": "say 64G or 64Gi",
        "64gb": "say 64G or 64Gi",
        "64gi": "say 64G or 64Gi",
        "512KB": "say 512Ki",
        "1.5Gi": "give a whole number",
        "64": "less than 1Mi bytes",
        "0Gi": "less than 1Mi bytes",
        "-1Gi": "give a whole number",
        "abc": "give a whole number",
        "1k": "say 1Ki",
    }.items():
        with pytest.raises(ConfigError, match=said):
            check_bytes(text, "--memory")


def test_durations():
    assert parse_duration("45", "--timeout") == 45
    assert parse_duration("90m", "--timeout") == 5400
    assert parse_duration("12h", "--timeout") == 43200
    assert parse_duration("2d", "--timeout") == 172800
    assert parse_duration(None, "--timeout") is None
