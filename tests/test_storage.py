"""gs:// against a real GCS emulator, with faults injected by a loopback proxy.

Transient faults are retried; partial or corrupt artifacts are never accepted.
"""

from __future__ import annotations

import json
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
    reliability.count("faults_fatal", gcs.plan.injected)

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
    reliability.count("tampered_refused")


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


# ---------------------------------------------------------------- stages against gs://


def _upload_corpus(gcs, corpus_dir: Path) -> dict[str, str]:
    """The smoke corpus on the bucket: two single objects and one folder; name -> gs:// URI."""
    from demix import gcs as gcs_io

    bucket = gcs_io.bucket(gcs.bucket)
    gcs_io.upload_file(bucket, "raw/general.jsonl", corpus_dir / "general.jsonl")
    gcs_io.upload_file(bucket, "raw/math.jsonl", corpus_dir / "math.jsonl")
    gcs_io.upload_file(bucket, "raw/code/part0.jsonl", corpus_dir / "code.jsonl")
    root = f"gs://{gcs.bucket}/raw"
    return {
        "general": f"{root}/general.jsonl",
        "code": f"{root}/code",
        "math": f"{root}/math.jsonl",
    }


def _stage_argvs(config: Path, root: str, names: list[str]) -> list[list[str]]:
    """curate -> base -> components -> merge, every path under `root` (local or gs://)."""
    argvs = [
        ["curate", str(config), "--out", f"{root}/dataset"],
        [
            "train",
            str(config),
            "--role",
            "base",
            "--data",
            f"{root}/dataset",
            "--out",
            f"{root}/base",
        ],
    ]
    for name in names:
        argvs.append(
            ["train", str(config), "--role", "component", "--dataset", name]
            + ["--data", f"{root}/dataset", "--init", f"{root}/base", "--out", f"{root}/c-{name}"]
        )
    argvs.append(
        ["merge", str(config), "--data", f"{root}/dataset", "--base", f"{root}/base"]
        + ["--mixture", "general=0.5,code=0.3,math=0.2", "--out", f"{root}/merged"]
        + ["--components", *(f"{n}={root}/c-{n}" for n in names)]
    )
    return argvs


def test_curate_train_merge_against_gs_uris_with_faults(
    gcs, one_thread, tmp_path, corpus_dir, monkeypatch, capsys
):
    import yaml

    from demix import gcs as gcs_io
    from demix.cli import main

    from .conftest import smoke_config_dict

    names = ["general", "code", "math"]
    uris = _upload_corpus(gcs, corpus_dir)
    remote_raw = smoke_config_dict(corpus_dir)
    for spec in remote_raw["data"]["datasets"]:
        spec["paths"] = [uris[spec["name"]]]
    local_raw = smoke_config_dict(corpus_dir)
    for raw in (remote_raw, local_raw):  # small budgets: this test is about the bytes
        raw["train"].update(checkpoint_every=4)
        raw["train"]["base"]["tokens"] = 3000
        raw["train"]["component"]["tokens"] = 1500
    remote_config, local_config = tmp_path / "remote.yaml", tmp_path / "local.yaml"
    remote_config.write_text(yaml.safe_dump(remote_raw))
    local_config.write_text(yaml.safe_dump(local_raw))

    gcs.plan.every, gcs.plan.drop_uploads, gcs.plan.drop_min_bytes = 7, 4, 4096
    root = f"gs://{gcs.bucket}/run"
    for argv in _stage_argvs(remote_config, root, names):
        assert main(argv) == 0, capsys.readouterr().err
    assert gcs.plan.injected > 10
    reliability.count("faults_retried", gcs.plan.injected)
    gcs.plan.every = gcs.plan.drop_uploads = 0

    local = tmp_path / "local"
    for argv in _stage_argvs(local_config, str(local), names):
        assert main(argv) == 0, capsys.readouterr().err

    _new_machine(monkeypatch, tmp_path, "reader")
    merged = fetch_artifact(f"{root}/merged", "demix.model")
    for rel in ("model.safetensors", "config.json", "tokenizer.json"):
        reliability.intact(
            (merged / rel).read_bytes() == (local / "merged" / rel).read_bytes(),
            f"{rel} merged from gs:// differs from the local run",
        )
    left = [n for n in gcs_io.list_blobs(gcs_io.bucket(gcs.bucket), "run/") if ".ckpt/" in n]
    assert not left, f"checkpoints left after training finished: {left[:3]}"


def test_training_resumes_from_a_checkpoint_another_machine_published(
    gcs, one_thread, tmp_path, corpus_dir, monkeypatch, capsys
):
    import yaml

    from demix.cli import main
    from demix.config import parse_config
    from demix.data.curate import curate
    from demix.data.shards import CuratedData
    from demix.storage import artifact_output, checkpoint_sync
    from demix.train import train_model

    from .conftest import smoke_config_dict

    raw = smoke_config_dict(corpus_dir)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    config = parse_config(raw)
    curate(config.data, tmp_path / "data", config.seed)
    data = CuratedData(tmp_path / "data")
    uri = f"gs://{gcs.bucket}/models/base"

    # machine A trains 7 steps, publishes its checkpoint, and is preempted
    _new_machine(monkeypatch, tmp_path, "machine-a")
    train = config.train.model_copy(update={"checkpoint_every": 3})
    with artifact_output(uri) as out:
        stopped = train_model(
            out,
            data,
            data.token_prior,
            config.train.base,
            train,
            config.model,
            config.seed,
            role="base",
            name="base",
            arch=config.model.architecture,
            stop_at_step=7,
            quiet=True,
            on_checkpoint=checkpoint_sync(uri),
        )
    assert stopped is None

    # machine B has nothing local: it fetches the checkpoint and finishes the job
    _new_machine(monkeypatch, tmp_path, "machine-b")
    gcs.plan.every = 4
    argv = ["train", str(config_path), "--role", "base", "--data", str(tmp_path / "data")]
    assert main([*argv, "--out", uri]) == 0
    assert "resumed at step 7" in capsys.readouterr().err
    reliability.count("faults_retried", gcs.plan.injected)
    gcs.plan.every = 0
    assert main([*argv, "--out", str(tmp_path / "uninterrupted")]) == 0

    _new_machine(monkeypatch, tmp_path, "reader")
    resumed = fetch_artifact(uri, "demix.model") / "model.safetensors"
    reliability.intact(
        resumed.read_bytes() == (tmp_path / "uninterrupted" / "model.safetensors").read_bytes(),
        "resumed weights differ from an uninterrupted run",
    )


def test_curation_groups_of_gs_inputs_fetch_only_their_own_files(
    gcs, tmp_path, corpus_dir, monkeypatch
):
    """The plan lists gs:// inputs by URI; each group task, on a machine with an empty cache,
    downloads only its own files; the merge equals curating local copies."""
    from demix.config import DataConfig
    from demix.data.curate import curate, curate_group, merge_groups, plan_curation

    uris = _upload_corpus(gcs, corpus_dir)
    names = ["general", "code", "math"]

    def config(paths: dict[str, str]) -> DataConfig:
        datasets = [{"name": n, "paths": [paths[n]]} for n in names]
        return DataConfig(datasets=datasets, tokenizer={"vocab_size": 320})

    _new_machine(monkeypatch, tmp_path, "planner")
    plan = plan_curation(config(uris), tmp_path / "plan", seed=0, groups=3)
    assert [[f["uri"] for f in files] for files in plan["groups"]] == [
        [uris["general"]],
        [f"{uris['code']}/part0.jsonl"],
        [uris["math"]],
    ]
    for index, files in enumerate(plan["groups"]):
        cache = _new_machine(monkeypatch, tmp_path, f"worker-{index}")
        curate_group(tmp_path / "plan", index, tmp_path / f"group-{index}")
        fetched = sorted(p.name for p in cache.rglob("*") if p.is_file())
        assert fetched == [f["uri"].rsplit("/", 1)[1] for f in files]
    merge_groups(tmp_path / "plan", [tmp_path / f"group-{i}" for i in range(3)], tmp_path / "gs")
    local = {n: str(corpus_dir / f"{n}.jsonl") for n in names}
    curate(config(local), tmp_path / "local", seed=0, groups=1)
    got, want = _files(tmp_path / "gs"), _files(tmp_path / "local")
    assert got.keys() == want.keys()
    assert all(got[rel] == want[rel] for rel in got if rel != MANIFEST)
    stats = [read_manifest(tmp_path / d)["datasets"] for d in ("gs", "local")]
    for s in stats:
        for dataset in s.values():
            del dataset["sources"]
    assert stats[0] == stats[1]


def test_kept_json_computes_once_per_key(tmp_path):
    from demix.storage import kept_json

    calls = []

    def compute():
        calls.append(1)
        return {"n": len(calls)}

    path = tmp_path / "kept.json"
    assert kept_json(path, "a", compute) == {"n": 1}
    assert kept_json(path, "a", compute) == {"n": 1} and len(calls) == 1  # read back
    assert kept_json(path, "b", compute) == {"n": 2}  # another key: computed and replaced
    path.write_text(json.dumps({"key": "b", "result": {"n": 0}}))  # another form
    assert kept_json(path, "b", compute) == {"n": 3}
    assert json.loads(path.read_text()) == {"key": "b", "value": {"n": 3}}
