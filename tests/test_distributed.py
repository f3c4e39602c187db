"""Several training processes (accelerate, gloo on CPU) against one: same global batches, same
losses, disjoint rows per process, identical sampler state everywhere, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from demix.config import parse_config
from demix.data.curate import curate
from demix.data.shards import CuratedData, MixtureSampler
from demix.distributed import (
    Cluster,
    cluster_from_env,
    launch_command,
    vertex_job,
    vertex_worker_pools,
)
from demix.errors import ConfigError, DemixError

from . import distributed_worker
from .conftest import smoke_config_dict

ROOT = Path(__file__).resolve().parents[1]
STEPS, STOP = 24, 7


@pytest.fixture(scope="module")
def setup(corpus_dir, tmp_path_factory):
    """The smoke datasets curated once; a config of 24 base steps, every loss logged."""
    root = tmp_path_factory.mktemp("distributed")
    raw = smoke_config_dict(corpus_dir)
    raw["train"].update(log_every=1, checkpoint_every=10)
    raw["train"]["base"]["tokens"] = STEPS * 256  # batch 8 x seq 32
    (root / "config.yaml").write_text(yaml.safe_dump(raw))
    config = parse_config(raw)
    curate(config.data, root / "data", config.seed)
    return root, config, CuratedData(root / "data")


# ---------------------------------------------------------------- the sampler, in one process


def test_each_part_reads_its_rows_of_the_same_global_batch(setup):
    _, _, data = setup
    weights = {"general": 0.5, "code": 0.3, "math": 0.2}
    whole = MixtureSampler(data, weights, 32, 8, seed=3)
    parts = [MixtureSampler(data, weights, 32, 8, seed=3) for _ in range(4)]
    for _ in range(40):
        batch = whole.next_batch()
        rows = [sampler.next_batch(p, 4) for p, sampler in enumerate(parts)]
        for p in range(4):  # process p reads rows p, p + 4, ...: disjoint, and all of them
            assert np.array_equal(rows[p], batch[p::4])
        assert sum(len(r) for r in rows) == len(batch)
        assert all(s.state_dict() == whole.state_dict() for s in parts)
    with pytest.raises(ValueError, match="must split"):
        whole.next_batch(0, 3)


def test_no_window_twice_within_an_epoch(setup):
    _, _, data = setup
    sampler = MixtureSampler(data, {"general": 0.3, "code": 0.3, "math": 0.4}, 256, 8, seed=0)
    drawn: dict[int, list[int]] = {}
    for _ in range(400):
        for index, window in sampler.plan_batch():
            drawn.setdefault(index, []).append(window)
    for index, windows in drawn.items():
        n = len(sampler.streams[sampler.names[index]]) // sampler.width
        assert len(windows) > n, "the test should cross an epoch"
        for start in range(0, len(windows) - n + 1, n):
            assert sorted(windows[start : start + n]) == list(range(n))  # each epoch: all, once


def test_global_batch_must_split_over_processes(setup):
    _, config, _ = setup
    assert config.train.accumulation(1) == (8, 1)
    assert config.train.accumulation(2) == (4, 1)
    micro = config.train.model_copy(update={"micro_batch_size": 2})
    assert micro.accumulation(2) == (2, 2)
    with pytest.raises(ConfigError, match="does not split over 3 processes"):
        config.train.accumulation(3)
    with pytest.raises(ConfigError, match="not a multiple of 4 processes x"):
        config.train.model_copy(update={"micro_batch_size": 4}).accumulation(4)
    raw = smoke_config_dict(Path("."))
    raw["train"]["micro_batch_size"] = 3
    with pytest.raises(ConfigError, match="micro_batch_size=3 does not divide batch_size=8"):
        parse_config(raw)


def _log(folder: Path, key: str = "loss") -> list[float]:
    return [row[key] for row in json.loads((folder / "training_log.json").read_text())]


def _same_curves(a: Path, b: Path) -> None:
    """Losses within 1e-4; gradient norms (before clipping) within 0.1%: a gradient scaled
    wrongly (accumulation, averaging over processes) changes the norm even where AdamW and
    clipping would hide it in the weights."""
    assert np.allclose(_log(a), _log(b), atol=1e-4), np.abs(np.subtract(_log(a), _log(b))).max()
    norms = np.array(_log(a, "grad_norm")), np.array(_log(b, "grad_norm"))
    assert np.allclose(*norms, rtol=1e-3), np.abs(norms[0] / norms[1] - 1).max()


def _max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def test_gradient_accumulation_matches_one_pass(setup, tmp_path, one_thread):
    root, _, _ = setup
    whole = distributed_worker.train_base(root / "config.yaml", root / "data", tmp_path / "a")
    raw = yaml.safe_load((root / "config.yaml").read_text())
    raw["train"]["micro_batch_size"] = 2  # 4 forward passes per step
    (tmp_path / "micro.yaml").write_text(yaml.safe_dump(raw))
    micro = distributed_worker.train_base(tmp_path / "micro.yaml", root / "data", tmp_path / "b")
    assert micro["fingerprint"] == whole["fingerprint"]  # the same job, computed in pieces
    _same_curves(tmp_path / "a", tmp_path / "b")
    assert _max_diff(tmp_path / "a", tmp_path / "b") < 1e-4


# ---------------------------------------------------------------- two processes, end to end


def _env() -> dict[str, str]:
    # one thread per process on this 2-core machine; the repo on the path of every process
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _worker(root: Path, out: Path, record: Path, stop: int | None = None) -> None:
    argv = [str(root / "config.yaml"), str(root / "data"), str(out), str(record)]
    argv += [str(stop)] if stop else []
    _run(launch_command(argv, 2, module="tests.distributed_worker"))


def _records(record: Path, rank: int) -> list[dict]:
    return json.loads(Path(f"{record}-rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """One process in this process; two processes through `demix train --processes 2`; and two
    processes stopped at step 7, then resumed, recording every row each process read."""
    root, _, _ = setup
    tmp = tmp_path_factory.mktemp("runs")
    steps: list[dict] = []
    original = distributed_worker.record_batches(steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = distributed_worker.train_base(root / "config.yaml", root / "data", tmp / "one")
    finally:
        MixtureSampler.next_batch = original
        torch.set_num_threads(threads)
    argv = ["train", str(root / "config.yaml"), "--role", "base", "--data", str(root / "data")]
    _run([sys.executable, "-m", "demix.cli", *argv, "--out", str(tmp / "two"), "--processes", "2"])
    _worker(root, tmp / "resumed", tmp / "first", stop=STOP)
    stopped = json.loads((tmp / "resumed.ckpt" / "state.json").read_text())
    assert not (tmp / "resumed").exists()
    _worker(root, tmp / "resumed", tmp / "rest")
    return tmp, one, steps, stopped


def test_two_processes_see_the_one_process_batches_split_between_them(runs):
    tmp, _, one, _ = runs
    ranks = [_records(tmp / "first", r) + _records(tmp / "rest", r) for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == STEPS
    seen = []
    for step, (whole, a, b) in enumerate(zip(one, *ranks, strict=True)):
        assert len(a["rows"]) == len(b["rows"]) == len(whole["rows"]) // 2
        # rank r reads rows r, r + 2, ...: disjoint halves whose union is the global batch
        assert a["rows"] == whole["rows"][0::2] and b["rows"] == whole["rows"][1::2], step
        assert sorted(a["rows"] + b["rows"]) == sorted(whole["rows"])
        assert a["state"] == b["state"] == whole["state"], step  # the same position everywhere
        seen += a["rows"] + b["rows"]
    assert sorted(seen) == sorted(row for batch in one for row in batch["rows"])


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    tmp, one, _, _ = runs
    manifest = json.loads((tmp / "two" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and one["processes"] == 1
    assert manifest["tokens"] == one["tokens"] == STEPS * 256  # global tokens
    assert manifest["fingerprint"] == one["fingerprint"]
    losses = _log(tmp / "two")
    assert len(losses) == STEPS and losses[-1] < losses[0]
    _same_curves(tmp / "two", tmp / "one")
    # the curves of the global batch, written once, by the main process
    curves = [json.loads(line) for line in (tmp / "two" / "curves.jsonl").read_text().splitlines()]
    assert [row["loss"] for row in curves] == losses and curves[-1]["tokens"] == STEPS * 256
    assert all(row["tokens_per_s"] > 0 for row in curves)
    assert [p.name for p in (tmp / "two" / "tensorboard").iterdir()] == [
        "events.out.tfevents.demix"
    ]
    assert _max_diff(tmp / "one", tmp / "two") < 1e-3


def test_two_processes_resume_exactly(runs):
    tmp, _, one, stopped = runs
    assert stopped["step"] == STOP
    assert stopped["sampler"] == one[STOP - 1]["state"]  # written by the main process, global
    assert _max_diff(tmp / "two", tmp / "resumed") == 0.0  # bitwise
    assert _log(tmp / "resumed") == _log(tmp / "two")
    assert not (tmp / "resumed.ckpt").exists()


def test_final_training_component_launches_one_process_per_gpu(
    runs, setup, tmp_path, monkeypatch, one_thread
):
    from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model

    from components.train_final import train_final
    from demix.checkpoint import read_model_manifest
    from demix.data.shards import CuratedData
    from demix.stages import train_stage

    root, config, _ = setup
    tmp = runs[0]
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps({"mixture": {"general": 0.5, "code": 0.25, "math": 0.25}}))

    def artifact(cls, path: Path):
        art = cls(uri=str(path))
        art.path = str(path)
        return art

    model = artifact(Model, tmp_path / "final")
    train_final.python_func(
        config=artifact(Artifact, root / "config.yaml"),
        label="chosen",
        data=artifact(Dataset, root / "data"),
        base=artifact(Model, tmp / "two"),
        selection=artifact(Artifact, selection),
        model=model,
        metrics=artifact(Metrics, tmp_path / "metrics"),
        curves=artifact(HTML, tmp_path / "curves.html"),
        processes=2,
    )
    manifest = json.loads((tmp_path / "final" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["name"] == model.metadata["name"] == "chosen"
    assert not (tmp_path / "final.launch.json").exists()
    mixture = json.loads(selection.read_text())["mixture"]
    data = CuratedData(root / "data")
    one = read_model_manifest(
        train_stage(config, data, "final", tmp_path / "one", "chosen", tmp / "two", mixture)
    )
    assert one["fingerprint"] == manifest["fingerprint"] and one["processes"] == 1
    _same_curves(tmp_path / "final", tmp_path / "one")


# ---------------------------------------------------------------- launching


def test_launch_command_runs_demix_under_accelerate():
    cmd = launch_command(["train", "c.yaml", "--role", "base"], 4, python="py")
    assert cmd[:3] == ["py", "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[cmd.index("--num_machines") + 1] == "1"
    assert "--machine_rank" not in cmd
    assert cmd[-6:] == ["--module", "demix.cli", "train", "c.yaml", "--role", "base"]
    nodes = launch_command(["train"], 8, Cluster(nodes=3, rank=2, address="10.0.0.2", port=2222))
    assert nodes[nodes.index("--num_processes") + 1] == "24"  # total over the machines
    assert nodes[nodes.index("--num_machines") + 1] == "3"
    assert nodes[nodes.index("--machine_rank") + 1] == "2"
    assert nodes[nodes.index("--main_process_ip") + 1] == "10.0.0.2"
    assert nodes[nodes.index("--main_process_port") + 1] == "2222"


def test_vertex_cluster_spec_gives_each_machine_its_place():
    spec = {
        "cluster": {"workerpool0": ["cmle-0:2222"], "workerpool1": ["w-0:2222", "w-1:2222"]},
        "environment": "cloud",
    }
    primary = {**spec, "task": {"type": "workerpool0", "index": 0}}
    second = {**spec, "task": {"type": "workerpool1", "index": 1}}
    assert cluster_from_env({}) is None
    assert cluster_from_env({"CLUSTER_SPEC": json.dumps(primary)}) == Cluster(3, 0, "cmle-0", 2222)
    assert cluster_from_env({"CLUSTER_SPEC": json.dumps(second)}) == Cluster(3, 2, "cmle-0", 2222)
    with pytest.raises(DemixError, match="not a Vertex AI cluster spec"):
        cluster_from_env({"CLUSTER_SPEC": "{}"})


def test_multi_node_jobs_need_two_machines_and_gcs_paths():
    pools = vertex_worker_pools(2, "a3-highgpu-8g", "NVIDIA_H100_80GB", 8, "img")
    assert [p["replica_count"] for p in json.loads(pools)["worker_pool_specs"]] == [1, 1]
    with pytest.raises(DemixError, match="at least 2 machines"):
        vertex_worker_pools(1, "a3-highgpu-8g", "NVIDIA_H100_80GB", 8, "img")
    with pytest.raises(DemixError, match="reads and writes through /gcs/"):
        vertex_job(pools, ["train"], 8, Path("/tmp/run/model"))
