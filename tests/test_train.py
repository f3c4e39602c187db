"""The training loop: deterministic, exactly resumable, idempotent, and loud on divergence."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from demix.config import parse_config
from demix.data.curate import curate
from demix.data.shards import CuratedData
from demix.train import TrainingError, lr_at, train_model

from .conftest import smoke_config_dict


@pytest.fixture(scope="module")
def setup(corpus_dir, tmp_path_factory):
    config = parse_config(smoke_config_dict(corpus_dir))
    root = tmp_path_factory.mktemp("train")
    curate(config.data, root / "data", config.seed)
    return config, CuratedData(root / "data")


def _train(config, data, out, **kw):
    stage = config.train.base.model_copy(update={"tokens": 256 * 24})
    return train_model(
        out,
        data,
        data.token_prior,
        stage,
        config.train,
        config.model,
        config.seed,
        role="base",
        name="base",
        arch=config.model.architecture,
        quiet=True,
        **kw,
    )


def _weights(folder):
    return load_file(folder / "model.safetensors")


def test_exact_resume_gives_identical_weights(setup, tmp_path):
    config, data = setup
    full = _train(config, data, tmp_path / "full")
    assert full["steps"] == 24
    assert _train(config, data, tmp_path / "resumed", stop_at_step=7) is None
    assert (tmp_path / "resumed.ckpt" / "manifest.json").is_file()
    assert not (tmp_path / "resumed").exists()
    resumed = _train(config, data, tmp_path / "resumed")
    assert not (tmp_path / "resumed.ckpt").exists()
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed["final_loss"] == full["final_loss"]


def test_training_learns_and_is_deterministic(setup, tmp_path):
    config, data = setup
    m1 = _train(config, data, tmp_path / "a")
    log = json.loads((tmp_path / "a" / "training_log.json").read_text())
    assert log[-1]["loss"] < log[0]["loss"]
    _train(config, data, tmp_path / "b")
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert m1["tokens"] == 24 * config.train.tokens_per_step


def test_finished_job_is_skipped_and_changed_job_is_not(setup, tmp_path):
    config, data = setup
    first = _train(config, data, tmp_path / "m")
    mtime = (tmp_path / "m" / "model.safetensors").stat().st_mtime_ns
    assert _train(config, data, tmp_path / "m") == first
    assert (tmp_path / "m" / "model.safetensors").stat().st_mtime_ns == mtime
    other = config.model_copy(update={"seed": 1})
    assert _train(other, data, tmp_path / "m")["fingerprint"] != first["fingerprint"]


def test_non_finite_loss_stops_with_the_step(setup, tmp_path):
    config, data = setup
    stage = config.train.base.model_copy(update={"tokens": 256 * 30, "lr": 1e6})
    train = config.train.model_copy(update={"checkpoint_every": 2, "grad_clip": 1e9})
    with pytest.raises(TrainingError, match=r"at step \d+"):
        train_model(
            tmp_path / "x",
            data,
            data.token_prior,
            stage,
            train,
            config.model,
            0,
            role="base",
            name="base",
            arch=config.model.architecture,
            quiet=True,
        )
    assert not (tmp_path / "x").exists()


def test_lr_schedule_warmup_and_cosine(setup):
    config, _ = setup
    stage = config.train.base.model_copy(
        update={"lr": 1.0, "warmup_fraction": 0.1, "min_lr_ratio": 0.1}
    )
    assert lr_at(0, 100, stage) == pytest.approx(0.1)
    assert lr_at(9, 100, stage) == pytest.approx(1.0)
    assert lr_at(99, 100, stage) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(55, 100, stage) == pytest.approx(0.55, abs=0.01)
