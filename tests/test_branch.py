"""The branch regime: a warmup-stable base is the branch point every other role decays from,
with its optimizer state fresh or carried, and the control branch on the token prior."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from demix.checkpoint import read_model_manifest
from demix.config import ConfigError, parse_config
from demix.data.curate import curate
from demix.data.shards import CuratedData
from demix.distributed import make_accelerator
from demix.model import load_model
from demix.stages import train_components, train_stage
from demix.train import TrainingError, lr_at
from demix.train.job import job_fingerprint
from demix.train.loop import _param_groups
from demix.train.roles import decayed_base_dir
from demix.train.state import BRANCH_OPTIMIZER, carry_optimizer_state

from .conftest import smoke_config_dict


def _wsd_config(corpus_dir, **component):
    raw = smoke_config_dict(corpus_dir)
    raw["train"]["base"].update(schedule="wsd", decay_tokens=2_048, tokens=8_192)
    raw["train"]["component"].update(tokens=2_048, warmup_fraction=0.0, **component)
    return parse_config(raw)


@pytest.fixture(scope="module")
def branched(corpus_dir, tmp_path_factory):
    """A curated corpus and a warmup-stable base with its decayed copy."""
    config = _wsd_config(corpus_dir)
    root = tmp_path_factory.mktemp("branch")
    curate(config.data, root / "data", config.seed)
    data = CuratedData(root / "data")
    base = train_stage(config, data, "base", root / "models" / "base")
    return config, data, base, root


def _log(folder):
    return json.loads((folder / "training_log.json").read_text())


def test_lr_schedules_stable_base_and_decay_branch(corpus_dir):
    config = _wsd_config(corpus_dir)
    base = config.train.base.model_copy(update={"lr": 1.0, "warmup_fraction": 0.1})
    assert lr_at(0, 100, base) == pytest.approx(0.1)
    assert [lr_at(s, 100, base) for s in (9, 50, 99, 100)] == [1.0] * 4  # stable to the end
    branch = config.train.component.model_copy(update={"lr": 2.0, "min_lr_ratio": 0.1})
    assert lr_at(0, 100, branch) == pytest.approx(2.0)  # no warmup: starts at its peak
    assert lr_at(100, 100, branch) == pytest.approx(0.2)  # decays to final ratio x peak
    assert lr_at(99, 100, branch) == pytest.approx(0.2, abs=1e-3)


def test_wsd_base_is_the_stable_branch_point_with_its_optimizer_state(branched):
    config, data, base, _ = branched
    manifest = read_model_manifest(base)
    assert manifest["schedule"] == "wsd" and manifest["lr_end"] == config.train.base.lr
    log = _log(base)
    assert log[-1]["lr"] == config.train.base.lr  # the stable checkpoint: never decayed
    moments = load_file(base / BRANCH_OPTIMIZER)
    assert any(k.endswith(".exp_avg_sq") for k in moments)
    # the optimizer file is not weights: the model folder's weights are unchanged by it
    assert sorted(p.name for p in base.glob("*.safetensors")) == ["model.safetensors"]

    decayed = decayed_base_dir(base)
    copy = read_model_manifest(decayed)
    assert copy["init"] == manifest["fingerprint"] and copy["optimizer"] == "carried"
    assert copy["tokens"] == config.train.base.decay_tokens
    assert _log(decayed)[-1]["lr"] < 0.2 * config.train.base.lr
    assert not (decayed / BRANCH_OPTIMIZER).exists()


def test_components_and_control_branch_from_the_stable_checkpoint(branched):
    config, data, base, root = branched
    base_id = read_model_manifest(base)["fingerprint"]
    decayed_id = read_model_manifest(decayed_base_dir(base))["fingerprint"]
    components = train_components(config, data, base, root / "models")
    peak, ratio = config.train.component.lr, config.train.component.min_lr_ratio
    for folder in components.values():
        manifest = read_model_manifest(folder)
        assert manifest["init"] == base_id != decayed_id
        assert manifest["lr_end"] == pytest.approx(ratio * peak)
        lrs = [row["lr"] for row in _log(folder)]
        # decays from its peak toward final ratio x peak, reached as the last step ends
        assert lrs == sorted(lrs, reverse=True) and ratio * peak < lrs[-1] < 1.5 * ratio * peak

    control = train_stage(config, data, "control", root / "models" / "control", "control", base)
    manifest = read_model_manifest(control)
    assert manifest["role"] == "control" and manifest["init"] == base_id
    assert manifest["weights"] == pytest.approx(data.token_prior)
    assert manifest["tokens"] == read_model_manifest(components["code"])["tokens"]
    assert manifest["lr_end"] == pytest.approx(ratio * peak)


def test_carried_optimizer_loads_the_base_state(branched):
    config, data, base, root = branched
    accelerator = make_accelerator(config.train)
    model = load_model(base, torch.device("cpu"), torch.float32, False, "eager")
    optimizer = torch.optim.AdamW(_param_groups(model, 0.1), lr=0.5)
    carry_optimizer_state(base, accelerator, model, optimizer)
    saved = load_file(base / BRANCH_OPTIMIZER)
    named = dict(model.named_parameters())
    for name, param in named.items():
        state = optimizer.state[param]
        assert torch.equal(state["exp_avg"], saved[f"{name}.exp_avg"]), name
        assert torch.equal(state["exp_avg_sq"], saved[f"{name}.exp_avg_sq"]), name
        assert float(state["step"]) == float(saved[f"{name}.step"]) > 0
    assert all(group["lr"] == 0.5 for group in optimizer.param_groups)  # the branch's own lr

    carried = _wsd_config(config_corpus(config), optimizer="carried")
    fresh_dir = root / "models" / "component-code"
    carried_dir = root / "carried" / "component-code"
    train_stage(carried, data, "component", carried_dir, "code", base)
    assert read_model_manifest(carried_dir)["optimizer"] == "carried"
    a, b = load_file(fresh_dir / "model.safetensors"), load_file(carried_dir / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the carried moments change the steps


def test_carried_optimizer_needs_a_base_that_saved_one(branched, tmp_path):
    config, data, base, root = branched
    carried = _wsd_config(config_corpus(config), optimizer="carried")
    decayed = decayed_base_dir(base)  # a finished model: no optimizer state kept
    with pytest.raises(TrainingError, match="no optimizer state saved with this base"):
        train_stage(carried, data, "component", tmp_path / "c", "code", decayed)


def config_corpus(config):
    """The corpus folder of a smoke config."""
    from pathlib import Path

    return Path(config.data.datasets[0].paths[0]).parent


def test_branch_settings_are_checked(corpus_dir):
    raw = smoke_config_dict(corpus_dir)
    raw["train"]["component"]["schedule"] = "wsd"
    with pytest.raises(ConfigError, match="decay branches"):
        parse_config(raw)
    raw = smoke_config_dict(corpus_dir)
    raw["train"]["base"]["decay_tokens"] = 100
    with pytest.raises(ConfigError, match="schedule: wsd"):
        parse_config(raw)
    raw = smoke_config_dict(corpus_dir)
    raw["train"]["base"]["optimizer"] = "carried"
    with pytest.raises(ConfigError, match="from scratch"):
        parse_config(raw)


def test_fingerprints_of_cosine_jobs_do_not_change(corpus_dir, branched):
    """Settings added with the branch regime count only when set: earlier runs stay cached."""
    _, data, _, _ = branched
    config = parse_config(smoke_config_dict(corpus_dir))
    stage = config.train.component
    old = stage.model_dump(exclude={"schedule", "decay_tokens", "optimizer"})
    assert stage.changed_settings() == old
    args = (data, data.token_prior)
    rest = (config.train, 0, "component", "code", None, config.model.architecture)
    carried = stage.model_copy(update={"optimizer": "carried"})
    assert job_fingerprint(*args, stage, *rest) != job_fingerprint(*args, carried, *rest)


@pytest.mark.slow
def test_validate_reports_against_the_branch_point_and_the_control(branched):
    """A constructed validate run in the branch regime: the control is trained per run seed on
    the token prior from the branch point, and fidelity.json reports both anchors."""
    from demix.stages import Run
    from demix.stages.validate import validate_stage

    config, data, base, root = branched
    config = config.model_copy(
        update={"fidelity": config.fidelity.model_copy(update={"references": 2})}
    )
    components = train_components(config, data, base, root / "models")
    out = root / "validate"
    result = validate_stage(Run(config, data, base, components), out)
    control = read_model_manifest(out / "control")
    assert control["role"] == "control" and control["seed"] == config.seed
    assert control["init"] == read_model_manifest(base)["fingerprint"]
    assert result["cost"]["control_training_tokens"] == control["tokens"]
    anchors = json.loads((out / "fidelity.json").read_text())["anchors"]
    tasks = config.evaluate.tasks
    for anchor in ("branch_point", "control"):
        for task in tasks:
            entry = anchors["improvements"][anchor][task]
            assert len(entry["models"]) == result["n"]
            assert entry["mean"]["verdict"] in ("better", "worse", "inconclusive")
        assert set(anchors["crr"][anchor]["crr"]) == {*config.evaluate.categories, "mean"}
    assert set(anchors["soup_bonus"]) == set(tasks)
    # the control's own result is the anchor: the references' mean difference from it
    task = tasks[0]
    gap = (
        np.mean([r[task]["value"] for r in result["reference_results"]])
        - result["control_result"][task]["value"]
    )
    assert anchors["improvements"]["control"][task]["mean"]["diff"] == pytest.approx(-gap)
