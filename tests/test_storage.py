"""gs:// against a real GCS emulator, with faults injected by a loopback proxy.

Transient faults are retried; partial or corrupt artifacts are never accepted.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from demix.errors import DataError
from demix.storage import (
    MANIFEST,
    fetch_artifact,
    read_manifest,
    upload_artifact,
    write_manifest,
)

from . import reliability

pytestmark = pytest.mark.reliability


def _artifact(root: Path, files: dict[str, bytes], kind: str = "demix.test", **fields) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    write_manifest(root, kind, **fields)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _new_machine(monkeypatch, tmp_path: Path, name: str) -> Path:
    """An empty local cache: what a fresh machine (or a retried pod) starts with."""
    cache = tmp_path / name
    monkeypatch.setenv("DEMIX_CACHE", str(cache))
    return cache


@pytest.fixture
def payload() -> dict[str, bytes]:
    rng = random.Random(0)
    return {
        "model.safetensors": rng.randbytes(9_000_000),  # resumable: 9 chunks of 1 MiB
        "config.json": b'{"hidden_size": 32}',
        "tokenizer/tokenizer.json": rng.randbytes(3000),
    }


def test_round_trip_survives_retryable_statuses_and_dropped_uploads(
    gcs, tmp_path, payload, monkeypatch
):
    local = _artifact(tmp_path / "a", payload)
    uri = f"gs://{gcs.bucket}/runs/a"
    gcs.plan.every = 3  # every third request answers 503, 429 or 500
    gcs.plan.drop_uploads = 3  # and three upload bodies are cut off halfway
    upload_artifact(local, uri)
    assert gcs.plan.counts["dropped_connection"] == 3
    assert sum(gcs.plan.counts[code] for code in ("503", "429", "500")) >= 3
    assert gcs.plan.requests["PUT"] >= 9, gcs.plan.requests  # resumable chunks

    _new_machine(monkeypatch, tmp_path, "cache-b")
    got = fetch_artifact(uri, "demix.test")
    reliability.intact(_files(got) == _files(local), "downloaded artifact differs")
    reliability.count("faults_retried", gcs.plan.injected)


def test_a_flipped_byte_in_a_download_is_retried_or_refused(gcs, tmp_path, payload, monkeypatch):
    local = _artifact(tmp_path / "a", payload)
    uri = f"gs://{gcs.bucket}/runs/a"
    upload_artifact(local, uri)

    # once, caught by the client's crc32c check: downloaded again, intact
    gcs.plan.corrupt, gcs.plan.corrupt_times = "model.safetensors", 1
    got = fetch_artifact(uri)
    reliability.intact(_files(got) == _files(local), "artifact differs after a retried download")
    reliability.count("faults_retried", gcs.plan.injected)

    # always, with the crc32c header stripped: the manifest's sha256 refuses it
    cache = _new_machine(monkeypatch, tmp_path, "cache-b")
    before = gcs.plan.injected
    gcs.plan.corrupt, gcs.plan.corrupt_times, gcs.plan.strip_hash = "model.safetensors", None, True
    with pytest.raises(DataError, match=r"model\.safetensors: sha256 does not match") as err:
        fetch_artifact(uri)
    assert "\n" not in str(err.value)
    leftovers = [p for p in cache.rglob("*") if p.is_file()]
    reliability.intact(not leftovers, f"a refused download left files: {leftovers}")
    reliability.count("corruption_refused", gcs.plan.injected - before)


def test_a_cut_off_publish_is_never_read_and_resumes(gcs, tmp_path, payload, monkeypatch):
    uri = f"gs://{gcs.bucket}/runs/a"
    old = _artifact(tmp_path / "old", payload, version=1)
    upload_artifact(old, uri)
    new_payload = {**payload, "model.safetensors": random.Random(1).randbytes(9_000_000)}
    new = _artifact(tmp_path / "new", new_payload, version=2)

    # the writer loses the network after the old manifest is deleted and one chunk is sent
    monkeypatch.setenv("DEMIX_GCS_DEADLINE_S", "0.5")
    sent = {"PUT": 0}
    decide = gcs.plan.decide

    def cut_after_first_chunk(method, path, length):
        if method == "PUT":
            sent["PUT"] += 1
        gcs.plan.fail_all = sent["PUT"] > 1
        return decide(method, path, length)

    gcs.plan.decide = cut_after_first_chunk
    with pytest.raises(DataError, match="upload failed after retries"):
        upload_artifact(new, uri)
    gcs.plan.decide = decide
    gcs.plan.fail_all = False
    reliability.count("partial_publishes")

    # a reader on another machine sees no artifact, neither the old manifest nor a mix
    _new_machine(monkeypatch, tmp_path, "cache-b")
    with pytest.raises(DataError, match=f"{MANIFEST}; the artifact is missing or was not"):
        fetch_artifact(uri)

    # publishing again completes it; the reader gets exactly the new artifact
    monkeypatch.setenv("DEMIX_GCS_DEADLINE_S", "600")
    upload_artifact(new, uri)
    got = fetch_artifact(uri)
    reliability.intact(_files(got) == _files(new), "republished artifact differs")
    assert read_manifest(got)["version"] == 2


def test_a_remote_file_changed_after_publishing_is_refused(gcs, tmp_path, payload):
    from demix import gcs as gcs_io

    local = _artifact(tmp_path / "a", payload)
    uri = f"gs://{gcs.bucket}/runs/a"
    upload_artifact(local, uri)
    tampered = tmp_path / "tampered"
    tampered.write_bytes(b'{"hidden_size": 64}')
    gcs_io.upload_file(gcs_io.bucket(gcs.bucket), "runs/a/config.json", tampered)
    with pytest.raises(DataError, match=r"runs/a/config\.json: sha256 does not match"):
        fetch_artifact(uri)
    reliability.count("corruption_refused")


def test_a_manifest_entry_escaping_the_artifact_is_refused_before_download(gcs, tmp_path):
    from demix import gcs as gcs_io

    bucket = gcs_io.bucket(gcs.bucket)
    manifest = tmp_path / MANIFEST
    manifest.write_text(
        '{"kind": "demix.model", "files": {"../../etc/x": {"size": 1, "sha256": "0"}}}'
    )
    gcs_io.upload_file(bucket, f"runs/evil/{MANIFEST}", manifest)
    gets = gcs.plan.requests["GET"]
    with pytest.raises(DataError, match="escapes the artifact directory"):
        fetch_artifact(f"gs://{gcs.bucket}/runs/evil")
    assert gcs.plan.requests["GET"] - gets <= 2  # the bucket and the manifest, nothing else
