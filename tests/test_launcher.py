"""The pipeline under Kubeflow's launcher semantics (tests/launcher.py): each task in its own
empty folder with only its declared artifacts, the GCS emulator as the artifact store."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml
from kfp import compiler

import pipeline

from .conftest import smoke_config_dict
from .launcher import Launcher, LauncherError, Store, artifact


def _probe_package(tmp_path: Path) -> Path:
    from .launcher_probe import probe

    package = tmp_path / "probe.yaml"
    compiler.Compiler().compile(probe, str(package))
    return package


def test_launcher_runs_loops_fan_ins_and_conditions_each_task_in_an_empty_folder(gcs, tmp_path):
    store = Store(gcs.bucket)
    launcher = Launcher(_probe_package(tmp_path), store, tmp_path / "work")
    done = launcher.run({"text": "kubeflow shares nothing"})
    assert done["words"]["parameters"]["Output"] == ["kubeflow", "shares", "nothing"]
    assert done["join"]["parameters"]["Output"] == "KUBEFLOW NOTHING SHARES"
    assert done["condition-2"] is None  # shout_again is False: the branch did not run
    uri = done["join"]["artifacts"]["out"][0]["uri"]
    assert uri.startswith(f"gs://{gcs.bucket}/pipeline-root/")
    assert store.exists(f"{uri}/joined.txt")  # the declared output, uploaded when it exited
    assert len([p for p in launcher.seconds if p.startswith("for-loop-1/")]) == 3
    assert not list((tmp_path / "work" / "pods").iterdir())  # every pod folder is gone

    done = launcher.run({"text": "again", "shout_again": True})
    assert done["condition-2"] is not None and "condition-2/shout-2" in launcher.seconds


def test_launcher_fails_a_task_that_opens_a_path_it_did_not_declare(gcs, tmp_path):
    elsewhere = tmp_path / "written-by-someone-else.txt"
    elsewhere.write_text("shared state")
    launcher = Launcher(_probe_package(tmp_path), Store(gcs.bucket), tmp_path / "work")
    with pytest.raises(LauncherError, match=r"task join failed \(exit 86\): launcher: the task "):
        launcher.run({"text": "a b", "also_read": str(elsewhere)})


def _bucket_config(gcs, corpus_dir: Path, tmp_path: Path) -> Path:
    """The smoke config with its datasets in the emulator bucket (what a cluster can read)."""
    store = Store(gcs.bucket)
    raw = smoke_config_dict(corpus_dir)
    for spec in raw["data"]["datasets"]:
        name = Path(spec["paths"][0]).name
        uri = f"gs://{gcs.bucket}/corpus/{name}"
        store.upload(corpus_dir / name, uri)
        spec["paths"] = [uri]
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_smoke_pipeline_under_kubeflow_launcher_semantics_matches_demix_run(
    gcs, tmp_path, corpus_dir
):
    """Every task of the compiled Kubeflow pipeline in its own empty folder, reading only its
    declared inputs (and gs:// URIs through demix.storage): the same mixture as `demix run`."""
    from demix.cli import main as demix_main

    config = _bucket_config(gcs, corpus_dir, tmp_path)
    package = tmp_path / "kubeflow.yaml"
    argv = ["compile", "--out", str(package), "--config", str(config), "--allow-local-images"]
    assert pipeline.main(argv) == 0
    launcher = Launcher(package, Store(gcs.bucket), tmp_path / "work")
    started = time.perf_counter()
    done = launcher.run(
        {
            "config_yaml": config.read_text(),
            "num_eval_workers": 2,
        }
    )
    seconds = time.perf_counter() - started
    # validate is off by default: its condition did not run
    assert [v for k, v in done.items() if k.startswith("condition-")] == [None]
    rounds = [p for p in launcher.seconds if p.split("/")[-1].startswith("evaluate-proxies")]
    assert len(rounds) == 2 * 2, rounds  # two rounds of two shards
    store = launcher.store
    # evaluate-final in the finals sub-graph
    summary_uri = launcher.records["finals/evaluate-final"]["artifacts"]["summary"][0]["uri"]
    summary = json.loads(
        store.bucket.blob(store.key(f"{summary_uri}/summary.json")).download_as_bytes()
    )

    assert demix_main(["run", str(config), "--out", str(tmp_path / "lib")]) == 0
    library = json.loads((tmp_path / "lib" / "summary.json").read_text())
    assert summary["mixture"] == pytest.approx(library["mixture"], abs=1e-9)
    assert summary["proxies_evaluated"] == library["proxies_evaluated"] == 6
    for label in ("chosen", "uniform", "token_prior"):
        assert summary["final"][label]["tasks"] == library["final"][label]["tasks"]
    assert summary["verdict"] == library["verdict"]
    print(f"launcher run: {len(launcher.seconds)} tasks in {seconds:.0f} s")


def _train_inputs(gcs, corpus_dir: Path, tmp_path: Path, tokens: int) -> tuple[Store, dict]:
    """A curated dataset and a resolved config in the store, for one training task."""
    from demix.config import config_yaml, parse_config
    from demix.data.curate import curate

    store = Store(gcs.bucket)
    raw = smoke_config_dict(corpus_dir)
    raw["train"].update(checkpoint_every=5, base={"tokens": tokens, "lr": 1e-2})
    config = parse_config(raw)
    curate(config.data, tmp_path / "dataset", config.seed)
    (tmp_path / "config.yaml").write_text(config_yaml(config))
    data_uri, config_uri = f"{store.root}/inputs/dataset", f"{store.root}/inputs/config"
    store.upload(tmp_path / "dataset", data_uri)
    store.upload(tmp_path / "config.yaml", config_uri)
    return store, {
        "config": [artifact(config_uri)],
        "data": [artifact(data_uri, "system.Dataset")],
    }


@pytest.mark.reliability
def test_training_task_killed_mid_run_resumes_from_the_bucket_in_an_empty_folder(
    gcs, tmp_path, corpus_dir
):
    """A train-model task publishes checkpoints to <model.uri>.ckpt; killed after the first one,
    rerun in a fresh empty folder, it resumes there; the weights equal an uninterrupted run."""
    from demix import gcs as gcs_io
    from demix.storage import fetch_artifact

    store, inputs = _train_inputs(gcs, corpus_dir, tmp_path, tokens=16_000)  # 63 steps
    package = pipeline.compile_pipeline(
        "kubeflow", tmp_path / "kubeflow.yaml", allow_local_images=True, rounds=2
    )
    launcher = Launcher(package, store, tmp_path / "work")
    params = {"role": "base", "name": "base", "processes": 1, "cluster": ""}

    gcs.plan.delay_s = 0.3  # slow uploads: the kill lands mid-training on any machine
    first = launcher.start("train-model", "comp-train-model", params, inputs)
    model_uri = first.outputs["model"]["uri"]
    ckpt = f"{model_uri}.ckpt/manifest.json"
    deadline = time.monotonic() + 300
    while not store.exists(ckpt):
        assert first.process.poll() is None, "the task ended before publishing a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint published within 300 s"
        time.sleep(0.05)
    assert first.process.poll() is None, "the task finished before it could be killed"
    first.kill()  # preempted mid-training: its folder, local checkpoint and output are gone
    gcs.plan.delay_s = 0.0

    # the retry: the same task and output URI, a new empty folder
    second = launcher.start("train-model", "comp-train-model", params, inputs)
    assert second.outputs["model"]["uri"] == model_uri
    record = second.wait()
    resumed_at = re.search(r"resumed at step (\d+)", second.log.read_text())
    assert resumed_at and int(resumed_at.group(1)) % 5 == 0, second.log.read_text()[-2000:]
    left = gcs_io.list_blobs(gcs_io.bucket(gcs.bucket), store.key(f"{model_uri}.ckpt") + "/")
    assert not left, "the published checkpoint outlived the finished model"

    whole = launcher.start("train-model-whole", "comp-train-model", params, inputs)
    whole_uri = whole.wait()["artifacts"]["model"][0]["uri"]
    resumed = fetch_artifact(record["artifacts"]["model"][0]["uri"], "demix.model")
    uninterrupted = fetch_artifact(whole_uri, "demix.model")
    assert (resumed / "model.safetensors").read_bytes() == (
        uninterrupted / "model.safetensors"
    ).read_bytes(), "resumed weights differ from an uninterrupted run"


def test_model_index_holds_uris_and_each_model_is_fetched_and_verified(gcs, tmp_path):
    """collect_models' index names artifact URIs, not the pod's local paths; a reader fetches
    each through demix.storage into its own cache and refuses one that does not verify."""
    from demix.errors import DemixError
    from demix.stages import index_entry, read_model_index, write_index_entries
    from demix.storage import write_manifest

    store, models = Store(gcs.bucket), []
    for name in ("general", "code"):
        local = tmp_path / "pod" / name
        local.mkdir(parents=True)
        (local / "model.safetensors").write_bytes(name.encode() * 100)
        write_manifest(local, "demix.model", name=name)
        uri = f"{store.root}/run/train-model-{name}/model"
        store.upload(local, uri)
        models.append((local, uri))
    entries = [index_entry(local, uri) for local, uri in models]  # each training task's output
    index = write_index_entries(entries, tmp_path / "index.json")
    assert index == {"general": models[0][1], "code": models[1][1]}
    shutil.rmtree(tmp_path / "pod")  # the collecting pod is gone

    folders = read_model_index(tmp_path / "index.json")
    assert (folders["code"] / "model.safetensors").read_bytes() == b"code" * 100
    assert str(folders["code"]).startswith(str(tmp_path / "cache"))

    shutil.rmtree(tmp_path / "cache")
    store.bucket.blob(store.key(f"{models[1][1]}/model.safetensors")).upload_from_string(b"x")
    with pytest.raises(DemixError, match=r"index.json: model 'code': .*model.safetensors"):
        read_model_index(tmp_path / "index.json")
