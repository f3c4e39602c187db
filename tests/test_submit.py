"""`pipeline.py submit --wait`, `schedule --no-catchup` and one-line network and credential
failures: against the loopback KFP API server (tests/kfp_api_server.py) for Kubeflow, a closed
port, and a minimal stand-in for aiplatform.PipelineJob (there is no Vertex AI emulator)."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

import deploy.submit
import pipeline
from deploy.follow import RunStatus, WaitEnded, follow_run
from deploy.service_errors import describe_service_error

from .kfp_api_server import API, KfpApiServer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
RUN = ["--config", str(DEMO), "--pipeline-root", "gs://bucket/root"]
VERTEX = ["--vertex", "--project", "p", "--region", "us-central1"]
REGISTRY = "https://us-central1-kfp.pkg.dev/p/pipelines"


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> tuple[Path, Path]:
    """The pipeline compiled for Kubeflow and for Vertex AI."""
    out = tmp_path_factory.mktemp("compiled")
    kubeflow = pipeline.compile_pipeline("kubeflow", out / "k.yaml", allow_local_images=True)
    vertex = pipeline.compile_pipeline("vertex", out / "v.yaml", allow_local_images=True)
    return Path(kubeflow), Path(vertex)


@pytest.fixture
def kfp_api(tmp_path, monkeypatch):
    """The loopback API server; kfp.Client's context file in the test's own folder."""
    import kfp

    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp" / "context.json"))
    server = KfpApiServer()
    yield server
    server.stop()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _main(capsys, argv: list[str]) -> tuple[int, list[str], list[str]]:
    """pipeline.py ARGV: the exit code, the stdout lines (without kfp.Client's own "... details:
    URL" lines) and the stderr lines."""
    code = pipeline.main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if not re.match(r"(Experiment|Run) details: ", line)]
    return code, lines, err.splitlines()


def _one_error_line(err: list[str]) -> str:
    assert len(err) == 1 and err[0].startswith("pipeline.py: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


SUCCEEDED_SCRIPT = [
    ("RUNNING", [("read inputs", "RUNNING")], None),
    ("RUNNING", [("read inputs", "SUCCEEDED"), ("train component [2/3]", "RUNNING")], None),
    ("RUNNING", [("read inputs", "SUCCEEDED"), ("train component [2/3]", "RUNNING")], None),
    (
        "SUCCEEDED",
        [
            ("read inputs", "SUCCEEDED"),
            ("train component [2/3]", "SUCCEEDED"),
            ("validate proxy fidelity", "SKIPPED"),
        ],
        None,
    ),
]


def test_submit_wait_prints_each_task_state_change_and_exits_0_when_the_run_succeeds(
    kfp_api, packages, capsys
):
    kfp_api.script = SUCCEEDED_SCRIPT
    argv = ["submit", "--host", kfp_api.url, "--package", str(packages[0]), *RUN]
    code, out, err = _main(capsys, [*argv, "--wait", "--poll-seconds", "0.001"])
    assert code == 0, err
    (run_id,) = kfp_api.runs
    assert out == [
        "read inputs: RUNNING",
        f"run {run_id}: RUNNING",
        "read inputs: SUCCEEDED",
        "train component [2/3]: RUNNING",
        "train component [2/3]: SUCCEEDED",
        "validate proxy fidelity: SKIPPED",
        f"run {run_id}: SUCCEEDED",
        run_id,  # the last line, as without --wait
    ]
    looks = [c for c in kfp_api.calls if c[:2] == ("GET", f"{API}/runs/{run_id}")]
    assert len(looks) == len(SUCCEEDED_SCRIPT)  # polled until the run ended, then no more
    assert kfp_api.runs[run_id]["runtime_config"]["pipeline_root"] == "gs://bucket/root"


def test_submit_wait_exits_1_with_one_line_when_the_run_fails(kfp_api, packages, capsys):
    kfp_api.script = [
        ("RUNNING", [("train component [2/3]", "RUNNING")], None),
        ("FAILED", [("train component [2/3]", "FAILED")], "task train component [2/3] failed"),
    ]
    argv = ["submit", "--host", kfp_api.url, "--package", str(packages[0]), *RUN, "--wait"]
    code, out, err = _main(capsys, [*argv, "--poll-seconds", "0.001"])
    (run_id,) = kfp_api.runs
    assert code == 1
    assert out[-2:] == ["train component [2/3]: FAILED", f"run {run_id}: FAILED"]
    line = _one_error_line(err)
    assert f"run {run_id} ended FAILED: task train component [2/3] failed" in line


def test_submit_wait_timeout_is_one_line_and_its_own_exit_code(kfp_api, packages, capsys):
    kfp_api.script = [("RUNNING", [("read inputs", "RUNNING")], None)]  # never ends
    argv = ["submit", "--host", kfp_api.url, "--package", str(packages[0]), *RUN, "--wait"]
    code, out, err = _main(capsys, [*argv, "--poll-seconds", "0.01", "--wait-timeout", "0.05"])
    assert code == 124
    assert "--wait-timeout 0.05: run" in _one_error_line(err) and "still RUNNING" in err[0]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--poll-seconds", "5"], r"--poll-seconds goes with --wait"),
        (["--wait-timeout", "60"], r"--wait-timeout goes with --wait"),
        (["--wait", "--poll-seconds", "0"], r"--poll-seconds 0: a number of seconds above 0"),
    ],
)
def test_submit_wait_flags_are_checked_before_any_request(
    kfp_api, packages, capsys, extra, expected
):
    argv = ["submit", "--host", kfp_api.url, "--package", str(packages[0]), *RUN, *extra]
    code, _, err = _main(capsys, argv)
    assert code == 2 and re.search(expected, _one_error_line(err)), err
    assert not kfp_api.calls


def test_schedule_no_catchup_is_sent_only_when_given(kfp_api, packages, capsys):
    argv = ["schedule", "--host", kfp_api.url, "--package", str(packages[0]), *RUN]
    argv += ["--cron", "0 3 * * 1"]
    assert _main(capsys, argv)[0] == 0
    assert _main(capsys, [*argv, "--no-catchup"])[0] == 0
    default, no_catchup = kfp_api.recurring_runs.values()
    assert not default.get("no_catchup")  # the server's default: backfill missed runs
    assert no_catchup["no_catchup"] is True
    assert no_catchup["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"


def _argv(command: str, host: str, packages) -> list[str]:
    """A valid command line of `command` on the Kubeflow host `host`."""
    argv = [command, "--host", host, "--package", str(packages[0])]
    if command == "upload":
        return argv
    return argv + RUN + (["--cron", "0 3 * * 1"] if command == "schedule" else [])


@pytest.mark.parametrize("command", ["submit", "upload", "schedule"])
def test_an_unreachable_host_is_one_line_naming_it(packages, capsys, closed_port, command):
    host = f"http://127.0.0.1:{closed_port}"
    code, out, err = _main(capsys, _argv(command, host, packages))
    assert code == 2 and not out
    line = _one_error_line(err)
    assert f"KFP host {host}: connection refused; check --host" in line, line


@pytest.mark.parametrize("command", ["submit", "upload", "schedule"])
def test_refused_credentials_are_one_line_about_credentials(kfp_api, packages, capsys, command):
    kfp_api.refuse_credentials = True
    code, out, err = _main(capsys, _argv(command, kfp_api.url, packages))
    assert code == 2 and not out
    line = _one_error_line(err)
    assert f"KFP host {kfp_api.url}: the host refused the credentials (HTTP 401" in line
    assert "Unauthenticated" in line and "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID" in line
    assert len([c for c in kfp_api.calls if c[1] == f"{API}/healthz"]) == 1  # asked once


def test_a_failure_while_waiting_is_one_line(kfp_api, packages, capsys, monkeypatch):
    """The --wait polling goes through the same guard: credentials refused after the start."""
    kfp_api.script = [("RUNNING", [], None)]
    follow = deploy.submit.follow_run

    def refuse_then_follow(*args, **kwargs):
        kfp_api.refuse_credentials = True
        return follow(*args, **kwargs)

    monkeypatch.setattr(deploy.submit, "follow_run", refuse_then_follow)
    argv = ["submit", "--host", kfp_api.url, "--package", str(packages[0]), *RUN, "--wait"]
    code, _, err = _main(capsys, argv)
    assert code == 2 and "the host refused the credentials (HTTP 401" in _one_error_line(err)


def test_other_http_errors_name_the_status_and_the_servers_message(kfp_api, packages, capsys):
    argv = ["upload", "--host", kfp_api.url + "/nowhere", "--package", str(packages[0])]
    code, _, err = _main(capsys, argv)
    line = _one_error_line(err)
    assert code == 2 and "answered HTTP 404 Not Found: no route GET /nowhere/apis/v2beta1" in line


def test_names_that_do_not_resolve_and_timeouts_say_what_to_check():
    from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NameResolutionError

    def failed(reason):
        return MaxRetryError(None, "/apis/v2beta1/healthz", reason)

    dns = failed(NameResolutionError("kfp.example", None, OSError("Name or service not known")))
    message = describe_service_error(dns, "KFP host http://kfp.example", "--host")
    assert message == (
        "KFP host http://kfp.example: the host name does not resolve; check --host and the "
        "network (DNS, VPN)"
    )
    slow = failed(ConnectTimeoutError("connect timed out"))
    assert "no answer (timed out); check --host" in describe_service_error(slow, "h", "--host")
    assert describe_service_error(ValueError("a bug"), "h", "--host") is None


def test_follow_run_polls_with_the_injected_sleep_and_clock_until_the_timeout():
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    looks = []

    def look() -> RunStatus:
        looks.append(now[0])
        return RunStatus("RUNNING", done=False, succeeded=False)

    with pytest.raises(WaitEnded) as ended:
        follow_run("r-1", look, 30, timeout=70, sleep=sleep, clock=lambda: now[0])
    assert ended.value.exit_code == 124
    assert slept == [30, 30, 10] and looks == [0, 30, 60, 70]  # a last look at the deadline


# ------------------------------------------------------------------------------ Vertex AI


class FakePipelineJob:
    """aiplatform.PipelineJob as submit --wait uses it: submit(), `state` (which refreshes the
    job) and `gca_resource`, with real aiplatform_v1 types; the states follow SCRIPT."""

    SCRIPT: list = []
    SUBMIT_ERROR: Exception | None = None

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.resource_name = "projects/p/locations/us-central1/pipelineJobs/demix-1"
        self.looks = 0
        self.resource = None

    def submit(self, **kwargs) -> None:
        if self.SUBMIT_ERROR is not None:
            raise self.SUBMIT_ERROR

    @property
    def state(self):
        from google.cloud.aiplatform_v1 import types
        from google.rpc import status_pb2

        run_state, tasks, error = self.SCRIPT[min(self.looks, len(self.SCRIPT) - 1)]
        self.looks += 1
        details = [types.PipelineTaskDetail(task_id=1, task_name="demix", state="RUNNING")]
        for number, (name, state) in enumerate(tasks, start=2):
            cached = state == "CACHED"
            details.append(
                types.PipelineTaskDetail(
                    task_id=number,
                    parent_task_id=1,
                    task_name=name,
                    state="SKIPPED" if cached else state,
                    execution=types.Execution(state="CACHED" if cached else "COMPLETE"),
                )
            )
        self.resource = types.PipelineJob(
            name=self.resource_name,
            state=f"PIPELINE_STATE_{run_state}",
            job_detail=types.PipelineJobDetail(task_details=details),
            error=status_pb2.Status(code=9, message=error or ""),
        )
        return self.resource.state

    @property
    def gca_resource(self):
        return self.resource


@pytest.fixture
def vertex_job(monkeypatch):
    """aiplatform.PipelineJob replaced by FakePipelineJob (fresh script and error)."""
    monkeypatch.setattr("google.cloud.aiplatform.PipelineJob", FakePipelineJob)
    monkeypatch.setattr(FakePipelineJob, "SCRIPT", [])
    monkeypatch.setattr(FakePipelineJob, "SUBMIT_ERROR", None)
    return FakePipelineJob


@pytest.mark.parametrize("result, code", [("SUCCEEDED", 0), ("FAILED", 1), ("CANCELLED", 1)])
def test_submit_wait_on_vertex_prints_task_states_and_exits_with_the_runs_result(
    vertex_job, packages, capsys, result, code
):
    vertex_job.SCRIPT = [
        ("PENDING", [], None),
        ("RUNNING", [("read inputs", "CACHED"), ("train base", "RUNNING")], None),
        ("RUNNING", [("read inputs", "CACHED"), ("train base", "RUNNING")], None),
        (result, [("read inputs", "CACHED"), ("train base", result)], "train base: exit 1"),
    ]
    argv = ["submit", *VERTEX, "--package", str(packages[1]), *RUN, "--wait"]
    got, out, err = _main(capsys, [*argv, "--poll-seconds", "0.001"])
    assert got == code, err
    assert out[:6] == [
        "run demix-1: PENDING",
        "read inputs: CACHED",
        "train base: RUNNING",
        "run demix-1: RUNNING",
        f"train base: {result}",
        f"run demix-1: {result}",
    ]
    if code:
        assert f"run demix-1 ended {result}: train base: exit 1" in _one_error_line(err)
    else:
        assert out[6:] == ["projects/p/locations/us-central1/pipelineJobs/demix-1"] and not err


@pytest.mark.parametrize("command", ["submit", "schedule", "upload"])
def test_no_google_credentials_is_one_line_saying_what_to_run(
    packages, capsys, monkeypatch, tmp_path, command
):
    """No mock: the real aiplatform and kfp.registry clients, with a credentials file that
    does not exist (google.auth raises DefaultCredentialsError)."""
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    if command == "upload":
        argv = ["upload", "--vertex", "--registry", REGISTRY, "--package", str(packages[1])]
        where = f"Artifact Registry {REGISTRY}"
    else:
        argv = [command, *VERTEX, "--package", str(packages[1]), *RUN]
        argv += ["--cron", "0 3 * * 1"] if command == "schedule" else []
        where = "Vertex AI (project p, region us-central1)"
    code, out, err = _main(capsys, argv)
    assert code == 2 and not out
    line = _one_error_line(err)
    assert (
        f"{where}: no Google Cloud credentials found; run `gcloud auth application-default" in line
    )


def test_a_vertex_api_error_is_one_line_with_its_status(vertex_job, packages, capsys):
    from google.api_core.exceptions import PermissionDenied

    vertex_job.SUBMIT_ERROR = PermissionDenied("Permission 'aiplatform.pipelineJobs.create' denied")
    code, _, err = _main(capsys, ["submit", *VERTEX, "--package", str(packages[1]), *RUN])
    line = _one_error_line(err)
    assert (
        code == 2 and "Vertex AI (project p, region us-central1) refused the request (403" in line
    )
    assert "PermissionDenied: Permission 'aiplatform.pipelineJobs.create' denied" in line
    assert "roles/aiplatform.user" in line


def test_schedule_no_catchup_on_vertex_creates_the_same_schedule(
    vertex_job, packages, capsys, monkeypatch
):
    """A Vertex AI schedule never backfills on its own: --no-catchup changes nothing there."""
    calls = []
    create = lambda self, **kwargs: calls.append(kwargs) or self  # noqa: E731
    monkeypatch.setattr(vertex_job, "create_schedule", create, raising=False)
    argv = ["schedule", *VERTEX, "--package", str(packages[1]), *RUN, "--cron", "0 3 * * 1"]
    assert _main(capsys, argv)[0] == 0
    assert _main(capsys, [*argv, "--no-catchup"])[0] == 0
    assert len(calls) == 2 and calls[0] == calls[1] and "catch_up" not in str(calls[0])


def test_submit_takes_the_config_as_a_positional_with_set(kfp_api, packages, capsys):
    """The same config forms as `demix run` and `run-local`: the run gets the overridden YAML."""
    import yaml

    argv = ["submit", str(DEMO), "--host", kfp_api.url, "--package", str(packages[0])]
    argv += ["--pipeline-root", "gs://bucket/root", "--set", "seed=7", "--set", "search.n=16"]
    code, _, err = _main(capsys, argv)
    assert code == 0, err
    (sent,) = kfp_api.runs.values()
    config = yaml.safe_load(sent["runtime_config"]["parameters"]["config_yaml"])
    assert config["seed"] == 7 and config["search"]["n"] == 16
    given = yaml.safe_load(DEMO.read_text())["data"]["datasets"]
    assert [d["paths"] for d in config["data"]["datasets"]] == [d["paths"] for d in given]


@pytest.mark.parametrize(
    "config, expected",
    [
        ([str(DEMO), "--config", str(DEMO)], "give CONFIG (or --config) once"),
        ([], "give CONFIG (or --config) once"),
        (["gs://bucket/c.yaml", "--set", "seed=1"], "--set applies to a local config"),
    ],
)
def test_submit_refuses_two_configs_none_or_set_on_a_bucket_config(
    kfp_api, packages, capsys, config, expected
):
    argv = ["submit", *config, "--host", kfp_api.url, "--package", str(packages[0])]
    code, _, err = _main(capsys, [*argv, "--pipeline-root", "gs://bucket/root"])
    assert code == 2 and expected in _one_error_line(err)
    assert not kfp_api.runs
