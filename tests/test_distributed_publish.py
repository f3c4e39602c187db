"""A multi-process training task survives preemption: its main process publishes each checkpoint
to `<model.uri>.ckpt` in the bucket, a retried task in an empty pod resumes from it.

Two CPU processes (accelerate, gloo) against the real GCS emulator: the `train model` task is
killed (its whole process group, as a preempted pod) once a checkpoint is in the bucket, rerun
in a fresh empty folder, and must end with the weights of an uninterrupted two-process run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from demix.errors import DemixError
from demix.storage import is_remote

from .conftest import smoke_config_dict

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 40, 5


@pytest.fixture(scope="module")
def curated(corpus_dir, tmp_path_factory):
    """The smoke datasets curated once; a base of 40 steps, a checkpoint every 5."""
    from demix.config import parse_config
    from demix.data.curate import curate

    root = tmp_path_factory.mktemp("publish")
    raw = smoke_config_dict(corpus_dir)
    raw["train"].update(log_every=1, checkpoint_every=EVERY)
    raw["train"]["base"]["tokens"] = STEPS * 256  # batch 8 x seq 32
    (root / "config.yaml").write_text(yaml.safe_dump(raw))
    config = parse_config(raw)
    curate(config.data, root / "data", config.seed)
    return root


def _task(root: Path, pod: Path, uri: str) -> subprocess.Popen:
    """The `train model` task with 2 processes in the pod folder `pod` (its own process group,
    cache and home, as a pod has), its model at `uri`."""
    pod.mkdir()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # one thread per process on this 2-core machine
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "HOME": str(pod / "home"),
        "DEMIX_CACHE": str(pod / "cache"),
        "HF_HOME": str(pod / "hf"),
    }
    argv = [str(pod), str(root / "config.yaml"), str(root / "data"), uri, "2"]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.train_task", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the task and the processes it launches: one group to kill
    )


def _kill_pod(proc: subprocess.Popen) -> None:
    """Kill the task and every process it started, as a preempted pod's are: the launched
    training processes included, which an orphaned run would otherwise finish (they need not
    be in the task's process group)."""
    import psutil

    processes = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def _finish(proc: subprocess.Popen) -> tuple[Path, str]:
    """Wait for the task; its model folder and its log."""
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err[-4000:]
    return Path(out.strip().splitlines()[-1]), err


def _published_step(bucket, key: str) -> int:
    """The step of the checkpoint published at gs://bucket/key, -1 when there is none."""
    from demix import gcs

    text = gcs.read_bytes(bucket, f"{key}/manifest.json")
    return int(json.loads(text).get("step", -1)) if text else -1


@pytest.mark.slow  # three launches of two processes: about a minute here
def test_two_process_task_killed_after_a_published_checkpoint_resumes_in_an_empty_pod(
    curated, gcs, tmp_path
):
    from demix import gcs as storage

    bucket = storage.bucket(gcs.bucket)
    uri = f"gs://{gcs.bucket}/run/train-base/model"

    # every upload held back: the run is still training when its first checkpoint is in the bucket
    gcs.plan.delay_s = 0.2
    proc = _task(curated, tmp_path / "pod-1", uri)
    deadline = time.monotonic() + 240
    while (published := _published_step(bucket, "run/train-base/model.ckpt")) < 0:
        if proc.poll() is not None:
            pytest.fail(f"the task ended before a checkpoint was published: {proc.stderr.read()}")
        assert time.monotonic() < deadline, "no checkpoint was published"
        time.sleep(0.02)
    _kill_pod(proc)  # preempted: the pod and every process in it
    proc.communicate()
    assert published >= EVERY and published % EVERY == 0
    assert not (tmp_path / "pod-1" / "gcs" / gcs.bucket / "run/train-base/model").exists()
    gcs.plan.delay_s = 0.0

    model, log = _finish(_task(curated, tmp_path / "pod-2", uri))  # the retry: a fresh pod
    resumed = int(log.split("resumed at step ")[1].split()[0])
    assert published <= resumed < STEPS, log[-2000:]

    reference, _ = _finish(_task(curated, tmp_path / "pod-3", f"gs://{gcs.bucket}/ref/model"))
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["steps"] == STEPS
    for rel in ("model.safetensors", "training_log.json"):  # bitwise, as one uninterrupted run
        assert (model / rel).read_bytes() == (reference / rel).read_bytes(), rel
    # the checkpoints are gone once the models are done; nothing else was left in the bucket
    assert not storage.list_blobs(bucket, "run/train-base/model.ckpt")
    assert not storage.list_blobs(bucket, "ref/model.ckpt")
    assert not (model.parent / "model.launch.json").exists()


def test_publish_uri_is_a_gcs_uri_for_a_local_output(tmp_path, gcs, capsys):
    from demix.cli import main

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(smoke_config_dict(tmp_path)))
    argv = ["train", str(config), "--role", "base", "--data", str(tmp_path / "data")]
    assert main([*argv, "--out", str(tmp_path / "m"), "--publish-uri", str(tmp_path / "p")]) == 2
    assert "give the gs:// URI the local --out is published at" in capsys.readouterr().err
    remote = f"gs://{gcs.bucket}/m"
    assert main([*argv, "--out", remote, "--publish-uri", f"gs://{gcs.bucket}/p"]) == 2
    assert f"--out {remote} publishes its own checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "p.ckpt").exists()


def test_launched_training_carries_the_publish_uri(tmp_path, monkeypatch):
    """The job every launched process reads: the worker module's entry point, no `demix`
    argv; a gs:// publish URI travels in the job, a local one is dropped."""
    from demix.config import config_yaml, parse_config
    from demix.stages import launch

    config = parse_config(smoke_config_dict(tmp_path))
    calls = []

    def fake_launch(argv, processes, cluster=None, module="demix.cli"):
        calls.append((module, argv, json.loads(Path(argv[0]).read_text())))
        raise DemixError("stop here")

    monkeypatch.setattr("demix.distributed.run_launched", fake_launch)
    for uri in ("gs://b/run/model", str(tmp_path / "local-root" / "model")):
        job = launch.job_for(config, "base", "base", tmp_path / "data", tmp_path / "model", None,
                             None, publish_uri=uri)  # fmt: skip
        with pytest.raises(DemixError, match="stop here"):
            launch.launch_train(config, job, 2)
    (module, argv, first), (_, _, second) = calls
    assert module == "demix.stages.worker" and argv == [str(tmp_path / "model.launch.json")]
    assert first["publish_uri"] == "gs://b/run/model" and first["role"] == "base"
    assert second["publish_uri"] == ""  # a local pipeline root: nothing to publish to
    assert first["config"] == config_yaml(config)  # the seeded config travels whole
    assert not (tmp_path / "model.launch.json").exists()  # removed when the launch fails too


def test_a_launched_process_reports_a_bad_job_in_one_line(tmp_path, capsys):
    """The worker keeps demix's error contract: the launching process relays its one line."""
    from demix.stages import worker

    bad = tmp_path / "model.launch.json"
    bad.write_text('{"role": "base"}')
    assert worker.main([str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"demix: error: {bad}: not a training job")


def test_only_the_main_process_guards_the_published_checkpoint(monkeypatch):
    from argparse import Namespace

    from demix.cli_outputs import train_out as _train_out

    args = Namespace(out="/tmp/run/model", publish_uri="gs://b/run/model")
    spec = {"cluster": {"workerpool0": ["m-0:2222"], "workerpool1": ["w-0:2222"]}}

    def guarded() -> list[str]:
        return [str(output.uri) for output in _train_out(args) if is_remote(output.uri)]

    assert guarded() == ["gs://b/run/model.ckpt"]  # may remove what it left on a failure
    monkeypatch.setenv("RANK", "1")
    assert guarded() == []
    monkeypatch.setenv("RANK", "0")
    task = {"type": "workerpool1", "index": 0}
    monkeypatch.setenv("CLUSTER_SPEC", json.dumps({**spec, "task": task}))
    assert guarded() == []  # the second machine, before it launches its processes
    monkeypatch.setenv("CLUSTER_SPEC", json.dumps({**spec, "task": {"type": "workerpool0"}}))
    assert guarded() == ["gs://b/run/model.ckpt"]
