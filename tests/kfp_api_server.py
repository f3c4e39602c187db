"""A Kubeflow Pipelines API server on loopback: the v2beta1 endpoints `pipeline.py upload`,
`submit` (with --wait) and `schedule` use.

    GET  /apis/v2beta1/healthz                  (kfp.Client's constructor)
    GET  /apis/v2beta1/pipelines                namespace, filter, page_size, page_token, sort_by
    POST /apis/v2beta1/pipelines/upload         name, display_name, description, namespace; file
    POST /apis/v2beta1/pipelines/upload_version name, display_name, pipelineid, description; file
    GET  /apis/v2beta1/experiments              namespace, filter (kfp.Client.create_experiment)
    POST /apis/v2beta1/experiments              a V2beta1Experiment
    POST /apis/v2beta1/runs                     a V2beta1Run (create_run_from_pipeline_package)
    GET  /apis/v2beta1/runs/{run_id}            the run, one step of `script` further each time
    POST /apis/v2beta1/recurringruns            a V2beta1RecurringRun (create_recurring_run)

Requests are read and replies written with kfp-server-api's own models (the JSON field names
and types the real server uses; ApiClient serializes them), in memory. As on a multi-user
server, a pipeline lives in one namespace ("" for the shared ones), its name is unique there,
a listing shows one namespace's pipelines, and an upload makes the pipeline's first version.
Every request is recorded (method, path, query) in `calls`; the JSON bodies of created runs
and recurring runs in `runs` and `recurring_runs`. A run's states follow `script`: a list of
steps (run state, [(task display name, task state), ...], the run's error message or None);
each GET of the run shows the next step (the last one stays). With `refuse_credentials` set,
every request is answered 401 Unauthenticated, as a login proxy or the API server does.
"""

from __future__ import annotations

import datetime
import email.parser
import email.policy
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import kfp_server_api
import yaml
from kfp_server_api import models

API = "/apis/v2beta1"
_SERIALIZE = kfp_server_api.ApiClient().sanitize_for_serialization


class ApiError(Exception):
    """A request the server answers with an error status (google.rpc.Status in the body)."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _form(content_type: str, body: bytes) -> dict[str, bytes]:
    """The fields of a multipart/form-data body, by name."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ApiError(400, 3, "expected a multipart/form-data body")
    return {
        part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
        for part in message.iter_parts()
    }


def _name_filter(text: str) -> str | None:
    """The display name an EQUALS filter on display_name asks for (None: no filter).

    Proto JSON: the enum by name or number, the field as string_value or stringValue."""
    if not text:
        return None
    names = set()
    for predicate in json.loads(text).get("predicates", []):
        operation = predicate.get("operation")
        if predicate.get("key") not in ("display_name", "name") or operation not in ("EQUALS", 1):
            raise ApiError(400, 3, f"unsupported predicate {predicate}")
        names.add(predicate.get("string_value", predicate.get("stringValue")))
    if len(names) != 1:
        raise ApiError(400, 3, f"expected one display_name predicate: {text}")
    return names.pop()


class KfpApiServer(ThreadingHTTPServer):
    """The in-memory API server, serving from a thread until stop()."""

    daemon_threads = True

    def __init__(self, multi_user: bool = True) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.multi_user = multi_user
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.pipelines: dict[str, models.V2beta1Pipeline] = {}
        self.versions: dict[str, list[models.V2beta1PipelineVersion]] = {}
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self.experiments: dict[str, models.V2beta1Experiment] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self.script: list[tuple[str, list[tuple[str, str]], str | None]] = [("SUCCEEDED", [], None)]
        self.refuse_credentials = False
        self._looks: dict[str, int] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=10)

    def in_namespace(self, namespace: str) -> list[models.V2beta1Pipeline]:
        """The pipelines of one namespace ("": the shared ones)."""
        return [p for p in self.pipelines.values() if (p.namespace or "") == namespace]

    # ------------------------------------------------------------------------- the endpoints

    def healthz(self, query: dict, body: bytes, content_type: str):
        return models.V2beta1GetHealthzResponse(multi_user=self.multi_user, pipeline_store="db")

    def list_pipelines(self, query: dict, body: bytes, content_type: str):
        wanted = _name_filter(query.get("filter", ""))
        found = [
            p
            for p in self.in_namespace(query.get("namespace", ""))
            if wanted is None or p.display_name == wanted
        ]
        size = int(query.get("page_size") or 20)
        return models.V2beta1ListPipelinesResponse(
            pipelines=found[:size] or None, total_size=len(found), next_page_token=""
        )

    def upload_pipeline(self, query: dict, body: bytes, content_type: str):
        package = _form(content_type, body)["uploadfile"]
        name = query.get("display_name") or query.get("name")
        namespace = query.get("namespace", "")
        if not name:
            raise ApiError(400, 3, "a pipeline needs a name")
        if any(p.display_name == name for p in self.in_namespace(namespace)):
            raise ApiError(409, 6, f"pipeline {name!r} already exists in namespace {namespace!r}")
        pipeline = models.V2beta1Pipeline(
            pipeline_id=str(uuid.uuid4()),
            display_name=name,
            name=name,
            description=query.get("description"),
            created_at=datetime.datetime.now(datetime.UTC),
            namespace=namespace,
        )
        self.pipelines[pipeline.pipeline_id] = pipeline
        self.versions[pipeline.pipeline_id] = []
        self._add_version(pipeline.pipeline_id, name, query.get("description"), package)
        return pipeline

    def upload_version(self, query: dict, body: bytes, content_type: str):
        package = _form(content_type, body)["uploadfile"]
        pipeline_id = query.get("pipelineid", "")
        if pipeline_id not in self.pipelines:
            raise ApiError(404, 5, f"no pipeline with id {pipeline_id!r}")
        name = query.get("display_name") or query.get("name")
        if not name:
            raise ApiError(400, 3, "a pipeline version needs a name")
        if any(v.display_name == name for v in self.versions[pipeline_id]):
            raise ApiError(409, 6, f"version {name!r} of pipeline {pipeline_id} already exists")
        return self._add_version(pipeline_id, name, query.get("description"), package)

    def _add_version(self, pipeline_id: str, name: str, description: str | None, package: bytes):
        version = models.V2beta1PipelineVersion(
            pipeline_id=pipeline_id,
            pipeline_version_id=str(uuid.uuid4()),
            display_name=name,
            name=name,
            description=description,
            created_at=datetime.datetime.now(datetime.UTC),
            pipeline_spec=next(yaml.safe_load_all(package)),
        )
        self.versions[pipeline_id].append(version)
        return version

    def list_experiments(self, query: dict, body: bytes, content_type: str):
        wanted = _name_filter(query.get("filter", ""))
        namespace = query.get("namespace", "")
        found = [
            e
            for e in self.experiments.values()
            if (e.namespace or "") == namespace and (wanted is None or e.display_name == wanted)
        ]
        return models.V2beta1ListExperimentsResponse(
            experiments=found or None, total_size=len(found), next_page_token=""
        )

    def create_experiment(self, query: dict, body: bytes, content_type: str):
        sent = json.loads(body)
        if not sent.get("display_name"):
            raise ApiError(400, 3, "an experiment needs a display_name")
        experiment = models.V2beta1Experiment(
            experiment_id=str(uuid.uuid4()),
            display_name=sent["display_name"],
            description=sent.get("description"),
            namespace=sent.get("namespace") or "",
            created_at=datetime.datetime.now(datetime.UTC),
            storage_state="AVAILABLE",
        )
        self.experiments[experiment.experiment_id] = experiment
        return experiment

    def create_run(self, query: dict, body: bytes, content_type: str):
        sent = json.loads(body)
        if sent.get("experiment_id") not in self.experiments:
            raise ApiError(404, 5, f"no experiment with id {sent.get('experiment_id')!r}")
        if not sent.get("pipeline_spec") and not sent.get("pipeline_version_reference"):
            raise ApiError(400, 3, "a run needs a pipeline_spec or a pipeline version")
        run_id = str(uuid.uuid4())
        self.runs[run_id] = sent
        self._looks[run_id] = 0
        return self._run(run_id, "PENDING", [], None)

    def get_run(self, query: dict, body: bytes, content_type: str):
        run_id = query["run_id"]
        if run_id not in self.runs:
            raise ApiError(404, 5, f"no run with id {run_id!r}")
        step = self.script[min(self._looks[run_id], len(self.script) - 1)]
        self._looks[run_id] += 1
        return self._run(run_id, *step)

    def _run(self, run_id: str, state: str, tasks: list[tuple[str, str]], error: str | None):
        sent = self.runs[run_id]
        details = [
            models.V2beta1PipelineTaskDetail(
                run_id=run_id, task_id=f"{run_id}-{name}", display_name=name, state=task_state
            )
            for name, task_state in tasks
        ]
        return models.V2beta1Run(
            run_id=run_id,
            experiment_id=sent["experiment_id"],
            display_name=sent.get("display_name"),
            state=state,
            created_at=datetime.datetime.now(datetime.UTC),
            error=models.GoogleRpcStatus(code=2, message=error) if error else None,
            run_details=models.V2beta1RunDetails(task_details=details or None),
        )

    def create_recurring_run(self, query: dict, body: bytes, content_type: str):
        sent = json.loads(body)
        if sent.get("experiment_id") not in self.experiments:
            raise ApiError(404, 5, f"no experiment with id {sent.get('experiment_id')!r}")
        if not sent.get("trigger"):
            raise ApiError(400, 3, "a recurring run needs a trigger")
        recurring_run_id = str(uuid.uuid4())
        self.recurring_runs[recurring_run_id] = sent
        return models.V2beta1RecurringRun(
            recurring_run_id=recurring_run_id,
            display_name=sent.get("display_name"),
            experiment_id=sent["experiment_id"],
            mode=sent.get("mode"),
            no_catchup=sent.get("no_catchup"),
            max_concurrency=sent.get("max_concurrency"),
            created_at=datetime.datetime.now(datetime.UTC),
            status="ENABLED",
        )

    ROUTES = {
        ("GET", f"{API}/healthz"): healthz,
        ("GET", f"{API}/pipelines"): list_pipelines,
        ("POST", f"{API}/pipelines/upload"): upload_pipeline,
        ("POST", f"{API}/pipelines/upload_version"): upload_version,
        ("GET", f"{API}/experiments"): list_experiments,
        ("POST", f"{API}/experiments"): create_experiment,
        ("POST", f"{API}/runs"): create_run,
        ("POST", f"{API}/recurringruns"): create_recurring_run,
    }
    # routes with a path parameter: (method, pattern, handler); the parameter joins the query
    PATH_ROUTES = [("GET", re.compile(f"{API}/runs/(?P<run_id>[^/:]+)"), get_run)]

    def route(self, method: str, path: str, query: dict):
        """The handler of a request (None: no such route); path parameters go into `query`."""
        if (method, path) in self.ROUTES:
            return self.ROUTES[(method, path)]
        for route_method, pattern, handler in self.PATH_ROUTES:
            match = pattern.fullmatch(path)
            if route_method == method and match:
                query.update(match.groupdict())
                return handler
        return None


class _Handler(BaseHTTPRequestHandler):
    server: KfpApiServer
    timeout = 30  # a client that stops sending mid-request does not hold a thread for ever

    def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
        pass

    def _handle(self) -> None:
        url = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server._lock:
            self.server.calls.append((self.command, url.path, query))
            route = self.server.route(self.command, url.path, query)
            try:
                if self.server.refuse_credentials:
                    raise ApiError(401, 16, "Unauthenticated: no valid credentials")
                if route is None:
                    raise ApiError(404, 5, f"no route {self.command} {url.path}")
                status, reply = (
                    200,
                    route(self.server, query, body, self.headers.get("Content-Type", "")),
                )
            except ApiError as err:
                status, reply = err.status, models.GoogleRpcStatus(code=err.code, message=str(err))
            except Exception as err:  # noqa: BLE001 (a request it cannot read: an error reply)
                status, reply = 500, models.GoogleRpcStatus(code=13, message=repr(err))
        data = json.dumps(_SERIALIZE(reply)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle
