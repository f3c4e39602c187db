"""The DeMix KFP v2 pipeline: compile it for Kubeflow or Vertex AI, run it locally, submit it.

    python pipeline.py compile --target kubeflow --out demix-kubeflow.yaml
    python pipeline.py compile --target vertex --out demix-vertex.yaml
    python pipeline.py compile --target vertex --out demix-vertex.yaml --nodes 4 \
        --machine-type a3-highgpu-8g --accelerator-type NVIDIA_H100_80GB --accelerator-count 8
    python pipeline.py run-local --config configs/demo.yaml --out runs/demo
    python pipeline.py submit --host URL --package demix-kubeflow.yaml --config configs/demo.yaml
    python pipeline.py submit --vertex --project P --region R --pipeline-root gs://B/root ...

Targets KFP SDK 2.17.3 (pinned in pyproject.toml) with Kubeflow Pipelines backend 2.5 or newer
(IR schema 2.1.0), and Vertex AI Pipelines.
"""

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from kfp import compiler, dsl

from components.collect_models import collect_models
from components.curate_data import curate_data
from components.curate_group import curate_group
from components.dataset_names import dataset_names
from components.evaluate_final import evaluate_final
from components.evaluate_proxies import evaluate_proxies
from components.image import CUDA_IMAGE
from components.merge import merge
from components.plan_curation import plan_curation
from components.predict import predict
from components.resolve_config import resolve_config
from components.train_final import train_final
from components.train_model import train_model
from components.validate_fidelity import validate_fidelity

PIPELINE_NAME = "demix"
FINAL_LABELS = ["chosen", "uniform", "token_prior"]


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
    rounds: int = 3
    # Concurrent loop iterations (0: unlimited). Local runs use 1: two torch processes sharing
    # a few cores run far slower than one after the other.
    parallelism: int = 0
    # Training on several machines (vertex only): a Vertex AI custom job of `nodes` machines of
    # `machine_type`, each with accelerator_count GPUs of accelerator_type.
    nodes: int = 1
    machine_type: str = ""

    @classmethod
    def for_target(cls, target: str, **overrides) -> "Placement":
        defaults = {
            "vertex": {"accelerator_type": "NVIDIA_H100_80GB"},
            "local": {"parallelism": 1},
        }.get(target, {})
        return cls(
            target=target, **{**defaults, **{k: v for k, v in overrides.items() if v is not None}}
        )


def _on_gpu(task: dsl.PipelineTask, placement: Placement) -> dsl.PipelineTask:
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


def _training(placement: Placement) -> dict:
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
            CUDA_IMAGE,
        )
    return {"processes": placement.accelerator_count, "cluster": cluster}


def _on_training_gpus(task: dsl.PipelineTask, placement: Placement) -> dsl.PipelineTask:
    """GPU placement of a training task; with several machines the custom job holds the GPUs
    and the task only starts it and waits."""
    return _on_cpu(task, placement) if placement.nodes > 1 else _on_gpu(task, placement)


def _on_cpu(task: dsl.PipelineTask, placement: Placement) -> dsl.PipelineTask:
    task.set_cpu_request("2").set_memory_request("8G")
    task.set_retry(num_retries=placement.retries, backoff_duration="30s", backoff_factor=2.0)
    return task


def build_pipeline(placement: Placement):
    """The pipeline function for one placement; search rounds are unrolled at compile time."""

    @dsl.pipeline(name=PIPELINE_NAME, description="DeMix: data-mixture search by model merging")
    def demix_pipeline(
        config_yaml: str,
        data_fingerprint: str = "",
        seed: int = 0,
        general_ratio: float = -1.0,
        base_model: str = "",
        datasets_json: str = "",
        search_n: int = 0,
        component_tokens: int = 0,
        final_tokens: int = 0,
        num_eval_workers: int = 2,
        validate: bool = False,
    ):
        config = _on_cpu(
            resolve_config(
                config_yaml=config_yaml,
                seed=seed,
                general_ratio=general_ratio,
                base_model=base_model,
                datasets_json=datasets_json,
                search_n=search_n,
                component_tokens=component_tokens,
                final_tokens=final_tokens,
            ),
            placement,
        ).set_caching_options(True)
        cfg = config.outputs["resolved"]  # an artifact: see components/resolve_config.py
        # Curation: plan (files, groups, tokenizer) -> one task per group -> merge.
        plan = _on_cpu(plan_curation(config=cfg, data_fingerprint=data_fingerprint), placement)
        with dsl.ParallelFor(plan.outputs["Output"], parallelism=placement.parallelism) as group:
            part = _on_cpu(curate_group(plan=plan.outputs["plan"], group=group), placement)
        data = _on_cpu(
            curate_data(
                plan=plan.outputs["plan"],
                parts=dsl.Collected(part.outputs["part"]),
                data_fingerprint=data_fingerprint,
            ),
            placement,
        )
        dataset = data.outputs["dataset"]
        training = _training(placement)
        base = _on_training_gpus(
            train_model(config=cfg, role="base", name="base", data=dataset, **training), placement
        )
        base_model_artifact = base.outputs["model"]

        names = _on_cpu(dataset_names(config=cfg), placement)
        with dsl.ParallelFor(names.output, parallelism=placement.parallelism) as name:
            component = _on_training_gpus(
                train_model(
                    config=cfg,
                    role="component",
                    name=name,
                    data=dataset,
                    init=base_model_artifact,
                    **training,
                ),
                placement,
            )

        # A Collected object must not be shared between consumers (the compiler loses track of it).
        def components():
            return dsl.Collected(component.outputs["model"])

        index = _on_cpu(collect_models(models=components()), placement).outputs["index"]

        step = _on_cpu(
            predict(config=cfg, data=dataset, round_index=0, num_shards=num_eval_workers),
            placement,
        )
        for r in range(1, placement.rounds + 1):
            with dsl.ParallelFor(
                step.outputs["Output"], parallelism=placement.parallelism
            ) as shard:
                scored = _on_gpu(
                    evaluate_proxies(
                        config=cfg,
                        data=dataset,
                        base=base_model_artifact,
                        component_index=index,
                        proposals=step.outputs["result"],
                        shard=shard,
                        num_shards=num_eval_workers,
                    ),
                    placement,
                )
            step = _on_cpu(
                predict(
                    config=cfg,
                    data=dataset,
                    round_index=r if r < placement.rounds else -1,
                    num_shards=num_eval_workers,
                    history=step.outputs["history_out"],
                    scores=dsl.Collected(scored.outputs["scores"]),
                ),
                placement,
            )
        selection = step.outputs["result"]

        # Optional fidelity check (off by default): trained references vs merged proxies.
        with dsl.If(validate == True, name="validate"):  # noqa: E712 (a KFP condition)
            _on_gpu(
                validate_fidelity(
                    config=cfg, data=dataset, base=base_model_artifact, component_index=index
                ),
                placement,
            )

        _on_cpu(
            merge(
                config=cfg,
                data=dataset,
                base=base_model_artifact,
                components=components(),
                selection=selection,
            ),
            placement,
        )
        with dsl.ParallelFor(FINAL_LABELS, parallelism=placement.parallelism) as label:
            final = _on_training_gpus(
                train_final(
                    config=cfg,
                    label=label,
                    data=dataset,
                    base=base_model_artifact,
                    selection=selection,
                    **training,
                ),
                placement,
            )
        _on_gpu(
            evaluate_final(
                config=cfg,
                data=dataset,
                base=base_model_artifact,
                components=components(),
                finals=dsl.Collected(final.outputs["model"]),
                selection=selection,
            ),
            placement,
        )

    return demix_pipeline


def compile_pipeline(target: str, out: str | Path, **placement) -> Path:
    """Compile for `kubeflow` (GPU node selector + toleration) or `vertex` (one YAML document)."""
    if target not in ("kubeflow", "vertex"):
        raise SystemExit(f"pipeline.py: error: --target {target!r} is not kubeflow or vertex")
    nodes = placement.get("nodes") or 1
    if nodes > 1 and target != "vertex":
        raise SystemExit(
            f"pipeline.py: error: --nodes {nodes} runs training as a Vertex AI custom job; "
            "compile with --target vertex"
        )
    if nodes > 1 and not placement.get("machine_type"):
        raise SystemExit(
            f"pipeline.py: error: --nodes {nodes} needs --machine-type (e.g. a3-highgpu-8g)"
        )
    out = Path(out)
    compiler.Compiler().compile(build_pipeline(Placement.for_target(target, **placement)), str(out))
    return out


def data_fingerprint(config_path: Path) -> str:
    """sha256 over the candidate datasets' local files, so changed data is never a cache hit."""
    from demix.config import load_config
    from demix.data.curate import dataset_files
    from demix.storage import sha256_file

    config = load_config(config_path)
    h = hashlib.sha256()
    for spec in config.data.datasets:
        try:
            files = dataset_files(spec)
        except Exception:  # noqa: BLE001 (remote or not yet fetched: hashed by name only)
            files = []
        for path in files:
            h.update(f"{spec.name}:{path.name}:{sha256_file(path)}".encode())
    return h.hexdigest()[:16]


def run_local(
    config_path: Path, out: Path, pipeline_root: Path | None = None, num_eval_workers: int = 2
) -> dict:
    """Run the same pipeline with kfp.local (SubprocessRunner, current interpreter).

    Copies summary.json and report.html of the run into `out`; returns the summary.
    """
    import warnings

    from kfp import local

    from demix.config import config_yaml, load_config

    # Resource, accelerator and image settings are meaningless to the local runner.
    warnings.filterwarnings(
        "ignore", message=".*(no effect in the current local runner|non-Python base image).*"
    )
    from demix.data.demo import fetch_demo
    from demix.storage import atomic_write_json

    started = time.perf_counter()
    config = load_config(config_path)
    if config.data.fetch_demo:
        fetch_demo(Path(config.data.fetch_demo))
    fetch_seconds = round(time.perf_counter() - started, 1)
    root = Path(pipeline_root or out / "pipeline-root").resolve()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    pipeline = build_pipeline(Placement.for_target("local", rounds=config.search.rounds))
    pipeline(
        config_yaml=_absolute_paths(config_yaml(config)),
        data_fingerprint=data_fingerprint(config_path),
        seed=config.seed,
        num_eval_workers=num_eval_workers,
    )
    runs = sorted(
        root.glob(f"{PIPELINE_NAME}-*/evaluate-final/summary"), key=lambda p: p.stat().st_mtime
    )
    if not runs:
        raise SystemExit(
            f"pipeline.py: error: no evaluate-final output under {root}; see the log above"
        )
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(runs[-1] / "report.html", out / "report.html")
    summary = json.loads((runs[-1] / "summary.json").read_text())
    # Stage timings come from the artifacts; the wall time adds the local runner's own overhead.
    summary["timings_s"] = {
        "fetch": fetch_seconds,
        **summary["timings_s"],
        "pipeline_wall": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def _absolute_paths(text: str) -> str:
    """Local components run in another working directory: make data paths absolute."""
    import yaml

    raw = yaml.safe_load(text)
    for spec in raw["data"]["datasets"]:
        spec["paths"] = [p if "://" in p else str(Path(p).resolve()) for p in spec["paths"]]
    for section, key in (
        ("data", "fetch_demo"),
        ("evaluate", "data_dir"),
        ("evaluate", "include_path"),
        ("model", "base"),
    ):
        value = raw[section].get(key)
        if value and "://" not in value:
            raw[section][key] = str(Path(value).resolve())
    return yaml.safe_dump(raw, sort_keys=False)


def submit(args) -> str:
    """Submit a compiled package to a KFP host or to Vertex AI; credentials come from the environment."""
    params = {
        "config_yaml": Path(args.config).read_text(),
        "data_fingerprint": data_fingerprint(Path(args.config)),
        "num_eval_workers": args.eval_workers,
    }
    if args.vertex:
        from google.cloud import aiplatform

        job = aiplatform.PipelineJob(
            display_name=PIPELINE_NAME,
            template_path=args.package,
            pipeline_root=args.pipeline_root,
            parameter_values=params,
            project=args.project,
            location=args.region,
            enable_caching=True,
        )
        job.submit()
        return job.resource_name
    import kfp

    client = kfp.Client(host=args.host)
    run = client.create_run_from_pipeline_package(
        args.package,
        arguments=params,
        run_name=args.run_name,
        experiment_name=args.experiment,
        enable_caching=True,
    )
    return run.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compile", help="compile the pipeline YAML")
    p.add_argument("--target", choices=["kubeflow", "vertex"], default="kubeflow")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--accelerator-type",
        help="kubeflow: resource name (nvidia.com/gpu); vertex: e.g. NVIDIA_H100_80GB",
    )
    p.add_argument("--accelerator-count", type=int)
    p.add_argument("--gpu-node-label", help="kubeflow: cloud.google.com/gke-accelerator value")
    p.add_argument("--cpu")
    p.add_argument("--memory")
    p.add_argument("--retries", type=int)
    p.add_argument("--rounds", type=int, help="search rounds, unrolled at compile time (default 3)")
    p.add_argument(
        "--nodes",
        type=int,
        help="vertex: train on this many machines (a Vertex AI custom job; default 1)",
    )
    p.add_argument("--machine-type", help="vertex, with --nodes: e.g. a3-highgpu-8g")
    p = sub.add_parser("run-local", help="run the pipeline locally with kfp.local")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--pipeline-root")
    p.add_argument(
        "--eval-workers",
        type=int,
        default=1,
        help="evaluation shards per round (default 1 locally)",
    )
    p = sub.add_parser("submit", help="submit a compiled pipeline")
    p.add_argument("--package", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--eval-workers", type=int, default=2)
    p.add_argument("--host", help="KFP API endpoint")
    p.add_argument("--experiment", default="demix")
    p.add_argument("--run-name", default="demix")
    p.add_argument("--vertex", action="store_true")
    p.add_argument("--project")
    p.add_argument("--region")
    p.add_argument("--pipeline-root")
    args = parser.parse_args(argv)

    from demix.errors import DemixError

    try:
        if args.command == "compile":
            placement = {
                k: getattr(args, k)
                for k in (
                    "accelerator_type",
                    "accelerator_count",
                    "gpu_node_label",
                    "cpu",
                    "memory",
                    "retries",
                    "rounds",
                    "nodes",
                    "machine_type",
                )
            }
            print(compile_pipeline(args.target, args.out, **placement))
        elif args.command == "run-local":
            from demix.report import print_summary

            out = Path(args.out)
            summary = run_local(
                Path(args.config),
                out,
                Path(args.pipeline_root) if args.pipeline_root else None,
                args.eval_workers,
            )
            print_summary(summary, out)
        else:
            if not args.vertex and not args.host:
                parser.error("submit needs --host URL or --vertex")
            if args.vertex and not (args.project and args.region and args.pipeline_root):
                parser.error("submit --vertex needs --project, --region and --pipeline-root")
            print(submit(args))
    except DemixError as err:
        print(f"pipeline.py: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
