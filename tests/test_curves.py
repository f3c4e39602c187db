"""Training curves: curves.jsonl and TensorBoard events beside every trained model, kept across
a resume, never changing the model; the loss plots of the reports; progress off a terminal."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from demix.checkpoint import copy_model_files
from demix.config import parse_config
from demix.data.curate import curate
from demix.data.shards import CuratedData
from demix.errors import ConfigError, DataError
from demix.progress import INTERVAL_ENV, LogLines, progress, track
from demix.report.curves import curves_section, find_curves, write_curves_page
from demix.storage import read_manifest, write_manifest
from demix.train import train_model
from demix.train.curves import CURVES_FILE, EVENTS_FILE, SCALAR_TAGS, read_curves

from .conftest import smoke_config_dict

STEPS = 24  # logged at 5, 10, 15, 20 (log_every) and 24 (the last step)
LOGGED = [5, 10, 15, 20, 24]
QUANTITIES = ("loss", "lr", "grad_norm", "tokens_per_s", "tokens")


@pytest.fixture(scope="module")
def setup(corpus_dir, tmp_path_factory):
    config = parse_config(smoke_config_dict(corpus_dir))
    root = tmp_path_factory.mktemp("curves")
    curate(config.data, root / "data", config.seed)
    return config, CuratedData(root / "data"), root


def _train(config, data, out, **kw):
    stage = config.train.base.model_copy(update={"tokens": 256 * STEPS})
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


@pytest.fixture(scope="module")
def trained(setup):
    config, data, root = setup
    _train(config, data, root / "a")
    return root / "a"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_training_writes_the_four_quantities_per_logged_step(setup, trained):
    config = setup[0]
    rows = read_curves(trained)
    assert [row["step"] for row in rows] == LOGGED
    for row in rows:
        assert all(math.isfinite(row[key]) for key in QUANTITIES), row
        assert row["tokens"] == row["step"] * config.train.tokens_per_step
        assert row["tokens_per_s"] > 0 and row["grad_norm"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"]
    history = json.loads((trained / "training_log.json").read_text())
    assert [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in rows] == [
        (r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in history
    ]
    files = read_manifest(trained)["files"]  # listed like every file, hashes checked
    assert files[CURVES_FILE]["sha256"] == _sha256(trained / CURVES_FILE)
    assert files[f"tensorboard/{EVENTS_FILE}"]["sha256"] == _sha256(
        trained / "tensorboard" / EVENTS_FILE
    )
    read_manifest(trained, verify=True)


def test_tensorboard_reads_the_event_file_back(trained):
    events = EventAccumulator(str(trained / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(SCALAR_TAGS.values())
    rows = read_curves(trained)
    for key, tag in SCALAR_TAGS.items():
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == LOGGED, tag
        assert [s.value for s in scalars] == pytest.approx([row[key] for row in rows], rel=1e-6)
    assert [s.wall_time for s in events.Scalars("train/loss")] == pytest.approx(
        [row["time"] for row in rows]
    )


def test_curves_leave_the_model_deterministic(setup, trained, tmp_path):
    config, data, _ = setup
    _train(config, data, tmp_path / "b")
    for rel in ("model.safetensors", "training_log.json"):  # bit for bit, curves and all
        assert _sha256(tmp_path / "b" / rel) == _sha256(trained / rel), rel


def test_a_resumed_run_keeps_the_curves_before_the_stop(setup, trained, tmp_path):
    config, data, _ = setup
    assert _train(config, data, tmp_path / "r", stop_at_step=10) is None
    checkpoint = tmp_path / "r.ckpt"  # TensorBoard shows a run in progress: the curves so far
    assert [row["step"] for row in read_curves(checkpoint)] == [5, 10]
    assert (checkpoint / "tensorboard" / EVENTS_FILE).is_file()
    read_manifest(checkpoint, verify=True)
    _train(config, data, tmp_path / "r")
    rows = read_curves(tmp_path / "r")
    assert [row["step"] for row in rows] == LOGGED
    assert all(row["tokens_per_s"] > 0 for row in rows)
    assert [row["loss"] for row in rows] == [row["loss"] for row in read_curves(trained)]


def test_a_resumed_models_seconds_count_every_run_of_its_job(setup, tmp_path):
    """The manifest's `seconds` is the training work of the job, the runs before a resume too
    (the plan and the summary's timings read it)."""
    config, data, _ = setup
    assert _train(config, data, tmp_path / "r", stop_at_step=10) is None
    before = json.loads((tmp_path / "r.ckpt" / "state.json").read_text())["seconds"]
    assert before > 0
    _train(config, data, tmp_path / "r")
    assert read_manifest(tmp_path / "r")["seconds"] >= round(before, 1)


def test_a_merge_copies_no_training_curves(trained, tmp_path):
    copy_model_files(trained, tmp_path)
    assert (tmp_path / "config.json").is_file() and not (tmp_path / CURVES_FILE).exists()


def _model_folder(path: Path, role: str, name: str, rows: list[dict] | None) -> None:
    path.mkdir(parents=True)
    if rows is not None:
        (path / CURVES_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_manifest(path, "demix.model", role=role, name=name)


def test_the_report_has_a_loss_plot_per_role(trained, tmp_path):
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    copy = run / "models" / "base"
    copy.mkdir()
    for path in trained.rglob("*"):  # the trained model, as a run folder holds it
        if path.is_file():
            (copy / path.relative_to(trained)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(trained)).write_bytes(path.read_bytes())
    rows = [{"step": s, "tokens": 256 * s, "loss": 5.0 / s} for s in (1, 2, 3)]
    _model_folder(run / "models" / "code", "component", "code", rows)
    _model_folder(run / "models" / "math", "component", "math", rows)
    _model_folder(run / "models" / "merged", "merged", "m", None)  # no curves: no plot
    _model_folder(run / "models" / ".final.x.tmp", "final", "chosen", rows)  # being written
    ckpt = run / "models" / "final.ckpt"  # a checkpoint: its model holds the curves
    ckpt.mkdir()
    (ckpt / CURVES_FILE).write_text(json.dumps(rows[0]) + "\n")
    write_manifest(ckpt, "demix.checkpoint")

    found = find_curves(run)
    assert list(found) == ["base", "component"]
    assert sorted(found["component"]) == ["code", "math"]
    html = "".join(curves_section(run))
    assert html.count('<img alt="training loss: ') == 2
    assert 'alt="training loss: base" src="data:image/png;base64,' in html
    assert 'alt="training loss: component"' in html


def test_a_run_without_trained_models_has_no_curves_section(tmp_path):
    assert curves_section(tmp_path) == []


def test_a_broken_curves_file_is_one_line_naming_it(tmp_path):
    _model_folder(tmp_path / "m", "base", "base", [{"step": 1, "loss": 1.0}])
    with open(tmp_path / "m" / CURVES_FILE, "a") as f:
        f.write("{not json\n")
    with pytest.raises(DataError, match=rf"{CURVES_FILE}:2: expected a JSON object"):
        find_curves(tmp_path)


def test_the_training_component_page_shows_the_curves(trained, tmp_path):
    page = write_curves_page(trained, tmp_path / "curves.html", "Training curves: base base")
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 1 and "Last logged step" in html
    assert "<td>24</td>" in html  # the last logged step
    none = write_curves_page(tmp_path, tmp_path / "none.html", "Training curves: base base")
    assert "No training curves" in none.read_text()


# ---------------------------------------------------------------- progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_off_a_terminal_progress_is_one_line_per_interval(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="demix.progress")
    bar = LogLines(100, "train base base", "step", initial=0, interval=30.0, clock=clock)
    for _ in range(100):  # one step per second: lines at 30, 60 and 90 s, and the end
        clock.now += 1.0
        bar.set_postfix(loss="3.210")
        bar.update()
    bar.close()
    bar.close()  # once
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert lines[0] == "train base base: 30/100 step (30%), 1 step/s, 01:10 left, loss=3.210"
    assert lines[1].startswith("train base base: 60/100 step (60%)")
    assert lines[-1] == "train base base: 100/100 step (100%), 1 step/s, done in 01:40, loss=3.210"


def test_short_work_off_a_terminal_writes_nothing(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="demix.progress")
    with LogLines(5, "merge", "tensor", interval=30.0, clock=clock) as bar:
        for _ in range(5):
            clock.now += 1.0
            bar.update()
    assert caplog.records == []


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv(INTERVAL_ENV, "5")
    lines = progress(10, "curate", "file", stream=io.StringIO())
    assert isinstance(lines, LogLines) and lines.interval == 5.0
    terminal = Terminal()
    bar = progress(10, "curate", "file", stream=terminal)
    bar.bar.delay = 0  # drawn at once here (a bar shows after 2 s of work)
    bar.update(3)
    bar.close()
    assert "curate" in terminal.getvalue() and "3/10" in terminal.getvalue()
    assert list(track([1, 2, 3], "evaluate", "model", disable=True)) == [1, 2, 3]


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan", "inf"])
def test_a_bad_progress_interval_is_one_line(monkeypatch, value):
    monkeypatch.setenv(INTERVAL_ENV, value)
    with pytest.raises(ConfigError, match=f"{INTERVAL_ENV}=.*positive number of seconds"):
        progress(10, "x", stream=io.StringIO())


def test_a_search_round_off_a_terminal_logs_its_progress(tmp_path, monkeypatch, caplog):
    import numpy as np

    import demix.progress
    from demix.search.loop import evaluate_proposals
    from demix.search.results import ScoresTable

    clock = FakeClock()
    monkeypatch.setattr(demix.progress, "CLOCK", clock)
    caplog.set_level(logging.INFO, logger="demix.progress")
    proposals = [{"id": f"p{i}", "round": 1, "weights": {"a": 0.5, "b": 0.5}} for i in range(4)]
    table = ScoresTable(tmp_path / "scores.jsonl")
    table.append({**proposals[0], "tasks": {}, "time_s": 0.0})  # scored before a resume

    def evaluate(weights: np.ndarray) -> dict:
        clock.now += 20.0  # 20 s a proxy: a line after the second of this run, one at the end
        return {}

    assert evaluate_proposals(proposals, ["a", "b"], evaluate, table) == 3
    # the progress channel's lines (the search's own log may be on, set by an earlier test)
    lines = [r.getMessage() for r in caplog.records if r.name == "demix.progress"]
    assert lines == [
        "search round 1: 3/4 proxy (75%), 0.05 proxy/s, 00:20 left",
        "search round 1: 4/4 proxy (100%), 0.05 proxy/s, done in 01:00",
    ]


def test_progress_in_bytes_reads_as_sizes(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="demix.progress")
    with LogLines(4_000_000, "curate group 0", "B", interval=30.0, clock=clock) as bar:
        clock.now += 40.0
        bar.update(2_000_000)
    assert caplog.records[0].getMessage() == (
        "curate group 0: 2.00MB/4.00MB (50%), 50.0kB/s, 00:40 left"
    )


def test_the_training_component_writes_the_curves_page_and_metrics(trained, tmp_path, monkeypatch):
    """The component's part: the library's page of the trained folder, the manifest's Metrics."""
    from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model

    import demix.config
    import demix.data.shards
    import demix.stages
    from components.train_model import train_model

    def artifact(cls, path: Path):
        art = cls(uri=str(path))
        art.path = str(path)
        return art

    monkeypatch.setattr(demix.stages, "train_stage", lambda *a, **k: trained)
    monkeypatch.setattr(demix.config, "resolve_config", lambda text: None)
    monkeypatch.setattr(demix.data.shards, "CuratedData", lambda path: None)
    (tmp_path / "config.yaml").write_text("seed: 0")
    metrics = artifact(Metrics, tmp_path / "metrics")
    train_model.python_func(
        config=artifact(Artifact, tmp_path / "config.yaml"),
        role="base",
        name="base",
        data=artifact(Dataset, tmp_path / "data"),
        model=artifact(Model, trained),
        metrics=metrics,
        curves=artifact(HTML, tmp_path / "curves.html"),
    )
    html = (tmp_path / "curves.html").read_text()
    assert "<h1>Training curves: base base</h1>" in html and "data:image/png;base64," in html
    assert metrics.metadata["final_loss"] == read_curves(trained)[-1]["loss"]
    assert metrics.metadata["tokens_per_s"] > 0
