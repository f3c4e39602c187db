"""Submitting a compiled pipeline to a Kubeflow Pipelines host or to Vertex AI Pipelines."""

from __future__ import annotations

from pathlib import Path

from deploy.fingerprint import data_fingerprint

PIPELINE_NAME = "demix"


def compiled_rounds(package: str | Path) -> int | None:
    """The search rounds unrolled into a compiled pipeline package (None when it records none)."""
    import yaml

    for document in yaml.safe_load_all(Path(package).read_text()):
        tasks = (document or {}).get("root", {}).get("dag", {}).get("tasks", {})
        value = (
            tasks.get("resolve-config", {})
            .get("inputs", {})
            .get("parameters", {})
            .get("compiled_rounds", {})
            .get("runtimeValue", {})
            .get("constant")
        )
        if value is not None:
            return int(value)
    return None


def check_pipeline_root(root: str | None) -> str:
    """The pipeline root, which must be gs://: tasks fetch artifacts by URI through demix.storage
    and publish checkpoints there, and demix.storage reads gs:// only.

    Raises ConfigError naming the root and what to use instead (Kubeflow's default is minio://).
    """
    from demix.errors import ConfigError

    if not root:
        raise ConfigError(
            "submit needs --pipeline-root gs://BUCKET/PATH: tasks read each other's artifacts "
            "by URI through demix.storage, which reads gs:// only (Kubeflow's default root is "
            "minio://)"
        )
    if not root.startswith("gs://") or not root[len("gs://") :].strip("/"):
        raise ConfigError(
            f"--pipeline-root {root}: demix.storage cannot read it; use a gs://BUCKET/PATH root "
            "(and give the cluster GCS credentials)"
        )
    return root


def submit(args) -> str:
    """Submit a compiled package to a KFP host or to Vertex AI; credentials come from the environment.

    `args.no_cache` turns caching off for every task (enable_caching=False on both backends).
    Raises ConfigError, before anything is submitted, when the pipeline root is not gs://, or
    the config's search.rounds differs from the rounds compiled into the package.
    """
    from demix.config import check_rounds, load_config

    root = check_pipeline_root(getattr(args, "pipeline_root", None))
    caching = not getattr(args, "no_cache", False)
    rounds = compiled_rounds(args.package)
    if rounds is not None:
        check_rounds(load_config(args.config), rounds, str(args.config))
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
            pipeline_root=root,
            parameter_values=params,
            project=args.project,
            location=args.region,
            enable_caching=caching,
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
        pipeline_root=root,
        enable_caching=caching,
    )
    return run.run_id
