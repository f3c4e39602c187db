"""Submitting, uploading and scheduling a compiled pipeline: on a Kubeflow Pipelines host
(kfp.Client) or on Vertex AI Pipelines (aiplatform.PipelineJob, kfp.registry.RegistryClient).

Credentials come from the environment. Everything the CLI can check (flags of the other backend,
parameter names and types, the pipeline root, the search rounds, cron and start time) is checked
before a client is created, and refused with one line. Every client creation and call runs in
deploy.service_errors.service_call (a network or credential failure is one line naming the
host); `submit --wait` follows the run with deploy.follow.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

from demix.cli_outputs import add_set_argument
from demix.errors import ConfigError
from deploy.follow import check_wait, follow_run, kubeflow_look, vertex_look
from deploy.parameters import (
    compiled_job,
    package_documents,
    package_name,
    package_root,
    package_spec,
    parse_cron,
    parse_labels,
    parse_start_time,
    run_parameters,
)
from deploy.service_errors import (
    kfp_client,
    kubeflow_service,
    service_call,
    vertex_service,
)

PIPELINE_NAME = "demix"

# Settings of one backend: given for the other, they are refused, never dropped.
KUBEFLOW_ONLY = {
    "host": "--host",
    "namespace": "--namespace",
    "name": "--name",
    "version": "--version",
    "pipeline_id": "--pipeline-id",
    "version_id": "--version-id",
}
VERTEX_ONLY = {
    "project": "--project",
    "region": "--region",
    "network": "--network",
    "encryption_key": "--encryption-key",
    "labels": "--labels",
    "registry": "--registry",
    "tag": "--tag",
}


def add_commands(sub) -> None:
    """The submit, upload and schedule subcommands of pipeline.py."""
    backend = argparse.ArgumentParser(add_help=False)
    backend.add_argument("--package", required=True, help="the compiled pipeline YAML")
    backend.add_argument(
        "--vertex", action="store_true", help="Vertex AI Pipelines (default: Kubeflow, --host)"
    )
    backend.add_argument("--host", help="kubeflow: the KFP API endpoint")
    backend.add_argument("--namespace", help="kubeflow: the namespace (multi-user deployments)")

    run = argparse.ArgumentParser(add_help=False)
    run.add_argument(
        "config",
        nargs="?",
        help="the run config: a local file (sent as the config_yaml parameter) or a gs:// URI "
        "(sent as config_uri, read by the run's first task)",
    )
    run.add_argument("--config", dest="config_flag", metavar="CONFIG", help="the same as CONFIG")
    add_set_argument(
        run,
        "override a key of a local config, e.g. --set search.n=16 (repeatable); the run gets "
        "the overridden YAML",
    )
    run.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a pipeline parameter (repeatable); checked against the package's parameters",
    )
    run.add_argument("--eval-workers", type=int, help="the num_eval_workers parameter")
    run.add_argument(
        "--run-name", default=PIPELINE_NAME, help="the run's (or schedule's) display name"
    )
    run.add_argument("--experiment", help="the experiment to file runs under (kubeflow: demix)")
    run.add_argument("--pipeline-root", help="gs://BUCKET/PATH where the tasks' artifacts go")
    run.add_argument("--service-account", help="the service account the tasks run as")
    run.add_argument("--project", help="vertex: the Google Cloud project")
    run.add_argument("--region", help="vertex: the region, e.g. us-central1")
    run.add_argument(
        "--network", help="vertex: peered VPC network, projects/NUMBER/global/networks/NAME"
    )
    run.add_argument(
        "--encryption-key",
        help="vertex: Cloud KMS key for the run's resources, projects/P/locations/R/keyRings/"
        "K/cryptoKeys/NAME",
    )
    run.add_argument("--labels", help="vertex: labels of the run, KEY=VALUE,KEY=VALUE")
    run.add_argument(
        "--no-cache",
        action="store_true",
        help="run every task again (caching off); by default unchanged tasks are cache hits, as "
        "the run's first task fingerprints the data and base anew for every run",
    )

    about = "start a run of a compiled pipeline"
    p = sub.add_parser(
        "submit",
        parents=[backend, run],
        help=about,
        description=f"{about}; prints its id (Kubeflow) or resource name (Vertex AI). Exit "
        "codes: 0 started (with --wait: the run succeeded); 1 with --wait: the run failed or "
        "was cancelled; 2 bad input, or the host cannot be reached or refused the credentials "
        "(one line naming it and what to check); 124 --wait-timeout passed (the run goes on)",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the run to its end: one line per task state change (NAME: STATE) and the "
        "run's final state; the exit code is the run's result (0 succeeded, 1 failed or "
        "cancelled)",
    )
    p.add_argument(
        "--poll-seconds",
        type=float,
        help="with --wait: seconds between two looks at the run (default 30)",
    )
    p.add_argument(
        "--wait-timeout",
        type=float,
        help="with --wait: give up after this many seconds with one line and exit code 124 "
        "(the run goes on); default: wait for the end",
    )

    about = "upload a compiled pipeline"
    p = sub.add_parser("upload", parents=[backend], help=about, description=about)
    p.add_argument("--name", help=f"kubeflow: the pipeline's name (default {PIPELINE_NAME})")
    p.add_argument(
        "--version",
        help="kubeflow: the name of a new version of an existing pipeline "
        "(default NAME-<first 12 hex digits of the package's sha256>)",
    )
    p.add_argument(
        "--registry", help="vertex: the Artifact Registry repository's URL, https://HOST/P/REPO"
    )
    p.add_argument(
        "--tag", action="append", default=[], help="vertex: a tag of the template (repeatable)"
    )

    about = "start runs of a compiled pipeline on a schedule"
    p = sub.add_parser("schedule", parents=[backend, run], help=about, description=about)
    p.add_argument(
        "--cron", required=True, help="five fields: minute hour day month weekday ('0 3 * * 1')"
    )
    p.add_argument(
        "--max-concurrency", type=int, default=1, help="runs of the schedule at once (default 1)"
    )
    p.add_argument("--start-time", help="ISO 8601 with a UTC offset (default: now)")
    p.add_argument("--pipeline-id", help="kubeflow, with --version-id: run an uploaded version")
    p.add_argument("--version-id", help="kubeflow: the uploaded version (of the same --package)")
    p.add_argument(
        "--no-catchup",
        action="store_true",
        help="skip the runs missed while the schedule was paused or behind: start only the "
        "latest. Kubeflow: the recurring run's no_catchup (without the flag Kubeflow backfills "
        "every missed run). Vertex AI schedules never backfill on their own (Schedule.catch_up "
        "is off unless a resume asks for it), so there the flag changes nothing",
    )


def check_job_settings(args) -> None:
    """A Vertex package whose training runs as a custom job: the run's service account, CMEK
    key and labels must be the job's (compiled with the same flags), or the job would run
    under another identity or key than the run. Raises ConfigError naming the flag."""
    job = compiled_job(args.package) if args.vertex else None
    if job is None:
        return
    given = {
        "--service-account": (args.service_account or "", job["service_account"]),
        "--encryption-key": (args.encryption_key or "", job["encryption_key"]),
        "--labels": (parse_labels(args.labels), job["labels"]),
    }
    for flag, (run, compiled) in given.items():
        if run != compiled:
            shown = (
                ",".join(f"{k}={v}" for k, v in compiled.items())
                if flag == "--labels"
                else compiled
            )
            raise ConfigError(
                f"{flag}: the package's multi-node training job was compiled with "
                f"{flag} {shown or '(none)'}; give the run the same (or compile again)"
            )


def check_pipeline_root(root: str | None, command: str = "submit") -> str:
    """The pipeline root, which must be gs://: tasks fetch artifacts by URI through demix.storage
    and publish checkpoints there, and demix.storage reads gs:// only.

    Raises ConfigError naming the root and what to use instead (Kubeflow's default is minio://).
    """
    if not root:
        raise ConfigError(
            f"{command} needs --pipeline-root gs://BUCKET/PATH (or a package compiled with one): "
            "tasks read each other's artifacts "
            "by URI through demix.storage, which reads gs:// only (Kubeflow's default root is "
            "minio://)"
        )
    if not root.startswith("gs://") or not root[len("gs://") :].strip("/"):
        raise ConfigError(
            f"--pipeline-root {root}: demix.storage cannot read it; use a gs://BUCKET/PATH root "
            "(and give the cluster GCS credentials)"
        )
    return root


def check_backend(args, vertex_needs: tuple[str, ...]) -> None:
    """Refuse a setting of the other backend, and a missing --host or Vertex setting."""
    other = KUBEFLOW_ONLY if args.vertex else VERTEX_ONLY
    for attr, flag in other.items():
        if getattr(args, attr, None):
            where = "Kubeflow (drop --vertex)" if args.vertex else "Vertex AI (with --vertex)"
            raise ConfigError(f"{flag} is a setting for {where}")
    if not args.vertex:
        if not args.host:
            raise ConfigError(f"{args.command} needs --host URL (a KFP endpoint) or --vertex")
        return
    missing = [f"--{name.replace('_', '-')}" for name in vertex_needs if not getattr(args, name)]
    if missing:
        raise ConfigError(f"--vertex needs {', '.join(missing)}")
    if len(package_documents(args.package)) > 1:
        raise ConfigError(
            f"{args.package} has Kubeflow platform settings Vertex AI cannot load; "
            "compile with --target vertex"
        )


def _prepare_run(args) -> tuple[str, dict]:
    """Checks shared by submit and schedule; the pipeline root and the parameter values."""
    check_backend(args, ("project", "region"))
    root = check_pipeline_root(args.pipeline_root or package_root(args.package), args.command)
    parse_labels(args.labels)
    check_job_settings(args)
    return root, run_parameters(args)


def _vertex_job(args, root: str, params: dict, caching: bool):
    """The Vertex AI pipeline job of a run (checked by _prepare_run first)."""
    from google.cloud import aiplatform

    return aiplatform.PipelineJob(
        display_name=args.run_name,
        template_path=args.package,
        pipeline_root=root,
        parameter_values=params,
        enable_caching=caching,
        encryption_spec_key_name=args.encryption_key,
        labels=parse_labels(args.labels) or None,
        project=args.project,
        location=args.region,
    )


def submit(args) -> str:
    """Start one run; returns the run's id (Kubeflow) or resource name (Vertex AI).

    `--no-cache` turns caching off for every task (enable_caching=False on both backends).
    `--wait` follows the run to its end (deploy.follow) before returning.
    Raises ConfigError for bad flags, ServiceError when the service cannot be reached or refuses
    the request, WaitEnded (exit 1, 124 or 130) when a followed run does not succeed.
    """
    check_wait(args)
    root, params = _prepare_run(args)
    caching = not args.no_cache
    if args.vertex:
        where, flag = vertex_service(args), "--project and --region"
        with service_call(where, flag):
            job = _vertex_job(args, root, params, caching)
            job.submit(
                service_account=args.service_account,
                network=args.network,
                experiment=args.experiment,
            )
        made = job.resource_name
        run, look = made.rsplit("/", 1)[-1], vertex_look(job, package_name(args.package))
    else:
        where, flag = kubeflow_service(args), "--host"
        with service_call(where, flag):
            client = kfp_client(args)
            made = client.create_run_from_pipeline_package(
                args.package,
                arguments=params,
                run_name=args.run_name,
                experiment_name=args.experiment or PIPELINE_NAME,
                namespace=args.namespace,
                pipeline_root=root,
                enable_caching=caching,
                service_account=args.service_account,
            ).run_id
        run, look = made, kubeflow_look(client, made)
    if args.wait:

        def guarded_look():
            with service_call(where, flag):
                return look()

        follow_run(run, guarded_look, args.poll_seconds or 30.0, args.wait_timeout)
    return made


def schedule(args) -> str:
    """Start runs on a cron schedule; returns the recurring run's id (Kubeflow) or the
    schedule's resource name (Vertex AI). Caching is on unless `--no-cache`: each run's first
    task fingerprints the data and base anew, so only what changed runs again. `--no-catchup`
    sets Kubeflow's no_catchup; a Vertex AI schedule never backfills on its own.
    Raises ConfigError for bad flags, ServiceError when the service cannot be reached or refuses
    the request."""
    check_backend(args, ("project", "region"))
    cron = parse_cron(args.cron, args.vertex)
    start = parse_start_time(args.start_time)
    if args.max_concurrency < 1:
        raise ConfigError(f"--max-concurrency {args.max_concurrency}: at least 1")
    if args.vertex and args.experiment:
        raise ConfigError("--experiment: a Vertex AI schedule (create_schedule) takes none")
    if bool(args.pipeline_id) != bool(args.version_id):
        raise ConfigError("--pipeline-id and --version-id go together")
    root, params = _prepare_run(args)
    if args.vertex:
        with service_call(vertex_service(args), "--project and --region"):
            made = _vertex_job(args, root, params, not args.no_cache).create_schedule(
                cron=cron,
                display_name=args.run_name,
                start_time=start,
                max_concurrent_run_count=args.max_concurrency,
                service_account=args.service_account,
                network=args.network,
            )
        return made.resource_name
    if args.pipeline_id:
        extra = {"pipeline_id": args.pipeline_id, "version_id": args.version_id}
    else:
        extra = {"pipeline_package_path": args.package}
    if args.no_catchup:  # without the flag nothing is sent: the server's default (backfill)
        extra["no_catchup"] = True
    with service_call(kubeflow_service(args), "--host"):
        client = kfp_client(args)
        experiment = client.create_experiment(
            args.experiment or PIPELINE_NAME, namespace=args.namespace
        )
        made = client.create_recurring_run(
            experiment_id=experiment.experiment_id,
            job_name=args.run_name,
            cron_expression=cron,
            max_concurrency=args.max_concurrency,
            start_time=start,
            params=params,
            pipeline_root=root,
            enable_caching=not args.no_cache,
            service_account=args.service_account,
            **extra,
        )
    return made.recurring_run_id


def find_pipeline(client, name: str, namespace: str | None) -> str | None:
    """The id of the Kubeflow pipeline named `name` in `namespace` (None: the shared ones), or
    None when there is none.

    kfp.Client.get_pipeline_id takes no namespace, so it never finds a private pipeline: the
    pipelines are listed with a name filter and the namespace instead.
    Raises ConfigError when several pipelines there have the name.
    """
    # a v2beta1 Filter in proto JSON, as kfp.Client.get_pipeline_id writes it
    by_name = {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}
    found = client.list_pipelines(filter=json.dumps(by_name), namespace=namespace, page_size=2)
    pipelines = found.pipelines or []
    if len(pipelines) > 1:
        where = f"namespace {namespace!r}" if namespace else "the shared pipelines"
        raise ConfigError(
            f"--name {name}: several pipelines of that name in {where}; give another --name"
        )
    return pipelines[0].pipeline_id if pipelines else None


def upload(args) -> str:
    """Upload the package: to a Kubeflow host as a pipeline, or a new version of the pipeline
    of that name in --namespace (find_pipeline); or to an Artifact Registry repository as a
    template (Vertex AI).

    Returns the pipeline id (and the version's id), or the template's name and version.
    Raises ConfigError for flags of the other backend, a bad --registry, --version when there
    is no pipeline of that name yet, or a version name the pipeline already has; ServiceError
    when the host or repository cannot be reached or refuses the request.
    """
    check_backend(args, ("registry",))
    if args.vertex:
        if not re.fullmatch(r"https://[^/\s]+/[^/\s]+/[^/\s]+/?", args.registry):
            raise ConfigError(
                f"--registry {args.registry}: expected the repository's URL, https://HOST/"
                "PROJECT/REPOSITORY"
            )
        from kfp.registry import RegistryClient

        with service_call(f"Artifact Registry {args.registry}", "--registry"):
            template, version = RegistryClient(host=args.registry).upload_pipeline(
                file_name=args.package, tags=args.tag or None
            )
        return f"{template} {version}"
    with service_call(kubeflow_service(args), "--host"):
        return _upload_to_kubeflow(args)


def _upload_to_kubeflow(args) -> str:
    """upload on a Kubeflow host (see upload)."""
    name = args.name or PIPELINE_NAME
    description = package_spec(args.package).get("pipelineInfo", {}).get("description")
    import kfp_server_api

    client = kfp_client(args)
    pipeline_id = find_pipeline(client, name, args.namespace)
    where = f" in namespace {args.namespace!r}" if args.namespace else ""
    if pipeline_id is None:
        if args.version:
            raise ConfigError(
                f"--version {args.version}: there is no pipeline {name!r}{where} yet; upload it "
                "once without --version (its first version takes the pipeline's name)"
            )
        made = client.upload_pipeline(
            args.package, pipeline_name=name, description=description, namespace=args.namespace
        )
        return made.pipeline_id
    digest = hashlib.sha256(Path(args.package).read_bytes()).hexdigest()
    # the version goes to the pipeline found in the namespace, by its id (the API takes no
    # namespace for a version: it belongs to its pipeline's)
    version = args.version or f"{name}-{digest[:12]}"
    try:
        made = client.upload_pipeline_version(
            args.package,
            pipeline_version_name=version,
            pipeline_id=pipeline_id,
            description=description,
        )
    except kfp_server_api.ApiException as err:
        if err.status != 409:  # 409 Conflict: a version of that name exists
            raise
        if args.version:
            raise ConfigError(
                f"--version {version}: pipeline {name!r}{where} already has a version of that "
                "name; give another --version"
            ) from None
        raise ConfigError(
            f"{args.package}: already uploaded as version {version} of pipeline {name!r}{where} "
            "(a version is named by its package's digest); give --version to upload it again"
        ) from None
    return f"{pipeline_id} {made.pipeline_version_id}"


COMMANDS = {"submit": submit, "upload": upload, "schedule": schedule}
