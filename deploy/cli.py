"""`pipeline.py`'s command line: compile, run-local, submit, upload and schedule the pipeline.

pipeline.py defines the pipeline and hands its builder to `main` here; the flags of `compile`
become Placement settings (deploy.placement), `run-local` runs it with kfp.local
(deploy.local), the rest are deploy.submit's commands. One error contract: a DemixError prints
`pipeline.py: error: ...` on one line and exits with its code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from kfp import compiler

from components.image import CPU_IMAGE, CUDA_IMAGE, check_image
from demix.cli_outputs import add_set_argument
from demix.errors import ConfigError, DemixError, report_error
from deploy import local
from deploy.checks import (
    DEFAULT_SELECTOR_NOTE,
    EFFECTS,
    GKE_ACCELERATOR,
    check_pullable,
    parse_node_selector,
    parse_tolerations,
)
from deploy.placement import Placement, check_settings, parse_duration, parse_job_labels
from deploy.submit import COMMANDS, add_commands


def rounds_from_config(config_path: Path, rounds: int | None) -> int:
    """The config's search.rounds; ConfigError when --rounds says otherwise."""
    from demix.config import check_rounds, load_config

    config = load_config(config_path)
    if rounds is not None:
        check_rounds(config, rounds, str(config_path))
    return config.search.rounds


def compile_pipeline(
    build: Callable, target: str, out: str | Path, allow_local_images: bool = False, **placement
) -> Path:
    """Compile the pipeline `build(placement)` makes for `kubeflow` (GPU node selector + tolerations, kfp-kubernetes settings) or
    `vertex` (one YAML document); nothing is written when a check fails.

    Images under `localhost/` (the defaults of a local build) are refused unless
    `allow_local_images` (a cluster cannot pull them). Raises ConfigError for a setting the
    target cannot apply, a value it cannot take, or an image it cannot pull.
    """
    if target not in ("kubeflow", "vertex"):
        raise SystemExit(f"pipeline.py: error: --target {target!r} is not kubeflow or vertex")
    check_settings(target, placement)
    if placement.get("pipeline_root"):
        from deploy.submit import check_pipeline_root

        check_pipeline_root(placement["pipeline_root"], "compile")
    for key, flag in (("image", "--image"), ("image_cuda", "--image-cuda")):
        if placement.get(key) is not None:
            try:
                check_image(placement[key], flag)
            except ValueError as err:
                raise ConfigError(str(err)) from None
    chosen = Placement.for_target(target, **placement)
    if not allow_local_images:
        for key, flag in (("image", "--image"), ("image_cuda", "--image-cuda")):
            check_pullable(getattr(chosen, key), flag, default=placement.get(key) is None)
    out = Path(out)
    compiler.Compiler().compile(build(chosen), str(out))
    return out


def compile_settings(args) -> dict:
    """The Placement settings of `compile`'s flags (None: the target's default).

    `--timeout` is the timeout of every task; `--train-timeout`, `--eval-timeout` and
    `--cpu-timeout` override it by kind. Raises ConfigError for a bad duration, label, node
    selector or toleration.
    """
    every = parse_duration(args.timeout, "--timeout")
    timeouts = {
        f"{kind}_timeout": parse_duration(getattr(args, f"{kind}_timeout"), f"--{kind}-timeout")
        for kind in ("train", "eval", "cpu")
    }
    settings = {k: every if v is None else v for k, v in timeouts.items()}
    if every is not None and args.target == "vertex":
        settings = {"train_timeout": settings["train_timeout"]}  # what Vertex can apply
    names = (
        "accelerator_type",
        "accelerator_count",
        "eval_accelerator_count",
        "cpu",
        "memory",
        "cpu_task_cpu",
        "cpu_task_memory",
        "shm_size",
        "retries",
        "rounds",
        "parallelism",
        "ephemeral_volume",
        "storage_class",
        "nodes",
        "machine_type",
        "image",
        "image_cuda",
        "pipeline_root",
    )
    settings.update({k: getattr(args, k) for k in names})
    settings["spot"] = args.spot or None
    settings["job_service_account"] = args.service_account
    settings["job_encryption_key"] = args.encryption_key
    settings["job_labels"] = parse_job_labels(args.labels)
    settings["gpu_node_selector"] = parse_node_selector(args.gpu_node_selector, args.gpu_node_label)
    settings["gpu_tolerations"] = parse_tolerations(args.gpu_toleration)
    return settings


def build_parser(description: str) -> argparse.ArgumentParser:
    """`pipeline.py`'s argument parser: compile, run-local, submit, upload, schedule."""
    from demix import __version__

    parser = argparse.ArgumentParser(prog="pipeline.py", description=description)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    about = "compile the pipeline YAML for a Kubeflow Pipelines host or Vertex AI Pipelines"
    p = sub.add_parser("compile", help=about, description=about)
    p.add_argument(
        "--target",
        choices=["kubeflow", "vertex"],
        default="kubeflow",
        help="kubeflow (the default): a KFP host, with Kubernetes platform settings; vertex: "
        "one document Vertex AI Pipelines loads",
    )
    p.add_argument("--out", required=True, help="the pipeline package (YAML) to write")
    p.add_argument(
        "--accelerator-type",
        help="kubeflow: the device plugin's resource name (default nvidia.com/gpu; amd.com/gpu, "
        "...); vertex: an accelerator of Vertex AI (default NVIDIA_H100_80GB; NVIDIA_L4, "
        "NVIDIA_H200_141GB, ...)",
    )
    p.add_argument("--accelerator-count", type=int, help="GPUs of a training task (default 1)")
    p.add_argument(
        "--eval-accelerator-count",
        type=int,
        help="GPUs of an evaluation task (default 1: an evaluation shard uses one GPU)",
    )
    p.add_argument(
        "--gpu-node-selector",
        action="append",
        metavar="KEY=VALUE",
        help="kubeflow, repeatable: a node label GPU tasks require (default GKE's "
        f"{GKE_ACCELERATOR}=nvidia-h100-80gb; `none`: no selector). A selector no node "
        "matches leaves the pod Pending",
    )
    p.add_argument(
        "--gpu-node-label",
        metavar="VALUE",
        help=f"kubeflow: GKE's shorthand for --gpu-node-selector {GKE_ACCELERATOR}=VALUE",
    )
    p.add_argument(
        "--gpu-toleration",
        action="append",
        metavar="KEY[=VALUE]:EFFECT",
        help="kubeflow, repeatable: a taint GPU tasks tolerate, EFFECT one of "
        f"{', '.join(EFFECTS)}; KEY:EFFECT tolerates any value (default nvidia.com/gpu:NoSchedule; "
        "`none`: no toleration)",
    )
    p.add_argument("--cpu", help="CPU request and limit of a GPU task: 8, 0.5, 500m (default 8)")
    p.add_argument(
        "--memory", help="memory request and limit of a GPU task: 64G or 64Gi (default 64G)"
    )
    p.add_argument("--cpu-task-cpu", help="CPU request and limit of a CPU task (default 2)")
    p.add_argument("--cpu-task-memory", help="memory request and limit of a CPU task (default 8G)")
    p.add_argument(
        "--shm-size",
        help="kubeflow: size of the memory-backed /dev/shm of a task with several GPUs "
        "(default 16Gi; it counts against --memory)",
    )
    p.add_argument(
        "--retries",
        type=int,
        help="times a failed task runs again (spot preemption, a lost node); training resumes "
        "from its newest checkpoint (default 2)",
    )
    p.add_argument(
        "--timeout",
        help="how long any task may run: 90m, 12h, 2d (kubeflow: the pod's deadline; vertex: "
        "the multi-node training job's timeout); default none",
    )
    for kind, what in (
        ("train", "a GPU training task"),
        ("eval", "a GPU evaluation task (kubeflow)"),
        ("cpu", "a CPU task (kubeflow)"),
    ):
        p.add_argument(f"--{kind}-timeout", help=f"how long {what} may run; overrides --timeout")
    p.add_argument(
        "--parallelism",
        type=int,
        help="GPU tasks of one loop (components, proxies, finals) at once (default 0: unlimited)",
    )
    p.add_argument(
        "--spot",
        action="store_true",
        help="kubeflow: GPU tasks on GKE spot nodes; vertex with --nodes: a spot training job",
    )
    p.add_argument(
        "--ephemeral-volume",
        metavar="SIZE",
        help="kubeflow: a volume of SIZE (e.g. 500Gi) at /gcs/, where the launcher keeps "
        "artifacts, on each task that holds models (training, evaluation, merge, validate)",
    )
    p.add_argument("--storage-class", help="kubeflow: the ephemeral volume's StorageClass")
    p.add_argument(
        "--rounds", type=int, help="search rounds, unrolled at compile time (default: --config's)"
    )
    p.add_argument("--config", help="take the search rounds from this run config")
    p.add_argument(
        "--nodes",
        type=int,
        help="vertex: train on this many machines (a Vertex AI custom job; default 1)",
    )
    p.add_argument("--machine-type", help="vertex, with --nodes: e.g. a3-highgpu-8g")
    p.add_argument(
        "--service-account",
        help="vertex, with --nodes: the training job's service account (give submit the same)",
    )
    p.add_argument(
        "--encryption-key",
        help="vertex, with --nodes: the training job's Cloud KMS key (give submit the same)",
    )
    p.add_argument(
        "--labels",
        help="vertex, with --nodes: the training job's labels, KEY=VALUE,... "
        "(give submit the same; the run's labels are added)",
    )
    p.add_argument(
        "--image", help=f"image of the CPU tasks, NAME:TAG or NAME@sha256:D (default {CPU_IMAGE})"
    )
    p.add_argument(
        "--image-cuda",
        help=f"image of the GPU tasks, NAME:TAG or NAME@sha256:D (default {CUDA_IMAGE})",
    )
    p.add_argument(
        "--allow-local-images",
        action="store_true",
        help="compile with images under localhost/ (refused otherwise: a cluster cannot pull "
        "them), for nodes that have them",
    )
    p.add_argument(
        "--pipeline-root",
        help="gs://BUCKET/PATH written into the spec as its default root, for runs started from "
        "the KFP UI, the Vertex AI console or a schedule without one (Kubeflow's default, "
        "minio://, cannot be read by DeMix's tasks)",
    )
    about = "run the pipeline on this machine with kfp.local, each task in a subprocess"
    p = sub.add_parser("run-local", help=about, description=about)
    p.add_argument("config", nargs="?", help="run config YAML")
    p.add_argument("--config", dest="config_flag", metavar="CONFIG", help="the same as CONFIG")
    add_set_argument(p)
    p.add_argument(
        "--out", required=True, help="run folder: summary, report, mixture.json, verdict.md"
    )
    p.add_argument(
        "--pipeline-root",
        help="where the tasks' artifacts go (default: OUT/pipeline-root); reused across runs, "
        "it makes unchanged tasks cache hits",
    )
    p.add_argument(
        "--eval-workers",
        type=int,
        default=1,
        help="evaluation shards per round (default 1 locally)",
    )
    add_commands(sub)
    return parser


def main(argv: list[str] | None, build: Callable, description: str) -> int:
    """`pipeline.py`'s commands for the pipeline `build(placement)` makes; the exit code (a
    DemixError: one line `pipeline.py: error: ...` and its code)."""
    args = build_parser(description).parse_args(argv)

    try:
        if args.command == "compile":
            if args.config:
                args.rounds = rounds_from_config(Path(args.config), args.rounds)
            placement = compile_settings(args)
            out = compile_pipeline(
                build,
                args.target,
                args.out,
                allow_local_images=args.allow_local_images,
                **placement,
            )
            if args.target == "kubeflow" and placement["gpu_node_selector"] is None:
                print(f"pipeline.py: note: {DEFAULT_SELECTOR_NOTE}", file=sys.stderr)
            print(out)
        elif args.command == "run-local":
            from demix.cli_outputs import parse_overrides
            from demix.report import print_summary

            if bool(args.config) == bool(args.config_flag):
                raise ConfigError("run-local needs the run config: give CONFIG (or --config) once")
            from demix.cli_outputs import demo_out
            from demix.config import load_config
            from demix.storage.locks import output_locks
            from demix.storage.outputs import LOCAL_RUN_KIND, Output, check_output, claim_folder

            out, config_path = Path(args.out), Path(args.config or args.config_flag)
            overrides = parse_overrides(args.set)
            fetched = load_config(config_path, overrides).data.fetch_demo
            # the run folder and the demo folder it fetches into: never over what demix did not
            # write, one run at a time; a failed run's folder stays (its log, its cached tasks)
            for output in (Output(out, LOCAL_RUN_KIND, "folder"), *demo_out(fetched)):
                check_output(output)
            with output_locks([out]):
                claim_folder(out, LOCAL_RUN_KIND)
                summary = local.run_local(
                    build,
                    config_path,
                    out,
                    Path(args.pipeline_root) if args.pipeline_root else None,
                    args.eval_workers,
                    overrides=overrides,
                )
            print_summary(summary, out)
        else:
            print(COMMANDS[args.command](args))
    except DemixError as err:
        return report_error(err, program="pipeline.py")
    return 0
