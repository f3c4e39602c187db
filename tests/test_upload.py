"""`pipeline.py upload` to Kubeflow against a loopback v2beta1 API server (tests/kfp_api_server.py):
the pipeline is looked up in --namespace, so a second upload adds a version to it."""

import hashlib
from pathlib import Path

import pytest
from kfp import compiler, dsl

import pipeline
from components.image import CPU_IMAGE

from .kfp_api_server import API, KfpApiServer

DESCRIPTION = "a pipeline of one step"


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def echo(text: str) -> str:
    """Return the text."""
    return text


@dsl.pipeline(name="tiny", description=DESCRIPTION)
def tiny(text: str = "x"):
    echo(text=text)


@pytest.fixture
def package(tmp_path) -> Path:
    """A compiled pipeline package (upload reads only its description)."""
    path = tmp_path / "tiny.yaml"
    compiler.Compiler().compile(tiny, str(path))
    return path


@pytest.fixture
def kfp_api(tmp_path, monkeypatch):
    """The loopback API server; kfp.Client's context file in the test's own folder."""
    import kfp

    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp" / "context.json"))
    server = KfpApiServer()
    yield server
    server.stop()


def _upload(capsys, argv: list[str]) -> tuple[int, str, str]:
    """pipeline.py upload ARGV: exit code, the result line, the error output."""
    code = pipeline.main(["upload", *argv])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, lines[-1] if lines and code == 0 else "", err


def test_upload_under_a_namespace_adds_versions_to_the_namespaces_pipeline(
    kfp_api, package, capsys
):
    base = ["--host", kfp_api.url, "--package", str(package)]
    # a shared pipeline of the same name, uploaded without --namespace
    code, shared, _ = _upload(capsys, base)
    assert code == 0 and [p.pipeline_id for p in kfp_api.in_namespace("")] == [shared]
    start = len(kfp_api.calls)

    argv = [*base, "--namespace", "team"]
    code, first, _ = _upload(capsys, argv)
    assert code == 0
    (team,) = kfp_api.in_namespace("team")  # a new pipeline in the namespace, not the shared one
    assert first == team.pipeline_id != shared
    assert team.display_name == "demix" and team.description == DESCRIPTION

    code, second, _ = _upload(capsys, argv)
    assert code == 0 and second.split()[0] == team.pipeline_id  # a version, no second pipeline
    code, third, _ = _upload(capsys, [*argv, "--version", "v2"])
    assert code == 0 and third.split()[0] == team.pipeline_id
    assert len(kfp_api.pipelines) == 2 and kfp_api.in_namespace("team") == [team]
    digest = hashlib.sha256(package.read_bytes()).hexdigest()[:12]
    versions = kfp_api.versions[team.pipeline_id]
    assert [v.display_name for v in versions] == ["demix", f"demix-{digest}", "v2"]
    assert [v.pipeline_version_id for v in versions[1:]] == [second.split()[1], third.split()[1]]
    assert len(kfp_api.versions[shared]) == 1  # the shared pipeline was not touched

    # the namespace on every call that takes one; a version goes to the namespace's pipeline
    calls = kfp_api.calls[start:]
    endpoints = [(method, path) for method, path, _ in calls if path != f"{API}/healthz"]
    assert endpoints == [
        ("GET", f"{API}/pipelines"),
        ("POST", f"{API}/pipelines/upload"),
        ("GET", f"{API}/pipelines"),
        ("POST", f"{API}/pipelines/upload_version"),
        ("GET", f"{API}/pipelines"),
        ("POST", f"{API}/pipelines/upload_version"),
    ]
    for method, path, query in calls:
        if path.endswith("/upload_version"):
            assert query["pipelineid"] == team.pipeline_id and "namespace" not in query
        elif path != f"{API}/healthz":
            assert query["namespace"] == "team", (method, path, query)


def test_upload_refuses_a_version_without_a_pipeline_or_one_it_has(kfp_api, package, capsys):
    argv = ["--host", kfp_api.url, "--package", str(package), "--namespace", "team"]
    code, _, err = _upload(capsys, [*argv, "--version", "v1"])
    assert code == 2
    assert "--version v1: there is no pipeline 'demix' in namespace 'team' yet" in err
    assert not kfp_api.pipelines

    assert _upload(capsys, argv)[0] == 0
    assert _upload(capsys, [*argv, "--version", "v1"])[0] == 0
    code, _, err = _upload(capsys, [*argv, "--version", "v1"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--version v1: pipeline 'demix' in namespace 'team' already has a version" in err
    assert _upload(capsys, argv)[0] == 0  # a version named by the package's digest
    code, _, err = _upload(capsys, argv)  # the same package again
    assert code == 2 and "already uploaded as version demix-" in err
    (team,) = kfp_api.in_namespace("team")
    assert len(kfp_api.versions[team.pipeline_id]) == 3
    code, other, _ = _upload(capsys, [*argv, "--name", "demix-prod"])  # another pipeline
    assert code == 0 and {p.display_name for p in kfp_api.in_namespace("team")} == {
        "demix",
        "demix-prod",
    }
    assert kfp_api.pipelines[other].namespace == "team"
