"""A Kubeflow Pipelines API server on loopback: the v2beta1 endpoints `pipeline.py upload` uses.

    GET  /apis/v2beta1/healthz                  (kfp.Client's constructor)
    GET  /apis/v2beta1/pipelines                namespace, filter, page_size, page_token, sort_by
    POST /apis/v2beta1/pipelines/upload         name, display_name, description, namespace; file
    POST /apis/v2beta1/pipelines/upload_version name, display_name, pipelineid, description; file

Requests are read and replies written with kfp-server-api's own models (the JSON field names
and types the real server uses; ApiClient serializes them), in memory. As on a multi-user
server, a pipeline lives in one namespace ("" for the shared ones), its name is unique there,
a listing shows one namespace's pipelines, and an upload makes the pipeline's first version.
Every request is recorded (method, path, query) in `calls`.
"""

from __future__ import annotations

import datetime
import email.parser
import email.policy
import json
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

    ROUTES = {
        ("GET", f"{API}/healthz"): healthz,
        ("GET", f"{API}/pipelines"): list_pipelines,
        ("POST", f"{API}/pipelines/upload"): upload_pipeline,
        ("POST", f"{API}/pipelines/upload_version"): upload_version,
    }


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
            route = KfpApiServer.ROUTES.get((self.command, url.path))
            try:
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
