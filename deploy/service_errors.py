"""Network and authentication failures of the pipeline services as one line.

`service_call` wraps every client creation and call of submit, upload, schedule and the
`--wait` polling: a refused connection, a name that does not resolve, a timeout, refused
credentials or another HTTP error becomes a ServiceError naming the host (or the Vertex AI
project and region) and what to check, instead of the client library's traceback.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import kfp

from demix.errors import DemixError, ServiceError, one_line

KFP_CREDENTIALS = (
    "check the credentials kfp.Client sends: KF_PIPELINES_IAP_OAUTH2_CLIENT_ID behind IAP, the "
    "session cookie (client_authentication_cookie) in ~/.config/kfp/context.json behind Dex or "
    "oauth2-proxy, or reach the API server without the login proxy (kubectl port-forward)"
)
GOOGLE_LOGIN = (
    "run `gcloud auth application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS to a "
    "service account key file)"
)
VERTEX_ROLES = (
    "check that the account has roles/aiplatform.user on the project (and "
    "roles/iam.serviceAccountUser on --service-account) and that the Vertex AI API is enabled"
)
REGISTRY_ROLES = (
    "check that the account has roles/artifactregistry.writer on the repository, or " + GOOGLE_LOGIN
)
DETAIL_CHARS = 300


class KfpClient(kfp.Client):
    """kfp.Client whose health check (its constructor's first request) is made once: the
    library's retries an HTTP error, a refused credential included, five times 5 s apart and
    logs a traceback each time; a refused credential does not heal by waiting."""

    def get_kfp_healthz(self, sleep_duration: int = 5):
        """The server's healthz answer, from one request."""
        return self._healthz_api.healthz_service_get_healthz()


def kubeflow_service(args) -> str:
    """How failures name a Kubeflow host."""
    return f"KFP host {args.host}"


def vertex_service(args) -> str:
    """How failures name Vertex AI: the project and region."""
    return f"Vertex AI (project {args.project}, region {args.region})"


def kfp_client(args):
    """A client of the --host (inside service_call: its constructor asks the host's health)."""
    with warnings.catch_warnings():  # "only works with Kubeflow Pipeline v2.0.0-beta.2 and later"
        warnings.simplefilter("ignore", FutureWarning)
        return KfpClient(host=args.host)


def _chain(err: BaseException) -> Iterator[BaseException]:
    """`err`, the errors it wraps (urllib3's reason, requests' first argument) and its causes."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = [getattr(current, "reason", None), current.__cause__]
        wrapped += list(getattr(current, "args", ()))
        todo += [e for e in wrapped if isinstance(e, BaseException)]


def _detail(err: BaseException) -> str:
    """The error's own message on one line, cut to a readable length."""
    text = one_line(err) or type(err).__name__
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 3] + "..."


def _connection(err: BaseException, where: str, flag: str) -> str | None:
    """The line for a connection that failed (no HTTP answer), or None when `err` is not one."""
    import urllib3.exceptions as u3

    chain = list(_chain(err))

    def has(*kinds) -> bool:
        return any(isinstance(e, kinds) for e in chain)

    if has(u3.NameResolutionError):
        return f"{where}: the host name does not resolve; check {flag} and the network (DNS, VPN)"
    if has(ConnectionRefusedError) or any("Connection refused" in str(e) for e in chain):
        return (
            f"{where}: connection refused; check {flag} (scheme, host and port) and that the "
            "server is up and reachable from here"
        )
    if has(u3.TimeoutError, TimeoutError):
        return f"{where}: no answer (timed out); check {flag}, the network path and firewalls"
    if has(u3.SSLError):
        return (
            f"{where}: TLS failed ({_detail(err)}); check the https:// URL and the server's "
            "certificate"
        )
    if has(u3.HTTPError, ConnectionError):
        return f"{where}: cannot connect ({_detail(err)}); check {flag} and the network"
    return None


def _http_message(body) -> str:
    """The message of an HTTP error body (google.rpc.Status JSON, or the text itself)."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    try:
        parsed = json.loads(body or "")
    except ValueError:
        return one_line(body or "")[:DETAIL_CHARS]
    if isinstance(parsed, dict):
        return one_line(parsed.get("message") or parsed.get("error") or "")[:DETAIL_CHARS]
    return ""


def _http(status: int, reason: str, message: str, where: str, credentials: str) -> str:
    """The line for an HTTP error answer."""
    said = f"HTTP {status} {reason or ''}".strip() + (f": {message}" if message else "")
    if status in (401, 403):
        return f"{where}: the host refused the credentials ({said}); {credentials}"
    return f"{where} answered {said}"


def describe_service_error(err: BaseException, where: str, flag: str) -> str | None:
    """The one-line message of a network or authentication failure talking to `where` (`flag`:
    the setting that names it), or None for any other error (left to propagate)."""
    import google.api_core.exceptions as api_core
    import google.auth.exceptions as auth
    import kfp_server_api
    import requests

    if isinstance(err, auth.DefaultCredentialsError):
        return f"{where}: no Google Cloud credentials found; {GOOGLE_LOGIN}"
    if isinstance(err, auth.RefreshError):
        return (
            f"{where}: the Google Cloud credentials were refused ({_detail(err)}); {GOOGLE_LOGIN}"
        )
    if isinstance(err, api_core.RetryError) and err.cause is not None:
        return describe_service_error(err.cause, where, flag)
    if isinstance(err, api_core.GoogleAPICallError):
        said = f"{err.code} {type(err).__name__}: {one_line(err.message)[:DETAIL_CHARS]}"
        if err.code in (401, 403):
            return f"{where} refused the request ({said}); {VERTEX_ROLES}"
        if err.code == 404:
            return f"{where}: not found ({said}); check {flag}"
        if err.code in (503, 504):
            return f"{where}: the service is unreachable ({said}); check the network and {flag}"
        return f"{where} answered {said}"
    if isinstance(err, kfp_server_api.ApiException):
        if not err.status:  # the client's own wrapping of a TLS failure
            return f"{where}: TLS failed ({_detail(err.reason)}); check the https:// URL"
        message = _http_message(err.body)
        return _http(err.status, err.reason, message, where, KFP_CREDENTIALS)
    if isinstance(err, requests.HTTPError) and err.response is not None:
        response = err.response
        message = _http_message(response.content)
        return _http(response.status_code, response.reason, message, where, REGISTRY_ROLES)
    described = _connection(err, where, flag)  # requests', urllib3's, google.auth's transport
    if described is None and isinstance(err, auth.TransportError):
        return f"{where}: cannot reach Google's sign-in service ({_detail(err)}); check the network"
    return described


@contextmanager
def service_call(where: str, flag: str) -> Iterator[None]:
    """Run a client creation or call; a network or authentication failure in it is raised as
    a ServiceError naming `where` (the host, or the project and region) and what to check.

    Raises ServiceError; any other error propagates unchanged.
    """
    try:
        yield
    except DemixError:
        raise
    except Exception as err:
        message = describe_service_error(err, where, flag)
        if message is None:
            raise
        raise ServiceError(message) from err
