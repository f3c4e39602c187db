"""The KFP pipeline: compiled structure for both targets, offline Vertex job, mocked submit,
components called directly, and a real local run that matches `demix run`."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import yaml
from google.protobuf import json_format
from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model
from kfp.pipeline_spec import pipeline_spec_pb2

import pipeline
from components.dataset_names import dataset_names
from components.image import CPU_IMAGE, CUDA_IMAGE
from components.predict import predict
from components.resolve_config import resolve_config
from demix.cli import main as demix_main
from demix.config import config_yaml, parse_config
from demix.errors import ConfigError
from demix.report import print_summary

from .conftest import smoke_config_dict

ROOT = Path(__file__).resolve().parents[1]
STAGES = {
    "plan-curation",
    "curate-group",
    "curate-data",
    "train-model",
    "merge",
    "evaluate-proxies",
    "predict",
    "train-final",
    "evaluate-final",
}
GPU_EXECUTORS = (
    "exec-train-model",
    "exec-evaluate-proxies",
    "exec-train-final",
    "exec-evaluate-final",
    "exec-validate-fidelity",
)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled")
    kubeflow = pipeline.compile_pipeline(
        "kubeflow",
        out / "kubeflow.yaml",
        allow_local_images=True,
        accelerator_count=2,
        gpu_node_selector=(("cloud.google.com/gke-accelerator", "nvidia-h200-141gb"),),
    )
    vertex = pipeline.compile_pipeline(
        "vertex", out / "vertex.yaml", allow_local_images=True, accelerator_type="NVIDIA_H100_80GB"
    )
    return kubeflow, vertex


def _spec(path: Path) -> tuple[pipeline_spec_pb2.PipelineSpec, list[dict]]:
    docs = list(yaml.safe_load_all(path.read_text()))
    spec = pipeline_spec_pb2.PipelineSpec()
    json_format.ParseDict(docs[0], spec)
    return spec, docs


def _tasks(spec) -> dict[str, tuple]:
    """Every task of the compiled pipeline by its path (task keys from the root down, joined
    by '/', through sub-graphs, loops and conditions): (task, the path of the task whose DAG
    holds it, or None at the root)."""
    found = {}

    def walk(dag, prefix: str, parent: str | None):
        for key, task in dag.tasks.items():
            found[prefix + key] = (task, parent)
            component = spec.components[task.component_ref.name]
            if component.WhichOneof("implementation") == "dag":
                walk(component.dag, f"{prefix}{key}/", prefix + key)

    walk(spec.root.dag, "", None)
    return found


def _all_tasks(spec) -> dict:
    """Every task of the compiled DAG by its path, through sub-graphs, loops and conditions."""
    return {path: task for path, (task, _) in _tasks(spec).items()}


def _task_names(spec) -> set[str]:
    return {re.sub(r"-\d+$", "", path.rsplit("/", 1)[-1]) for path in _tasks(spec)}


def _path(spec, key: str) -> str:
    """The path of the one task whose key is `key`."""
    paths = [path for path in _tasks(spec) if path.rsplit("/", 1)[-1] == key]
    assert len(paths) == 1, (key, paths)
    return paths[0]


def _task(spec, key: str):
    return _all_tasks(spec)[_path(spec, key)]


def _dag_of(path: str) -> str:
    return path.rsplit("/", 1)[0] + "/" if "/" in path else ""


def _output_source(spec, path: str, key: str, kind: str = "artifacts") -> tuple[str, str]:
    """The container task (path) and output key behind output `key` of the task at `path`,
    down through the DAG outputs of sub-graphs and loops."""
    task = _all_tasks(spec)[path]
    component = spec.components[task.component_ref.name]
    if component.WhichOneof("implementation") != "dag":
        return path, key
    if kind == "artifacts":
        selector = component.dag.outputs.artifacts[key].artifact_selectors[0]
        inner, inner_key = selector.producer_subtask, selector.output_artifact_key
    else:
        selector = component.dag.outputs.parameters[key].value_from_parameter
        inner, inner_key = selector.producer_subtask, selector.output_parameter_key
    return _output_source(spec, f"{path}/{inner}", inner_key, kind)


def _source(spec, path: str, name: str, kind: str = "artifacts") -> tuple[str, str]:
    """The container task (path) and output key that feed input `name` (an artifact, or a
    parameter with kind="parameters") of the task at `path`: up through the inputs of the DAGs
    that hold it, down through the outputs of the sub-graphs that produce it."""
    task, parent = _tasks(spec)[path]
    given = getattr(task.inputs, kind)[name]
    component_input = f"component_input_{kind[:-1]}"
    if given.HasField(component_input):
        return _source(spec, parent, getattr(given, component_input), kind)
    output = given.task_output_artifact if kind == "artifacts" else given.task_output_parameter
    key = output.output_artifact_key if kind == "artifacts" else output.output_parameter_key
    return _output_source(spec, _dag_of(path) + output.producer_task, key, kind)


def test_kubeflow_target_structure(compiled):
    spec, docs = _spec(compiled[0])
    assert len(docs) == 2
    assert _task_names(spec) >= STAGES
    # fan-outs: curation groups, components, 3 search rounds, finals
    loops = [p for p in _tasks(spec) if p.rsplit("/", 1)[-1].startswith("for-loop")]
    assert len(loops) == 1 + 1 + 3 + 1
    executors = spec.deployment_spec["executors"]
    for name in GPU_EXECUTORS:
        resources = executors[name]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        # training on --accelerator-count GPUs; an evaluation shard on one
        training = name.startswith("exec-train-")
        assert resources["accelerator"]["resourceCount"] == ("2" if training else "1")
        assert executors[name]["container"]["image"] == CUDA_IMAGE
    for name in ("exec-plan-curation", "exec-curate-group", "exec-curate-data"):
        assert executors[name]["container"]["image"] == CPU_IMAGE
        assert "accelerator" not in executors[name]["container"]["resources"]
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in GPU_EXECUTORS:
        assert platform[name]["nodeSelector"]["labels"] == {
            "cloud.google.com/gke-accelerator": "nvidia-h200-141gb"
        }
        assert platform[name]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert _task(spec, "train-model").retry_policy.max_retry_count == 2


def test_the_pipeline_is_composed_of_sub_graphs(compiled):
    """Curation, the models, the search and the finals are each one node of the top level
    (a sub-graph to open in the UI); the top level holds only the config, the export, the
    optional check and the list of final runs besides them."""
    for path in compiled:
        spec, _ = _spec(path)
        top = {
            key: spec.components[task.component_ref.name].WhichOneof("implementation")
            for key, task in spec.root.dag.tasks.items()
        }
        assert top == {
            "read-inputs": "executor_label",
            "resolve-config": "executor_label",
            "curate": "dag",
            "models": "dag",
            "search": "dag",
            "export-mixture": "executor_label",
            "condition-1": "dag",
            "final-runs": "executor_label",
            "finals": "dag",
        }
        inside = {
            graph: {k.rsplit("/", 1)[-1] for k in _tasks(spec) if k.startswith(graph + "/")}
            for graph in ("curate", "models", "search", "finals")
        }
        assert {"plan-curation", "curate-group", "curate-data"} <= inside["curate"]
        assert {"train-model", "train-model-2", "collect-models"} <= inside["models"]
        assert {"predict", "evaluate-proxies", "predict-4"} <= inside["search"]
        assert {"merge", "train-final", "evaluate-final"} <= inside["finals"]


def test_every_sub_graph_takes_a_parameter(compiled):
    """kfp.local 2.17.3 drops the artifact inputs of a nested pipeline task without a parameter
    input (deploy/graphs.py): each sub-graph keeps at least one, so `run-local` runs it."""
    for path in compiled:
        spec, _ = _spec(path)
        graphs = [
            (key, task)
            for key, task in spec.root.dag.tasks.items()
            if spec.components[task.component_ref.name].WhichOneof("implementation") == "dag"
            and not task.trigger_policy.condition  # the validate branch: a condition, no graph
        ]
        assert {key for key, _ in graphs} == {"curate", "models", "search", "finals"}
        for key, task in graphs:
            assert task.inputs.parameters, f"sub-graph {key} has no parameter input"


def test_evaluate_finals_declares_no_component_weights(compiled):
    """evaluate finals reads the components' norms from their manifests through the index:
    on Kubeflow the launcher downloads every declared model, K of them for nothing."""
    for path in compiled:
        spec, _ = _spec(path)
        at = _path(spec, "evaluate-final")
        artifacts = _task(spec, "evaluate-final").inputs.artifacts
        assert set(artifacts) == {
            "config", "data", "base", "component_index", "finals", "selection",
        }  # fmt: skip
        index_path = _path(spec, "collect-models")
        assert _source(spec, at, "component_index") == (index_path, "index")
        finals = artifacts["finals"].task_output_artifact.producer_task
        loop = _all_tasks(spec)[_dag_of(at) + finals]
        assert spec.components[loop.component_ref.name].dag.tasks.keys() == {"train-final"}
        task = _task(spec, "evaluate-final")
        inputs = spec.components[task.component_ref.name].input_definitions.artifacts
        models = {k for k, v in inputs.items() if v.artifact_type.schema_title == "system.Model"}
        assert models == {"base", "finals"}
        index = _task(spec, "collect-models")  # the index: names and URIs, no weights
        assert not index.inputs.artifacts
        entries = index.inputs.parameters["entries"].task_output_parameter
        assert entries.output_parameter_key.endswith("train-model-2-Output")
        components = [  # the one loop training the components: none of its outputs goes in
            name
            for name, t in _all_tasks(spec).items()
            if spec.components[t.component_ref.name].WhichOneof("implementation") == "dag"
            and "train-model-2" in spec.components[t.component_ref.name].dag.tasks
        ]
        assert len(components) == 1
        producers = {_source(spec, at, name)[0] for name in artifacts if name != "finals"}
        assert not any(p.startswith(components[0] + "/") for p in producers)
        assert _source(spec, at, "base") == (_path(spec, "train-model"), "model")  # the base
        # merge too takes the components by the index, not their weights as inputs
        merge_inputs = _task(spec, "merge").inputs.artifacts
        assert _source(spec, _path(spec, "merge"), "component_index") == (index_path, "index")
        assert not any(
            _source(spec, _path(spec, "merge"), name)[0].startswith(components[0] + "/")
            for name in merge_inputs
        )


def test_validate_branch_is_off_by_default_and_conditional(compiled):
    spec, _ = _spec(compiled[0])
    parameter = spec.root.input_definitions.parameters["validate"]
    assert parameter.default_value.bool_value is False
    conditions = [t for t in _all_tasks(spec).values() if t.trigger_policy.condition]
    branch = [t for t in conditions if "validate" in t.trigger_policy.condition]
    assert len(branch) == 1
    dag = spec.components[branch[0].component_ref.name].dag
    assert list(dag.tasks) == ["validate-fidelity"]


def test_curation_fans_out_over_the_plans_groups_and_merges_them(compiled):
    spec, _ = _spec(compiled[0])
    tasks = _all_tasks(spec)
    loop_key, loop = next(
        (name, task)
        for name, task in tasks.items()
        if name.rsplit("/", 1)[-1].startswith("for-loop")
        and "curate-group" in spec.components[task.component_ref.name].dag.tasks
    )
    # one map task per group the plan task returns
    assert loop.parameter_iterator.items.input_parameter == "pipelinechannel--plan-curation-Output"
    assert list(loop.dependent_tasks) == ["plan-curation"]
    body = spec.components[loop.component_ref.name].dag.tasks["curate-group"]
    assert body.inputs.artifacts["plan"].component_input_artifact.endswith("plan-curation-plan")
    assert body.inputs.parameters["group"].component_input_parameter.endswith("-loop-item")
    # the reduce collects every map output and reads the same plan
    reduce = _path(spec, "curate-data")
    parts = tasks[reduce].inputs.artifacts["parts"].task_output_artifact
    assert _dag_of(reduce) + parts.producer_task == loop_key
    assert parts.output_artifact_key == "pipelinechannel--curate-group-part"
    loop_outputs = spec.components[loop.component_ref.name].output_definitions.artifacts
    assert loop_outputs["pipelinechannel--curate-group-part"].is_artifact_list
    assert _source(spec, reduce, "plan") == (_path(spec, "plan-curation"), "plan")
    # computed by the run, not the submitter
    fingerprint = _source(spec, _path(spec, "plan-curation"), "data_fingerprint", "parameters")
    assert fingerprint == ("read-inputs", "data_fingerprint")
    assert not tasks["read-inputs"].caching_options.enable_cache  # listed anew by every run
    # everything downstream reads the reduce's dataset
    consumers = [
        path for path, task in tasks.items()
        if spec.components[task.component_ref.name].WhichOneof("implementation") != "dag"
        and "data" in task.inputs.artifacts
        and _source(spec, path, "data") == (reduce, "dataset")
    ]  # fmt: skip
    assert len(consumers) >= 3 and _path(spec, "train-model") in consumers


def test_the_export_artifact_is_written_from_the_final_selection(compiled):
    spec, _ = _spec(compiled[0])
    task = _task(spec, "export-mixture")
    selection = _source(spec, "export-mixture", "selection")
    merged = _source(spec, _path(spec, "merge"), "selection")
    assert selection == merged and selection[0].rsplit("/", 1)[-1].startswith("predict-")
    assert _source(spec, "export-mixture", "data") == (_path(spec, "curate-data"), "dataset")
    outputs = spec.components[task.component_ref.name].output_definitions.artifacts
    assert list(outputs) == ["export"]
    executor = spec.deployment_spec["executors"]["exec-export-mixture"]["container"]
    assert executor["image"] == CPU_IMAGE and "accelerator" not in executor["resources"]


@pytest.mark.parametrize("target", [0, 1], ids=["kubeflow", "vertex"])
def test_the_pipeline_returns_the_mixture_verdict_report_and_metrics(compiled, target):
    """The run page shows them at the top level: the pipeline's own outputs, each taken from
    the task that writes it."""
    spec, _ = _spec(compiled[target])
    declared = spec.root.output_definitions.artifacts
    assert {k: v.artifact_type.schema_title for k, v in declared.items()} == {
        "mixture": "system.Artifact",
        "verdict": "system.Markdown",
        "report": "system.HTML",
        "metrics": "system.Metrics",
    }
    selected = {
        name: _output_source(spec, s.producer_subtask, s.output_artifact_key)
        for name, value in spec.root.dag.outputs.artifacts.items()
        for s in value.artifact_selectors
    }
    evaluate = _path(spec, "evaluate-final")
    assert selected == {
        "mixture": ("export-mixture", "export"),
        "verdict": (evaluate, "verdict"),
        "report": (evaluate, "report"),
        "metrics": (evaluate, "metrics"),
    }


def test_vertex_target_is_one_document_with_vertex_accelerators(compiled):
    text = compiled[1].read_text()
    spec, docs = _spec(compiled[1])
    assert len(docs) == 1 and "nodeSelector" not in text
    resources = spec.deployment_spec["executors"]["exec-train-model"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "NVIDIA_H100_80GB"
    assert _task_names(spec) >= STAGES


def test_every_task_has_a_display_name_and_every_parameter_a_description(compiled):
    for path in compiled:
        spec, _ = _spec(path)
        shown = {key: task.task_info.name for key, task in _all_tasks(spec).items()}
        for key, name in shown.items():  # never the key, nor another kebab-case auto name
            assert name != key and not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name), key
        assert set(shown.values()) >= {
            "resolve config",
            "curate / plan",
            "curate / groups",
            "curate group",
            "curate / merge groups",
            "train base",
            "train components",
            "train component",
            "round 0 / propose",
            "round 0 / evaluate proxies",
            "round 1 / propose",
            "round 2 / evaluate proxies",
            "select mixture",
            "if validate",
            "validate proxy fidelity",
            "merge chosen mixture",
            "train final",
            "evaluate finals",
            "curate data",  # the sub-graphs
            "train models",
            "search mixtures",
            "final models",
        }
        parameters = spec.root.input_definitions.parameters
        assert len(parameters) == 11
        for name, parameter in parameters.items():
            assert parameter.description.strip(), name
        assert "-1 keeps the config's seed" in parameters["seed"].description
        assert parameters["seed"].default_value.number_value == -1
        for component in ("comp-train-model", "comp-train-final"):  # loss, tokens, tokens/s
            outputs = spec.components[component].output_definitions.artifacts
            assert outputs["metrics"].artifact_type.schema_title == "system.Metrics"
            assert outputs["curves"].artifact_type.schema_title == "system.HTML"  # the curves


def _training_inputs(spec) -> dict[str, tuple[int, str]]:
    """(processes, cluster) of every training task, by task name, through the loops."""
    found = {}

    def walk(dag):
        for name, task in dag.tasks.items():
            component = spec.components[task.component_ref.name]
            if component.WhichOneof("implementation") == "dag":
                walk(component.dag)
            elif name.startswith(("train-model", "train-final")):
                params = task.inputs.parameters
                found[name] = (
                    int(params["processes"].runtime_value.constant.number_value),
                    params["cluster"].runtime_value.constant.string_value,
                )

    walk(spec.root.dag)
    return found


def test_training_tasks_launch_one_process_per_gpu(compiled):
    spec, _ = _spec(compiled[0])  # accelerator_count=2: accelerate launch of 2 processes
    found = _training_inputs(spec)
    assert set(found) == {"train-model", "train-model-2", "train-final"}
    assert set(found.values()) == {(2, "")}
    spec, _ = _spec(compiled[1])  # one GPU: one process, as locally
    assert set(_training_inputs(spec).values()) == {(1, "")}


def test_vertex_multi_node_training_is_a_custom_job_with_worker_pools(tmp_path):
    from google.auth.credentials import AnonymousCredentials

    from demix.distributed import vertex_job

    path = pipeline.compile_pipeline(
        "vertex",
        tmp_path / "nodes.yaml",
        allow_local_images=True,
        nodes=4,
        machine_type="a3-highgpu-8g",
        accelerator_type="NVIDIA_H100_80GB",
        accelerator_count=8,
    )
    spec, docs = _spec(path)
    assert len(docs) == 1
    found = _training_inputs(spec)
    assert set(found) == {"train-model", "train-model-2", "train-final"}
    (processes, cluster), *others = found.values()
    assert processes == 8 and all(value == (processes, cluster) for value in others)
    pools = json.loads(cluster)["worker_pool_specs"]
    assert [pool["replica_count"] for pool in pools] == [1, 3]  # primary + 3 workers
    for pool in pools:
        assert pool["machine_spec"] == {
            "machine_type": "a3-highgpu-8g",
            "accelerator_type": "NVIDIA_H100_80GB",
            "accelerator_count": 8,
        }
        assert pool["container_spec"]["image_uri"] == CUDA_IMAGE
    executors = spec.deployment_spec["executors"]
    # the training task only starts the job and waits; the job's machines hold the GPUs
    for name in ("exec-train-model", "exec-train-final"):
        assert "accelerator" not in executors[name]["container"]["resources"]
    assert "accelerator" in executors["exec-evaluate-proxies"]["container"]["resources"]

    argv = ["/gcs/b/run/model.launch.json"]  # the job file, beside the model
    job = vertex_job(
        cluster,
        argv,
        processes,
        Path("/gcs/b/run/model"),
        module="demix.stages.worker",
        project="p",
        location="us-central1",
        credentials=AnonymousCredentials(),
    )
    specs = job.job_spec.worker_pool_specs
    assert [s.replica_count for s in specs] == [1, 3]
    assert list(specs[1].container_spec.command) == [
        "python", "-m", "demix.stages.worker", *argv, "--processes", "8",
    ]  # fmt: skip
    assert job.job_spec.base_output_directory.output_uri_prefix == "gs://b/run/model.job"


@pytest.mark.parametrize(
    ("target", "settings", "expected"),
    [
        ("kubeflow", {"nodes": 2, "machine_type": "a3-highgpu-8g"}, "compile with --target vertex"),
        ("vertex", {"nodes": 2}, "needs --machine-type"),
    ],
)
def test_multi_node_needs_vertex_and_a_machine_type(tmp_path, target, settings, expected):
    with pytest.raises(ConfigError, match=expected):
        pipeline.compile_pipeline(target, tmp_path / "x.yaml", **settings)
    assert not (tmp_path / "x.yaml").exists()


def test_no_credentials_in_compiled_yaml(compiled):
    for path in compiled:
        text = path.read_text()
        assert not re.search(
            r"(AKIA[0-9A-Z]{16}|-----BEGIN|private_key|client_secret|ya29\.)", text
        )


def offline_vertex_job(template: Path):
    """An aiplatform PipelineJob of a compiled Vertex YAML, built without network or
    credentials (what Vertex AI would run); fails when the YAML does not load as one."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform

    job = aiplatform.PipelineJob(
        display_name="demix",
        template_path=str(template),
        pipeline_root="gs://bucket/root",
        parameter_values={"config_yaml": "seed: 0"},
        project="p",
        location="us-central1",
        credentials=AnonymousCredentials(),
    )
    assert job.pipeline_spec["pipelineInfo"]["name"] == "demix"
    return job


def test_vertex_pipeline_job_builds_offline(compiled):
    offline_vertex_job(compiled[1])


DEMO = ROOT / "configs" / "demo.yaml"
HOST = "http://kfp.example"
KUBEFLOW = ["--host", HOST, "--config", str(DEMO), "--pipeline-root", "gs://bucket/root"]
VERTEX = ["--vertex", "--project", "p", "--region", "us-central1", "--config", str(DEMO)]
VERTEX += ["--pipeline-root", "gs://bucket/root"]


def _run_params(**values) -> dict:
    """What submit and schedule send for configs/demo.yaml, with `values` on top."""
    return {
        "config_yaml": DEMO.read_text(),
        **values,
    }


def test_submit_to_kfp_host_sends_every_setting(compiled, capsys):
    argv = ["submit", "--package", str(compiled[0]), *KUBEFLOW, "--eval-workers", "3"]
    argv += ["--param", "seed=7", "--param", "general_ratio=0.25", "--param", "validate=true"]
    argv += ["--param", "base_model=gs://b/m", "--run-name", "r", "--experiment", "e"]
    argv += ["--namespace", "team", "--service-account", "runner"]
    with mock.patch("deploy.service_errors.KfpClient") as client:
        client.return_value.create_run_from_pipeline_package.return_value.run_id = "run-1"
        assert pipeline.main(argv) == 0
    assert capsys.readouterr().out.strip() == "run-1"
    client.assert_called_once_with(host=HOST)
    create = client.return_value.create_run_from_pipeline_package
    create.assert_called_once_with(
        str(compiled[0]),
        arguments=_run_params(
            num_eval_workers=3, seed=7, general_ratio=0.25, validate=True, base_model="gs://b/m"
        ),
        run_name="r",
        experiment_name="e",
        namespace="team",
        pipeline_root="gs://bucket/root",
        enable_caching=True,
        service_account="runner",
    )
    arguments = create.call_args.kwargs["arguments"]
    assert arguments["config_yaml"].startswith("# Run with:")
    assert type(arguments["seed"]) is int and type(arguments["general_ratio"]) is float
    assert arguments["validate"] is True


def test_submit_defaults_name_the_run_and_experiment_demix(compiled):
    with mock.patch("deploy.service_errors.KfpClient") as client:
        assert pipeline.main(["submit", "--package", str(compiled[0]), *KUBEFLOW]) == 0
    kwargs = client.return_value.create_run_from_pipeline_package.call_args.kwargs
    assert kwargs["arguments"] == _run_params()  # num_eval_workers: the pipeline's default
    assert kwargs["run_name"] == kwargs["experiment_name"] == "demix"
    assert kwargs["namespace"] is None and kwargs["service_account"] is None


def test_images_named_by_components_are_built_by_make_images():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^IMAGE_CPU\s*:?=\s*\$\(IMAGE_REPO\)/demix:\$\(VERSION\)-cpu", makefile, re.M)
    assert re.search(
        r"^IMAGE_CUDA\s*:?=\s*\$\(IMAGE_REPO\)/demix:\$\(VERSION\)-cuda", makefile, re.M
    )
    assert re.search(r"^VERSION\s*:=.*pyproject\.toml", makefile, re.M)  # one version
    repo = re.search(r"^IMAGE_REPO\s*\?=\s*(\S+)", makefile, re.M).group(1)
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert (
        f"{repo}/demix:{version}-cpu" == CPU_IMAGE and f"{repo}/demix:{version}-cuda" == CUDA_IMAGE
    )
    text = (ROOT / "images" / "Dockerfile").read_text()
    assert re.search(r"^USER demix$", text, re.M)
    assert not re.search(r"(SECRET|TOKEN|PASSWORD|API_KEY)\s*=", text)


CPU_TAG = "europe-docker.pkg.dev/p/r/demix:7.1-cpu"
CUDA_DIGEST = "europe-docker.pkg.dev/p/r/demix@sha256:" + "ab12" * 16


@pytest.mark.parametrize(
    ("target", "cpu", "cuda"),
    [
        ("kubeflow", CPU_TAG, CUDA_DIGEST),
        ("vertex", CUDA_DIGEST.replace("demix@", "demix-cpu@"), "registry:5000/demix:7.1-cuda"),
    ],
)
def test_compile_names_exactly_the_images_given(tmp_path, target, cpu, cuda):
    """--image / --image-cuda (a tag or a digest): GPU tasks in the CUDA image, the rest in the
    CPU image, every executor; the default images appear nowhere."""
    out = tmp_path / "p.yaml"
    argv = ["compile", "--target", target, "--out", str(out), "--image", cpu, "--image-cuda", cuda]
    assert pipeline.main(argv) == 0
    spec, _ = _spec(out)
    images = {
        name: executor["container"]["image"]
        for name, executor in spec.deployment_spec["executors"].items()
    }
    gpu = {n for n in images if re.sub(r"-\d+$", "", n) in GPU_EXECUTORS}
    assert gpu and len(images) > len(gpu) + 8
    assert {images[n] for n in gpu} == {cuda}
    assert {images[n] for n in set(images) - gpu} == {cpu}
    text = out.read_text()
    assert CPU_IMAGE not in text and CUDA_IMAGE not in text


def test_multi_node_training_jobs_run_the_cuda_image_given(tmp_path):
    out = tmp_path / "v.yaml"
    argv = ["compile", "--target", "vertex", "--out", str(out), "--nodes", "2"]
    argv += ["--machine-type", "a3-highgpu-8g", "--image-cuda", CUDA_DIGEST, "--image", CPU_TAG]
    assert pipeline.main(argv) == 0
    spec, _ = _spec(out)
    executors = spec.deployment_spec["executors"]
    train = [n for n in executors if n.startswith("exec-train-model")]
    assert train and all(executors[n]["container"]["image"] == CUDA_DIGEST for n in train)
    clusters = [cluster for _, cluster in _training_inputs(spec).values()]  # the job's image
    assert clusters and all(CUDA_DIGEST in cluster for cluster in clusters)
    assert CUDA_IMAGE not in out.read_text()


@pytest.mark.parametrize(
    "image", ["demix", "Demix:1", "demix@sha256:abc", "reg/demix:", "reg/demix:1 --x"]
)
def test_compile_refuses_an_image_without_a_tag_or_digest(tmp_path, image, capsys):
    assert pipeline.main(["compile", "--out", str(tmp_path / "p.yaml"), "--image-cuda", image]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"pipeline\.py: error: --image-cuda .* is not an image reference.*", line)
    assert not (tmp_path / "p.yaml").exists()


def _artifact(cls, path: Path):
    art = cls(uri=str(path))
    art.path = str(path)  # local artifacts: path == uri
    return art


def _curate(resolved, root: Path, fingerprint: str):
    """The three curation tasks as the pipeline runs them: plan, one per group, merge."""
    from components.curate_data import curate_data
    from components.curate_group import curate_group
    from components.plan_curation import plan_curation

    plan = _artifact(Artifact, root / "plan")
    groups = plan_curation.python_func(config=resolved, data_fingerprint=fingerprint, plan=plan)
    parts = [_artifact(Artifact, root / f"part-{g}") for g in groups]
    for group, part in zip(groups, parts, strict=True):
        curate_group.python_func(plan=plan, group=group, part=part)
    dataset = _artifact(Dataset, root / "dataset")
    curate_data.python_func(
        plan=plan, parts=parts[::-1], data_fingerprint=fingerprint, dataset=dataset
    )  # a collected list in any order
    return dataset


def test_components_python_func_on_tiny_artifacts(tmp_path, corpus_dir):
    raw = smoke_config_dict(corpus_dir)
    target = tmp_path / "tickets.jsonl"  # curated by the same tasks, never trained on
    target.write_text(
        "".join(
            json.dumps(
                {"text": f"Ticket {i}: the export to parquet fails with error {i * 7}. " * 3}
            )
            + "\n"
            for i in range(12)
        )
    )
    raw["data"]["targets"] = [{"name": "tickets", "paths": [str(target)]}]
    resolved = _artifact(Artifact, tmp_path / "config.yaml")
    resolve_config.python_func(
        config_yaml=yaml.safe_dump(raw),
        seed=5,
        general_ratio=0.25,
        base_model="",
        datasets_json="",
        search_n=0,
        component_tokens=0,
        final_tokens=0,
        resolved=resolved,
    )
    config = parse_config(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert config.seed == 5 and config.train.general_ratio == 0.25
    assert dataset_names.python_func(config=resolved) == ["general", "code", "math"]

    dataset = _curate(resolved, tmp_path, "abc")
    assert (tmp_path / "dataset" / "manifest.json").is_file() and dataset.metadata[
        "data_fingerprint"
    ] == "abc"
    sources = dataset.metadata["sources"]  # what the run read, shown in the UI
    assert sources["tickets"] == [str(target)] and set(sources) == {
        "general",
        "code",
        "math",
        "tickets",
    }
    assert sources["math"] == raw["data"]["datasets"][2]["paths"]
    assert len(list(tmp_path.glob("part-*"))) == 4  # the smoke corpus and target: one per file
    from demix.data.shards import CuratedData

    curated = CuratedData(tmp_path / "dataset")
    assert curated.targets == ["tickets"] and "tickets" not in curated.token_prior
    assert curated.manifest["targets"]["tickets"]["heldout_documents"] == 12

    result = _artifact(Artifact, tmp_path / "proposals.json")
    shards = predict.python_func(
        config=resolved,
        data=dataset,
        round_index=0,
        num_shards=3,
        history_out=_artifact(Artifact, tmp_path / "history.jsonl"),
        result=result,
        metrics=_artifact(Metrics, tmp_path / "metrics"),
        report=_artifact(HTML, tmp_path / "report.html"),
    )
    proposals = json.loads((tmp_path / "proposals.json").read_text())
    assert len(proposals) == config.search.n and shards == [0, 1, 2]
    assert "<h1>DeMix search so far</h1>" in (tmp_path / "report.html").read_text()


def test_resolve_config_keeps_the_configs_seed_below_zero(tmp_path, corpus_dir):
    raw = smoke_config_dict(corpus_dir)
    raw["seed"] = 9
    resolved = _artifact(Artifact, tmp_path / "c.yaml")
    for seed, expected in ((-1, 9), (0, 0), (4, 4)):
        resolve_config.python_func(
            config_yaml=yaml.safe_dump(raw), seed=seed, general_ratio=-1.0, base_model="",
            datasets_json="", search_n=0, component_tokens=0, final_tokens=0, resolved=resolved,
        )  # fmt: skip
        assert yaml.safe_load((tmp_path / "c.yaml").read_text())["seed"] == expected


@pytest.mark.parametrize("component", ["train_model", "train_final"])
def test_training_components_log_loss_tokens_and_throughput(tmp_path, monkeypatch, component):
    """The manifest's numbers as KFP Metrics; the training itself is the library's."""
    import importlib

    import demix.checkpoint
    import demix.config
    import demix.data.shards
    import demix.mixtures
    import demix.stages

    manifest = {"role": "x", "name": "chosen", "tokens": 4096, "final_loss": 2.5}
    manifest |= {"tokens_per_s": 812.5, "seconds": 5.0, "weights": {"a": 1.0}}
    monkeypatch.setattr(demix.stages, "train_stage", lambda *a, **k: tmp_path / "model")
    monkeypatch.setattr(demix.checkpoint, "read_model_manifest", lambda folder: manifest)
    config = SimpleNamespace(final=SimpleNamespace(seeds=1))  # what the components read of it
    monkeypatch.setattr(demix.config, "resolve_config", lambda text: config)
    monkeypatch.setattr(demix.data.shards, "CuratedData", lambda path: None)
    monkeypatch.setattr(demix.mixtures, "final_mixture", lambda *a: {"a": 1.0})
    (tmp_path / "config.yaml").write_text("seed: 0")
    (tmp_path / "selection.json").write_text("{}")
    func = getattr(importlib.import_module(f"components.{component}"), component).python_func
    inputs = {
        "config": _artifact(Artifact, tmp_path / "config.yaml"),
        "data": _artifact(Dataset, tmp_path / "data"),
        "model": _artifact(Model, tmp_path / "model"),
        "metrics": _artifact(Metrics, tmp_path / "metrics"),
        "curves": _artifact(HTML, tmp_path / "curves.html"),
    }
    if component == "train_model":
        func(**inputs, role="base", name="base")
    else:
        selection = _artifact(Artifact, tmp_path / "selection.json")
        func(**inputs, label="chosen", base=inputs["model"], selection=selection)
    logged = {"final_loss": 2.5, "tokens": 4096, "tokens_per_s": 812.5, "reused": 0}
    assert inputs["metrics"].metadata == logged  # reused: trained here, not by an earlier run
    assert "No training curves" in (tmp_path / "curves.html").read_text()  # none in the folder


def test_resolve_config_refuses_bad_overrides(tmp_path, corpus_dir):
    with pytest.raises(ConfigError, match="train.general_ratio"):
        resolve_config.python_func(
            config_yaml=config_yaml(parse_config(smoke_config_dict(corpus_dir))),
            seed=0,
            general_ratio=1.0,
            base_model="",
            datasets_json="",
            search_n=0,
            component_tokens=0,
            final_tokens=0,
            resolved=_artifact(Artifact, tmp_path / "c.yaml"),
        )
    assert not (tmp_path / "c.yaml").exists()


@pytest.fixture(scope="module")
def local_and_library_runs(tmp_path_factory, corpus_dir, eval_dir):
    """The smoke config run once as the local pipeline and once as `demix run`; the local
    run's screen output kept."""
    tmp_path = tmp_path_factory.mktemp("both")
    config = tmp_path / "smoke.yaml"
    config.write_text(yaml.safe_dump(smoke_config_dict(corpus_dir, eval_dir)))
    screen = io.StringIO()
    summary = pipeline.run_local(config, tmp_path / "kfp", num_eval_workers=2, progress=screen)
    assert demix_main(["run", str(config), "--out", str(tmp_path / "lib")]) == 0
    library = json.loads((tmp_path / "lib" / "summary.json").read_text())
    return tmp_path, summary, library, screen.getvalue()


def test_local_pipeline_run_matches_demix_run(local_and_library_runs, capsys):
    tmp_path, summary, library, _ = local_and_library_runs
    assert (tmp_path / "kfp" / "report.html").is_file()
    # the pipeline's own outputs, copied beside the summary: `demix export`'s JSON, the verdict
    returned = json.loads((tmp_path / "kfp" / "mixture.json").read_text())
    assert demix_main(["export", str(tmp_path / "kfp")]) == 0
    assert returned == json.loads(capsys.readouterr().out)
    assert returned["mixture"] == pytest.approx(summary["mixture"], abs=1e-12)
    verdict = (tmp_path / "kfp" / "verdict.md").read_text()
    assert "token_prior" in verdict and "uniform" in verdict
    assert summary["proxies_evaluated"] == 6 and summary["search_rounds"] == 2
    assert set(summary["final"]) == {"chosen", "uniform", "token_prior"}
    assert summary["mixture"] == pytest.approx(library["mixture"], abs=1e-9)
    for label in ("chosen", "uniform", "token_prior"):
        assert summary["final"][label]["tasks"] == library["final"][label]["tasks"]
    assert summary["verdict"] == library["verdict"]


@pytest.mark.parametrize("folder", ["kfp", "lib", "kfp/pipeline-root", "summary artifact"])
def test_demix_report_draws_the_report_again_from_any_run_folder(
    local_and_library_runs, folder, capsys
):
    """`demix report` on the --out of both front doors, on a pipeline root, and on the
    evaluate-final summary artifact copied elsewhere (a downloaded pipeline run)."""
    tmp_path = local_and_library_runs[0]
    if folder == "summary artifact":
        (artifact,) = (tmp_path / "kfp" / "pipeline-root").glob("*/evaluate-final/summary")
        where = tmp_path / "downloaded"
        if not where.exists():
            shutil.copytree(artifact, where)
        (where / "report.html").unlink()
    else:
        where = tmp_path / folder
    assert demix_main(["report", str(where)]) == 0
    written = Path(capsys.readouterr().out.strip())
    assert written.name == "report.html" and written.stat().st_size > 10_000
    assert written.is_relative_to(where)
    html = written.read_text()
    assert "<h2>Verdict: the chosen mixture against each baseline</h2>" in html
    assert html.count("<img") >= 3  # search progress, predictor, mixtures, verdict plots


def test_both_paths_write_the_same_summary_field_by_field(local_and_library_runs):
    """One set of stage functions behind `demix run` and the pipeline: the summaries agree on
    every field that does not measure time, and their timings have the same keys and meaning."""
    _, pipeline_summary, library, _ = local_and_library_runs
    assert set(pipeline_summary) == set(library)
    timed = {"timings_s", "wall_s"}
    for key in set(library) - timed:
        _assert_close(pipeline_summary[key], library[key], key)
    assert pipeline_summary["training_tokens"] == library["training_tokens"]
    assert set(pipeline_summary["timings_s"]) == set(library["timings_s"])
    assert set(pipeline_summary["wall_s"]) == set(library["wall_s"]) == {"fetch", "total"}
    # work recorded by the artifacts, not wall clock: positive for every trained stage
    for summary in (pipeline_summary, library):
        assert all(summary["timings_s"][k] > 0 for k in ("base", "components", "final"))
        assert summary["wall_s"]["total"] >= summary["timings_s"]["final"]


def test_the_plan_counts_what_the_local_run_ran(local_and_library_runs):
    """`demix plan` before the run: as many pipeline tasks as the run printed, the proxies it
    evaluated, and the tokens each training stage read (to the batch)."""
    from demix.config import load_config
    from demix.stages.plan import accelerator, plan_table

    tmp_path, summary, _, screen = local_and_library_runs
    config = load_config(tmp_path / "smoke.yaml")
    table = plan_table(config, accelerator("cpu"), eval_workers=2)
    ran = [line for line in screen.splitlines()[1:] if "SUCCESS" in line]
    assert table["total"]["tasks"] == len(ran)
    stages = {row["stage"]: row for row in table["stages"]}
    assert stages["search"]["proxies"] == summary["proxies_evaluated"]
    batch = config.train.batch_size * config.train.seq_len  # a training budget's granularity
    for stage, key in (("base", "base"), ("components", "components"), ("finals", "final")):
        assert abs(stages[stage]["tokens"] - summary["training_tokens"][key]) <= 3 * batch, stage


def test_a_local_run_prints_one_line_per_task_and_logs_the_rest(local_and_library_runs, capsys):
    """What `make demo` shows: the log's path, one line per task (display name, status,
    seconds), the summary table; kfp.local's executor JSON and the tasks' logs are in the file."""
    tmp_path, summary, _, screen = local_and_library_runs
    log = tmp_path / "kfp" / "kfp-local.log"
    lines = screen.splitlines()
    assert lines[0] == f"kfp.local log: {log}"
    tasks = [re.fullmatch(r"  (\S.*?)\s+SUCCESS\s+\d+\.\ds", line) for line in lines[1:]]
    assert all(tasks), lines
    logged = log.read_text()
    finished = re.findall(r"Task \S*'([a-z0-9-]+)'\S* finished with status", logged)
    assert len(tasks) == len(finished) >= 20  # one line per task run, and only those
    names = {match.group(1) for match in tasks}
    assert names >= {
        "resolve config",
        "curate group",
        "train base",
        "train component",
        "round 0 / evaluate proxies",
        "select mixture",
        "train final",
        "evaluate finals",
    }
    assert not names & set(finished)  # display names, never the task keys
    assert logged.count("executor_output.json") >= len(finished)  # the executor JSON
    assert "Streamed logs" in logged and "Streamed logs" not in screen
    print_summary(summary, tmp_path / "kfp")
    table = capsys.readouterr().out
    assert len(lines) + len(table.splitlines()) < 60  # fits on one screen


def _assert_close(a, b, where: str) -> None:
    """Equal structures; floats within 1e-9."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and set(a) == set(b), where
        for key in b:
            _assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-9), where
    else:
        assert a == b, where


def test_config_rounds_and_compiled_rounds_cannot_disagree(tmp_path, corpus_dir, capsys):
    """search.rounds has one source: compile takes it from the config, and a package compiled
    with other rounds is refused at submit (before the client is contacted) and by the first
    task, naming both numbers."""
    raw = smoke_config_dict(corpus_dir)  # search.rounds: 2
    config = tmp_path / "smoke.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "from-config.yaml"
    local = "--allow-local-images"
    assert pipeline.main(["compile", "--out", str(out), "--config", str(config), local]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    predicts = [  # in the search sub-graph
        t for c in spec["components"].values() for t in c.get("dag", {}).get("tasks", {})
        if "predict" in t
    ]  # fmt: skip
    assert len(predicts) == 2 + 1  # one per round, then the final selection
    assert (
        pipeline.main(
            ["compile", "--out", str(out), "--config", str(config), "--rounds", "3", local]
        )
        == 2
    )

    package = pipeline.compile_pipeline(
        "kubeflow", tmp_path / "three.yaml", allow_local_images=True, rounds=3
    )
    argv = ["--host", HOST, "--package", str(package), "--config", str(config)]
    argv += ["--pipeline-root", "gs://bucket/root"]
    capsys.readouterr()
    with mock.patch("deploy.service_errors.KfpClient") as client:
        for command in (["submit"], ["schedule", "--cron", "0 3 * * 1"]):
            assert pipeline.main(command + argv) == 2
    client.assert_not_called()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert all("search.rounds is 2 but the pipeline was compiled with 3" in line for line in err)

    with pytest.raises(
        ConfigError, match="search.rounds is 2 but the pipeline was compiled with 3"
    ):
        resolve_config.python_func(
            config_yaml=yaml.safe_dump(raw),
            seed=0,
            general_ratio=-1.0,
            base_model="",
            datasets_json="",
            search_n=0,
            component_tokens=0,
            final_tokens=0,
            resolved=_artifact(Artifact, tmp_path / "c.yaml"),
            compiled_rounds=3,
        )
    assert not (tmp_path / "c.yaml").exists()


def test_submit_to_vertex_sends_every_setting(compiled, capsys):
    key = "projects/p/locations/us-central1/keyRings/k/cryptoKeys/c"
    argv = ["submit", "--package", str(compiled[1]), *VERTEX, "--eval-workers", "4"]
    argv += ["--param", "search_n=16", "--run-name", "nightly", "--experiment", "mixtures"]
    argv += ["--service-account", "runner@p.iam.gserviceaccount.com"]
    argv += ["--network", "projects/1/global/networks/vpc", "--encryption-key", key]
    argv += ["--labels", "team=data,cost-center=ml"]
    with mock.patch("google.cloud.aiplatform.PipelineJob") as job:
        job.return_value.resource_name = "projects/p/locations/us-central1/pipelineJobs/demix-1"
        assert pipeline.main(argv) == 0
    assert capsys.readouterr().out.strip().endswith("demix-1")
    job.assert_called_once_with(
        display_name="nightly",
        template_path=str(compiled[1]),
        pipeline_root="gs://bucket/root",
        parameter_values=_run_params(num_eval_workers=4, search_n=16),
        enable_caching=True,
        encryption_spec_key_name=key,
        labels={"team": "data", "cost-center": "ml"},
        project="p",
        location="us-central1",
    )
    job.return_value.submit.assert_called_once_with(
        service_account="runner@p.iam.gserviceaccount.com",
        network="projects/1/global/networks/vpc",
        experiment="mixtures",
    )


@pytest.mark.parametrize(
    ("backend", "extra", "expected"),
    [
        ("kubeflow", ["--param", "sead=1"], r"has no parameter 'sead'; its parameters: .*seed"),
        ("kubeflow", ["--param", "seed=1.5"], r"--param seed=1.5: seed takes an integer"),
        ("kubeflow", ["--param", "general_ratio=half"], r"general_ratio takes a number"),
        ("kubeflow", ["--param", "general_ratio=nan"], r"general_ratio takes a number"),
        ("vertex", ["--param", "validate=yes"], r"validate takes true or false"),
        ("kubeflow", ["--param", "seed"], r"--param seed: expected NAME=VALUE"),
        ("kubeflow", ["--param", "config_yaml=x: 1"], r"config_yaml is the text of a local"),
        ("vertex", ["--param", "config_uri=gs://b/c.yaml"], r"config_uri is a gs:// --config"),
        ("vertex", ["--param", "data_fingerprint=x"], r"has no parameter 'data_fingerprint'"),
        ("kubeflow", ["--param", "seed=1", "--param", "seed=2"], r"seed is given twice"),
        ("kubeflow", ["--eval-workers", "2", "--param", "num_eval_workers=3"], r"give one"),
        ("kubeflow", ["--network", "vpc"], r"--network is a setting for Vertex AI"),
        ("kubeflow", ["--labels", "a=b"], r"--labels is a setting for Vertex AI"),
        ("vertex", ["--namespace", "team"], r"--namespace is a setting for Kubeflow"),
        ("vertex", ["--host", HOST], r"--host is a setting for Kubeflow"),
        ("vertex", ["--labels", "Team=data"], r"--labels Team=data: 'Team=data' is not KEY="),
        ("vertex", ["--labels", "a=1,a=2"], r"--labels a=1,a=2: a is given twice"),
    ],
)
def test_submit_refuses_bad_flags_before_any_client(compiled, capsys, backend, extra, expected):
    vertex = backend == "vertex"
    argv = ["submit", "--package", str(compiled[int(vertex)]), *(VERTEX if vertex else KUBEFLOW)]
    with (
        mock.patch("deploy.service_errors.KfpClient") as client,
        mock.patch("google.cloud.aiplatform.PipelineJob") as job,
    ):
        assert pipeline.main(argv + extra) == 2
    client.assert_not_called()
    job.assert_not_called()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(expected, err), err


def test_submit_vertex_refuses_a_kubeflow_package(compiled, capsys):
    with mock.patch("google.cloud.aiplatform.PipelineJob") as job:
        assert pipeline.main(["submit", "--package", str(compiled[0]), *VERTEX]) == 2
    job.assert_not_called()
    assert "compile with --target vertex" in capsys.readouterr().err


def test_schedule_on_kubeflow_is_a_recurring_run(compiled, capsys):
    argv = ["schedule", "--package", str(compiled[0]), *KUBEFLOW, "--cron", "0 3 * * 1"]
    argv += ["--max-concurrency", "2", "--start-time", "2030-01-31T03:00:00+01:00"]
    argv += ["--run-name", "weekly", "--experiment", "e", "--namespace", "team"]
    argv += ["--param", "seed=3", "--service-account", "runner"]
    with mock.patch("deploy.service_errors.KfpClient") as client:
        client.return_value.create_experiment.return_value.experiment_id = "exp-1"
        client.return_value.create_recurring_run.return_value.recurring_run_id = "rr-1"
        assert pipeline.main(argv) == 0
        assert (
            pipeline.main([*argv, "--pipeline-id", "pl-1", "--version-id", "v-1", "--no-cache"])
            == 0
        )
    assert capsys.readouterr().out.split() == ["rr-1", "rr-1"]
    client.return_value.create_experiment.assert_called_with("e", namespace="team")
    common = {
        "experiment_id": "exp-1",
        "job_name": "weekly",
        "cron_expression": "0 0 3 * * 1",  # Kubeflow's six fields, seconds first
        "max_concurrency": 2,
        "start_time": "2030-01-31T02:00:00Z",
        "params": _run_params(seed=3),
        "pipeline_root": "gs://bucket/root",
        "service_account": "runner",
    }
    assert client.return_value.create_recurring_run.call_args_list == [
        mock.call(**common, enable_caching=True, pipeline_package_path=str(compiled[0])),
        mock.call(**common, enable_caching=False, pipeline_id="pl-1", version_id="v-1"),
    ]


def test_schedule_on_vertex_is_a_pipeline_job_schedule(compiled, capsys):
    argv = ["schedule", "--package", str(compiled[1]), *VERTEX]
    argv += ["--cron", "TZ=Europe/Paris 0 3 * * 1", "--start-time", "2030-01-31T02:00:00Z"]
    argv += ["--run-name", "weekly", "--labels", "team=data", "--service-account", "runner"]
    argv += ["--network", "projects/1/global/networks/vpc"]
    with mock.patch("google.cloud.aiplatform.PipelineJob") as job:
        job.return_value.create_schedule.return_value.resource_name = "schedules/s-1"
        assert pipeline.main(argv) == 0
    assert capsys.readouterr().out.strip() == "schedules/s-1"
    job.assert_called_once_with(
        display_name="weekly",
        template_path=str(compiled[1]),
        pipeline_root="gs://bucket/root",
        parameter_values=_run_params(),
        enable_caching=True,  # each run's first task fingerprints the data anew
        encryption_spec_key_name=None,
        labels={"team": "data"},
        project="p",
        location="us-central1",
    )
    job.return_value.create_schedule.assert_called_once_with(
        cron="TZ=Europe/Paris 0 3 * * 1",
        display_name="weekly",
        start_time="2030-01-31T02:00:00Z",
        max_concurrent_run_count=1,
        service_account="runner",
        network="projects/1/global/networks/vpc",
    )
    job.return_value.submit.assert_not_called()


@pytest.mark.parametrize(
    ("backend", "extra", "expected"),
    [
        ("kubeflow", ["--cron", "0 3 * *"], r"--cron '0 3 \* \*': expected five fields"),
        ("vertex", ["--cron", "0 0 3 * * 1"], r"expected five fields, optionally after TZ="),
        ("kubeflow", ["--cron", "TZ=UTC 0 3 * * 1"], r"expected five fields \(or six"),
        ("kubeflow", ["--cron", "0 3 * * 1", "--start-time", "x"], r"--start-time x: expected"),
        ("vertex", ["--cron", "0 3 * * 1", "--start-time", "2030-01-31T03:00"], r"UTC offset"),
        ("kubeflow", ["--cron", "0 3 * * 1", "--max-concurrency", "0"], r"at least 1"),
        (
            "vertex",
            ["--cron", "0 3 * * 1", "--experiment", "e"],
            r"--experiment: a Vertex AI schedule",
        ),
        ("kubeflow", ["--cron", "0 3 * * 1", "--version-id", "v"], r"go together"),
        ("vertex", ["--cron", "0 3 * * 1", "--pipeline-id", "p"], r"--pipeline-id is a setting"),
        ("kubeflow", ["--cron", "0 3 * * 1", "--param", "seed=x"], r"seed takes an integer"),
    ],
)
def test_schedule_refuses_bad_flags_before_any_client(compiled, capsys, backend, extra, expected):
    vertex = backend == "vertex"
    argv = ["schedule", "--package", str(compiled[int(vertex)])]
    argv += VERTEX if vertex else KUBEFLOW
    with (
        mock.patch("deploy.service_errors.KfpClient") as client,
        mock.patch("google.cloud.aiplatform.PipelineJob") as job,
    ):
        assert pipeline.main(argv + extra) == 2
    client.assert_not_called()
    job.assert_not_called()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(expected, err), err


def test_upload_to_an_artifact_registry_repository(compiled, capsys):
    url = "https://registry.example/p/repo"
    argv = ["upload", "--vertex", "--registry", url, "--package", str(compiled[1])]
    with mock.patch("kfp.registry.RegistryClient") as registry:
        registry.return_value.upload_pipeline.return_value = ("demix", "sha256:abc")
        assert pipeline.main([*argv, "--tag", "v1", "--tag", "latest"]) == 0
        assert pipeline.main([*argv, "--version", "v1"]) == 2
        assert pipeline.main(["upload", "--vertex", "--package", str(compiled[1])]) == 2
        assert pipeline.main([*argv[:3], "registry.example/p", *argv[4:]]) == 2
        assert pipeline.main([*argv[:5], str(compiled[0])]) == 2
    registry.assert_called_once_with(host=url)
    registry.return_value.upload_pipeline.assert_called_once_with(
        file_name=str(compiled[1]), tags=["v1", "latest"]
    )
    out, err = capsys.readouterr()
    assert out.strip() == "demix sha256:abc"
    assert err.splitlines() == [
        "pipeline.py: error: --version is a setting for Kubeflow (drop --vertex)",
        "pipeline.py: error: --vertex needs --registry",
        "pipeline.py: error: --registry registry.example/p: expected the repository's URL, "
        "https://HOST/PROJECT/REPOSITORY",
        f"pipeline.py: error: {compiled[0]} has Kubeflow platform settings Vertex AI cannot "
        "load; compile with --target vertex",
    ]


TIMING_KEYS = {"seconds", "tokens_per_s"}


def _timing_file(rel: str) -> bool:
    """The training curves and their page hold wall times and rates (training_log.json holds
    the loss history, compared)."""
    return rel.endswith(("curves.jsonl", "curves.html")) or "tensorboard/" in rel


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root; manifests without their timing fields and files (wall clock
    differs)."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if _timing_file(path.relative_to(root).as_posix()):
            continue
        data = path.read_bytes()
        if path.name == "manifest.json":
            manifest = {k: v for k, v in json.loads(data).items() if k not in TIMING_KEYS}
            files = manifest.get("files", {})
            manifest["files"] = {rel: v for rel, v in files.items() if not _timing_file(rel)}
            data = json.dumps(manifest, sort_keys=True).encode()
        out[path.relative_to(root).as_posix()] = data
    return out


def _attempt(root: Path, raw: dict) -> None:
    """One attempt of the first four tasks, writing to fixed output paths under root."""
    from components.train_model import train_model

    root.mkdir(exist_ok=True)
    resolved = _artifact(Artifact, root / "config.yaml")
    resolve_config.python_func(
        config_yaml=yaml.safe_dump(raw), seed=0, general_ratio=-1.0, base_model="",
        datasets_json="", search_n=0, component_tokens=0, final_tokens=0, resolved=resolved,
    )  # fmt: skip
    dataset = _curate(resolved, root, "fp")
    model = _artifact(Model, root / "model")
    train_model.python_func(
        config=resolved, role="base", name="base", data=dataset, model=model,
        metrics=_artifact(Metrics, root / "train-metrics"),
        curves=_artifact(HTML, root / "train-curves.html"),
    )  # fmt: skip
    predict.python_func(
        config=resolved, data=dataset, round_index=0, num_shards=2,
        history_out=_artifact(Artifact, root / "history.jsonl"),
        result=_artifact(Artifact, root / "proposals.json"),
        metrics=_artifact(Metrics, root / "metrics"),
        report=_artifact(HTML, root / "report.html"),
    )  # fmt: skip


@pytest.mark.reliability
def test_a_retried_task_writes_the_same_outputs(tmp_path, corpus_dir, one_thread):
    from demix.config import resolve_config as resolve
    from demix.data.shards import CuratedData
    from demix.train import train_model as train

    raw = smoke_config_dict(corpus_dir)
    raw["train"]["base"]["tokens"] = 3000
    _attempt(tmp_path / "a", raw)
    first = _snapshot(tmp_path / "a")
    _attempt(tmp_path / "a", raw)  # retried after it had finished
    assert _snapshot(tmp_path / "a") == first

    # retried after an attempt that died mid-training: a checkpoint and a temporary left behind
    _attempt(tmp_path / "b", raw)
    shutil.rmtree(tmp_path / "b" / "model")
    config = resolve((tmp_path / "b" / "config.yaml").read_text())
    data = CuratedData(tmp_path / "b" / "dataset")
    train(
        tmp_path / "b" / "model", data, data.token_prior, config.train.base, config.train,
        config.model, config.seed, role="base", name="base", arch=config.model.architecture,
        stop_at_step=5, quiet=True,
    )  # fmt: skip
    (tmp_path / "b" / ".model.x1y2.tmp").mkdir()
    (tmp_path / "b" / ".model.x1y2.tmp" / "model.safetensors").write_bytes(b"half written")
    _attempt(tmp_path / "b", raw)
    assert _snapshot(tmp_path / "b") == first


@pytest.mark.parametrize(
    "root, expected",
    [
        (None, r"submit needs --pipeline-root gs://BUCKET/PATH"),
        ("minio://mlpipeline/v2/artifacts", r"minio://mlpipeline/v2/artifacts: .*use a gs://"),
        ("s3://bucket/root", r"s3://bucket/root: demix.storage cannot read it"),
    ],
)
def test_submit_refuses_a_pipeline_root_the_storage_layer_cannot_read(
    compiled, capsys, root, expected
):
    argv = ["submit", "--host", "http://kfp.example", "--package", str(compiled[0])]
    argv += ["--config", str(ROOT / "configs" / "demo.yaml")]
    argv += ["--pipeline-root", root] if root else []
    with mock.patch("deploy.service_errors.KfpClient") as client:
        assert pipeline.main(argv) == 2
    client.assert_not_called()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(expected, err), err


def test_submit_no_cache_turns_caching_off_on_both_backends(compiled):
    common = ["--config", str(ROOT / "configs" / "demo.yaml"), "--no-cache"]
    common += ["--pipeline-root", "gs://bucket/root"]
    with mock.patch("deploy.service_errors.KfpClient") as client:
        client.return_value.create_run_from_pipeline_package.return_value.run_id = "run-1"
        argv = ["submit", "--host", "http://kfp.example", "--package", str(compiled[0])]
        assert pipeline.main(argv + common) == 0
    kwargs = client.return_value.create_run_from_pipeline_package.call_args.kwargs
    assert kwargs["enable_caching"] is False and kwargs["pipeline_root"] == "gs://bucket/root"
    with mock.patch("google.cloud.aiplatform.PipelineJob") as job:
        job.return_value.resource_name = "projects/p/locations/r/pipelineJobs/demix-1"
        argv = ["submit", "--vertex", "--project", "p", "--region", "r"]
        assert pipeline.main(argv + ["--package", str(compiled[1])] + common) == 0
    assert job.call_args.kwargs["enable_caching"] is False
    job.return_value.submit.assert_called_once()


def _fingerprint(path: Path) -> str:
    """The data fingerprint the run's first task computes for the config at `path`."""
    from demix.config import load_config
    from demix.run_inputs import data_fingerprint

    return data_fingerprint(load_config(path).data)


def test_data_fingerprint_sees_a_changed_object_in_the_bucket_without_downloading(
    gcs, tmp_path, corpus_dir
):
    """gs:// datasets count by their listing's generation, crc32c and size (nothing is read):
    changing one object, or writing it again, gives another fingerprint."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket = storage.Client(project="t", credentials=AnonymousCredentials()).bucket(gcs.bucket)
    raw = smoke_config_dict(corpus_dir)
    for spec in raw["data"]["datasets"]:
        name = Path(spec["paths"][0]).name
        bucket.blob(f"corpus/{spec['name']}/{name}").upload_from_filename(str(corpus_dir / name))
        spec["paths"] = [f"gs://{gcs.bucket}/corpus/{spec['name']}"]  # a folder
    raw["data"]["datasets"][0]["paths"].append(str(corpus_dir / "general.jsonl"))  # and a file
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))

    gcs.plan.corrupt, gcs.plan.corrupt_times = "corpus", None  # counts every object download
    first = _fingerprint(config)
    assert first != "e3b0c44298fc1c14"  # the hash of nothing
    assert _fingerprint(config) == first
    bucket.blob("corpus/math/math.jsonl").upload_from_string(b'{"text": "1 + 1 = 2"}\n')
    changed = _fingerprint(config)
    assert changed != first
    bucket.blob("corpus/math/math.jsonl").upload_from_string(b'{"text": "1 + 1 = 2"}\n')
    assert _fingerprint(config) != changed  # same bytes, a new generation
    assert gcs.plan.counts["corrupted_download"] == 0, "the fingerprint downloaded an object"

    raw["data"]["targets"] = [{"name": "tickets", "paths": [f"gs://{gcs.bucket}/target"]}]
    bucket.blob("target/t.jsonl").upload_from_string(b'{"text": "Ticket 1: export fails"}\n')
    config.write_text(yaml.safe_dump(raw))
    with_target = _fingerprint(config)
    assert with_target != changed
    bucket.blob("target/t.jsonl").upload_from_string(b'{"text": "Ticket 2: import fails"}\n')
    assert _fingerprint(config) != with_target  # targets are curation inputs too

    raw["data"]["datasets"][1]["paths"] = [f"gs://{gcs.bucket}/corpus/nothing-here"]
    config.write_text(yaml.safe_dump(raw))
    from demix.errors import DataError

    with pytest.raises(DataError, match=r"corpus/nothing-here: no such object or folder"):
        _fingerprint(config)


def test_evaluate_final_publishes_the_verdict_as_markdown(compiled):
    """The KFP UI renders a Markdown artifact: the mixtures and the verdict, as make demo prints
    them (demix.report.summary.verdict_text)."""
    from demix.report.summary import verdict_markdown, verdict_text

    spec, _ = _spec(compiled[0])
    outputs = spec.components["comp-evaluate-final"].output_definitions.artifacts
    assert outputs["verdict"].artifact_type.schema_title == "system.Markdown"
    summary = {
        "datasets": ["a", "b"],
        "mixture": {"a": 0.7, "b": 0.3},
        "baselines": {"uniform": {"a": 0.5, "b": 0.5}, "token_prior": {"a": 0.6, "b": 0.4}},
        "final": {"chosen": {"seeds": 2}},
        "verdict": {
            b: {"objective": {"diff": 0.5, "ci_low": 0.1, "ci_high": 0.9, "verdict": "better"}}
            for b in ("uniform", "token_prior")
        },
    }
    page = verdict_markdown(summary)
    assert verdict_text(summary) in page and page.startswith("# DeMix")
    assert "vs token_prior" in page and "+0.500 [+0.100, +0.900] better" in page
    assert "2 seed(s)" in page


def test_demix_report_names_a_bad_config_json_in_one_line(tmp_path, capsys):
    """A run folder whose config.json is not a run config: one line naming the file and the
    key, exit 2, and no report.html written."""
    summary = {k: {} for k in ("datasets", "mixture", "baselines", "final", "verdict")}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "selection.json").write_text(json.dumps({"history": []}))
    (tmp_path / "config.json").write_text(json.dumps({"sed": 1}))
    assert demix_main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{tmp_path / 'config.json'}: data: required key is missing" in err
    assert not (tmp_path / "report.html").exists()
