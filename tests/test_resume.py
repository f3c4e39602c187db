"""kill -9 at a random moment, rerun the same command: the result is as if never interrupted.

Each test runs the real `demix` command in a subprocess, sends it SIGKILL once its progress
passes a randomly chosen point, reruns the command to completion, and compares against an
uninterrupted run (training: bitwise equal weights; search: no proxy scored twice and the same
mixture). The kill point's seed is in each assertion message, to replay a failure.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from . import reliability
from .conftest import smoke_config_dict

pytestmark = pytest.mark.reliability


def _demix(argv: list[str]) -> subprocess.Popen:
    """`demix argv` in a subprocess with this test's environment (GCS emulator, cache)."""
    # One torch thread, in every run alike: same numerics, and the tiny models train fastest so
    # on a busy CPU.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "demix.cli", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120) -> None:
    """SIGKILL `proc` as soon as ready() holds; fail if it finishes or stalls first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"finished before the kill point (rc {proc.returncode}): {err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the kill point was never reached")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _run(argv: list[str]) -> str:
    """Run `demix argv` to completion; its stdout and stderr together."""
    proc = _demix(argv)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out + err


def _checkpoint_step(ckpt: Path) -> int:
    try:
        return int(json.loads((ckpt / "manifest.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


@pytest.fixture(scope="module")
def curated(corpus_dir, tmp_path_factory):
    """The smoke datasets curated once, and a config of 240 training steps (12 checkpoints)."""
    from demix.config import parse_config
    from demix.data.curate import curate

    root = tmp_path_factory.mktemp("resume")
    raw = smoke_config_dict(corpus_dir)
    raw["train"]["checkpoint_every"] = 20
    raw["train"]["base"]["tokens"] = 240 * 256
    (root / "config.yaml").write_text(yaml.safe_dump(raw))
    config = parse_config(raw)
    curate(config.data, root / "data", config.seed)
    return root


def test_kill_9_during_training_resumes_to_bitwise_identical_weights(curated, tmp_path):
    seed = random.randrange(1 << 30)
    kill_after = random.Random(seed).randrange(20, 200)  # a checkpoint step past this point
    out = tmp_path / "base"
    argv = ["train", str(curated / "config.yaml"), "--role", "base"]
    argv += ["--data", str(curated / "data"), "--out", str(out)]
    proc = _demix(argv)
    ckpt = out.with_name("base.ckpt")
    _kill_when(proc, lambda: _checkpoint_step(ckpt) >= kill_after)
    assert not (out / "manifest.json").exists(), f"seed {seed}: finished despite the kill"

    log = _run(argv)
    resumed_at = int(log.split("resumed at step ")[1].split()[0])
    assert kill_after <= resumed_at < 240, f"seed {seed}: resumed at {resumed_at}"
    assert not ckpt.exists() and not list(tmp_path.glob(".base*")), "temporaries left behind"

    reference = tmp_path / "reference"
    _run([*argv[:-1], str(reference)])
    for rel in ("model.safetensors", "training_log.json"):
        reliability.intact(
            (out / rel).read_bytes() == (reference / rel).read_bytes(),
            f"seed {seed}: {rel} after kill -9 at step >= {kill_after} differs",
        )
    reliability.count("kills")


@pytest.fixture(scope="module")
def trained(curated, tmp_path_factory):
    """Base and components of the smoke config (short budgets), for the search."""
    root = tmp_path_factory.mktemp("models")
    config = root / "config.yaml"
    raw = yaml.safe_load((curated / "config.yaml").read_text())
    raw["train"]["base"]["tokens"] = 6000
    raw["train"]["component"]["tokens"] = 2000
    config.write_text(yaml.safe_dump(raw))
    data = str(curated / "data")
    _run(["train", str(config), "--role", "base", "--data", data, "--out", str(root / "base")])
    for name in ("general", "code", "math"):
        _run(
            ["train", str(config), "--role", "component", "--dataset", name, "--data", data]
            + ["--init", str(root / "base"), "--out", str(root / name)]
        )
    return root


@pytest.mark.slow
def test_kill_9_during_search_never_rescores_a_proxy_and_picks_the_same_mixture(
    curated, trained, tmp_path
):
    seed = random.randrange(1 << 30)
    kill_after = random.Random(seed).randrange(1, 5)  # of 4 + 2 proxies
    out = tmp_path / "search"
    argv = ["search", str(trained / "config.yaml"), "--data", str(curated / "data")]
    argv += ["--base", str(trained / "base"), "--out", str(out), "--components"]
    argv += [f"{n}={trained / n}" for n in ("general", "code", "math")]
    scores = out / "scores.jsonl"

    def rows() -> list[dict]:
        if not scores.is_file():
            return []
        return [json.loads(line) for line in scores.read_text().splitlines() if line.endswith("}")]

    _kill_when(_demix(argv), lambda: len(rows()) >= kill_after)
    before = {row["id"] for row in rows()}
    log = _run(argv)
    rescored = {line.split()[5].rstrip(":") for line in log.splitlines() if " proxy " in line}
    assert not before & rescored, f"seed {seed}: proxies scored again: {before & rescored}"
    ids = [row["id"] for row in rows()]
    assert len(ids) == len(set(ids)) == 6, f"seed {seed}: {ids}"

    reference = tmp_path / "reference"
    _run([*argv[: argv.index("--out") + 1], str(reference), *argv[argv.index("--out") + 2 :]])
    got = json.loads((out / "result.json").read_text())["mixture"]
    want = json.loads((reference / "result.json").read_text())["mixture"]
    reliability.intact(got == want, f"seed {seed}: resumed search chose {got}, not {want}")
    reliability.count("kills")


def test_kill_9_while_publishing_to_gcs_leaves_nothing_readable_and_the_rerun_completes(
    curated, gcs, tmp_path, monkeypatch
):
    from demix.errors import DataError
    from demix.storage import fetch_artifact

    seed = random.randrange(1 << 30)
    kill_after = random.Random(seed).randrange(1, 7)  # of the dataset's 9 files
    uri = f"gs://{gcs.bucket}/run/dataset"
    argv = ["curate", str(curated / "config.yaml"), "--out", uri]
    gcs.plan.delay_s = 0.1  # every upload request waits, so the kill lands mid-publish
    uploads = gcs.plan.requests["POST"]
    _kill_when(_demix(argv), lambda: gcs.plan.requests["POST"] >= uploads + kill_after)
    gcs.plan.delay_s = 0.0

    monkeypatch.setenv("DEMIX_CACHE", str(tmp_path / "reader"))
    with pytest.raises(DataError, match="no manifest.json; the artifact is missing"):
        fetch_artifact(uri)

    monkeypatch.setenv("DEMIX_CACHE", str(tmp_path / "cache"))
    _run(argv)
    monkeypatch.setenv("DEMIX_CACHE", str(tmp_path / "reader"))
    got = fetch_artifact(uri, "demix.dataset")
    for split in ("general/train.bin", "math/heldout.bin", "tokenizer/tokenizer.json"):
        reliability.intact(
            (got / split).read_bytes() == (curated / "data" / split).read_bytes(),
            f"seed {seed}: {split} published after kill -9 at upload {kill_after} differs",
        )
    reliability.count("kills")
