"""End to end: `demix run` on a smoke config writes the summary contract and the report."""

from __future__ import annotations

import json

import pytest
import yaml

from demix.cli import main

from .conftest import smoke_config_dict

CATEGORIES = {"general", "math", "code"}


@pytest.fixture(scope="module")
def smoke_run(corpus_dir, eval_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    config = root / "smoke.yaml"
    config.write_text(yaml.safe_dump(smoke_config_dict(corpus_dir, eval_dir)))
    assert main(["run", str(config), "--out", str(root / "out")]) == 0
    return config, root / "out"


def test_summary_contract(smoke_run):
    _, out = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    names = ["general", "code", "math"]
    assert summary["datasets"] == names
    assert sum(summary["token_prior"].values()) == pytest.approx(1.0, abs=1e-5)
    assert set(summary["mixture"]) == set(names)
    assert sum(summary["mixture"].values()) == pytest.approx(1.0, abs=1e-5)
    assert all(w >= 0 for w in summary["mixture"].values())
    assert summary["proxies_evaluated"] == 4 + 2
    assert summary["search_rounds"] == 2
    assert set(summary["final"]) == {"chosen", "uniform", "token_prior"}
    for result in summary["final"].values():
        assert 0.0 <= result["ranking_score"] <= 1.0
        assert set(result["categories"]) == CATEGORIES
        assert {"heldout:general", "basic_skills_arithmetic", "math500_bpb"} <= set(result["tasks"])
    tokens = summary["training_tokens"]
    assert tokens["base"] > 0 and tokens["components"] == 3 * 4096 and tokens["final"] == 3 * 4096
    assert set(summary["timings_s"]) == {"curate", "base", "components", "search", "final"}
    rows = (out / "search" / "scores.jsonl").read_text().splitlines()
    assert len(rows) == summary["proxies_evaluated"]
    report = (out / "report.html").read_text()
    assert report.count("<img") == 4 and "Chosen mixture" in report


def test_rerun_skips_finished_work_and_gives_the_same_mixture(smoke_run, capsys):
    config, out = smoke_run
    before = json.loads((out / "summary.json").read_text())
    mtime = (out / "models" / "base" / "model.safetensors").stat().st_mtime_ns
    assert main(["run", str(config), "--out", str(out)]) == 0
    after = json.loads((out / "summary.json").read_text())
    assert after["mixture"] == before["mixture"]
    assert after["final"] == before["final"]
    assert (out / "models" / "base" / "model.safetensors").stat().st_mtime_ns == mtime
    assert (
        len((out / "search" / "scores.jsonl").read_text().splitlines())
        == before["proxies_evaluated"]
    )
