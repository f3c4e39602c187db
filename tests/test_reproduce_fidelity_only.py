"""`demix reproduce` with fidelity.finals false: fidelity only, no search and no final model."""

from __future__ import annotations

import json

import pytest
import yaml

from demix.cli import main

from .conftest import smoke_config_dict


@pytest.mark.slow
def test_reproduce_fidelity_only_trains_no_search_and_no_finals(tmp_path, corpus_dir, capsys):
    raw = smoke_config_dict(corpus_dir)
    raw["fidelity"] = {
        "finals": False,
        "references": 2,
        "replicates": 2,
        "seeds": 2,
        "sweep": [{"tokens": 4000, "lr": 1e-3}],
        "budgets": [0.5],
    }
    config = tmp_path / "fidelity.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert main(["reproduce", str(config), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads((out / "reproduce.json").read_text())
    assert not list(out.glob("search-*")) and not list(out.glob("seed-1/search-*"))
    assert not list((out / "models").glob("final-*"))
    assert result["final"] == {} and result["verdicts"] == {} and result["mixtures"] == {}
    assert result["training_tokens"]["final"] == 0
    # the run's own components (lr 5e-3) beside the swept lr, same budget
    assert [(p["tokens"], p["lr"]) for p in result["sweep"]] == [(4000, 5e-3), (4000, 1e-3)]
    assert result["sweep"][0]["mean_delta_norm"] > 0
    # the matched ratio against a search of the configured rounds (4 + 2 proxies)
    assert result["matched_fidelity"]["proxies"] == 6
    head = result["headline"]
    assert head["seeds"] == 2 and head["verdicts"] == {"token_prior": [], "uniform": []}
    assert set(head["macro_minus"]) == {"trivial_linear", "trivial_quadratic", "trivial_weight"}
    assert "Verdict (" not in table and "| final model |" not in table
    assert "macro: proxy − quadratic fit" in table and "| mean [95%] |" in table
