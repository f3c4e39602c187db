"""Resources that take effect: the compiled spec of each target read back for limits, /dev/shm,
evaluation GPUs, timeouts, spot nodes, the ephemeral volume and loop parallelism; the
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
from demix.distributed import LaunchError, run_vertex_job
from deploy.placement import parse_duration

from .test_pipeline import offline_vertex_job

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ("exec-train-model", "exec-train-model-2", "exec-train-final")
EVALUATION = ("exec-evaluate-proxies", "exec-evaluate-proxies-2", "exec-evaluate-final")
VALIDATE = "exec-validate-fidelity"
CPU_TASKS = ("exec-resolve-config", "exec-plan-curation", "exec-curate-group", "exec-merge")
KEY = "projects/p/locations/us-central1/keyRings/k/cryptoKeys/c"
ACCOUNT = "trainer@p.iam.gserviceaccount.com"


def _compile(out: Path, *flags: str) -> list[dict]:
    assert pipeline.main(["compile", "--out", str(out), *flags]) == 0
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


def test_ephemeral_volume_at_gcs_with_the_storage_class_on_every_task(specs):
    platform, containers = _kubernetes(specs["full"]), _containers(specs["full"])
    assert set(platform) == set(containers)
    for executor, settings in platform.items():
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
    task = docs[0]["root"]["dag"]["tasks"]["train-model"]
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
    ],
)
def test_compile_refuses_a_setting_the_target_cannot_apply(tmp_path, capsys, flags, expected):
    assert pipeline.main(["compile", "--out", str(tmp_path / "x.yaml"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "x.yaml").exists()


def test_durations():
    assert parse_duration("45", "--timeout") == 45
    assert parse_duration("90m", "--timeout") == 5400
    assert parse_duration("12h", "--timeout") == 43200
    assert parse_duration("2d", "--timeout") == 172800
    assert parse_duration(None, "--timeout") is None
