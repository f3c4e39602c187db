"""The decision at equal tokens (demix.decision, demix.search.fits, demix reproduce-decision):
the budget accounting, the weights-only fits on constructed surfaces, the table's rows from
constructed final results, and a tiny end-to-end run that resumes without evaluating again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from demix import decision
from demix.cli import main
from demix.config import SearchConfig, load_config, parse_config
from demix.errors import DemixError
from demix.report.decision import format_decision
from demix.search.fits import fit_selection

from .conftest import smoke_config_dict

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("heldout:general", "heldout:math", "heldout:code")


def _config(tmp_path, **decision_settings):
    raw = smoke_config_dict(tmp_path)
    raw["train"]["component"]["tokens"] = 400_000
    raw["decision"] = decision_settings
    return parse_config(raw)


def test_merged_search_size_gives_the_rounds_their_proxies():
    assert decision.merged_search_size(21, 3) == 12  # 12 + 6 + 3
    assert decision.merged_search_size(200, 3) == 115  # 115 + 57 + 28
    assert decision.merged_search_size(6, 2) == 4  # 4 + 2
    n = decision.merged_search_size(200, 3)
    assert sum(max(1, n >> r) for r in range(3)) == 200
    assert sum(max(1, (n - 1) >> r) for r in range(3)) < 200


def test_budget_plan_counts_the_proxies_each_budget_buys(tmp_path):
    config = _config(tmp_path)
    plan = decision.budget_plan(config.decision, config.train, config.search, datasets=3)
    assert [p["label"] for p in plan] == ["1x", "2x", "4x"]
    # 3 components x 400k x budget, spent on proxies of 1/8 of the component budget (50k)
    assert [p["tokens"] for p in plan] == [1_200_000, 2_400_000, 4_800_000]
    assert [p["component_tokens"] for p in plan] == [400_000, 800_000, 1_600_000]
    assert [p["proxies"] for p in plan] == [24, 48, 96]
    assert all(p["proxy_tokens"] == 50_000 for p in plan)
    assert all(p["proxies"] * p["proxy_tokens"] <= p["tokens"] for p in plan)
    # the smoke config searches in 2 rounds: n + n/2 proxies
    assert plan[0]["merged"] == {21: 14, 200: 134}


def test_budget_plan_refuses_a_budget_too_small_for_a_regression(tmp_path):
    config = _config(tmp_path, budgets=[0.25, 1], proxy_fraction=0.5)
    with pytest.raises(DemixError, match=r"0.25x .* buys 1 trained proxies"):
        decision.budget_plan(config.decision, config.train, config.search, datasets=3)
    assert decision.proxies_bought(999, 250) == 3
    with pytest.raises(DemixError):
        decision.proxies_bought(1000, 0)


def _surface(weights: np.ndarray, optimum: np.ndarray) -> np.ndarray:
    """A concave quadratic on the simplex with its maximum at `optimum`."""
    return -((weights - optimum) ** 2).sum(axis=1)


def _scored(rng, optimum, n=40):
    X = rng.dirichlet(np.ones(3), size=n)
    return X, _surface(X, optimum)[:, None]


def test_the_quadratic_fit_recovers_an_interior_optimum_the_linear_one_cannot():
    optimum = np.array([0.5, 0.3, 0.2])
    X, y = _scored(np.random.default_rng(0), optimum)
    cfg = SearchConfig(candidates=20_000, top_k=16)
    prior = np.array([0.4, 0.35, 0.25])
    first = np.asarray  # one target column: its values are the objective

    def combine(p):
        return first(p)[:, 0]

    quadratic, info = fit_selection(prior, X, y, cfg, 0, "quadratic", combine)
    assert np.abs(quadratic - optimum).sum() < 0.05
    assert info["kind"] == "quadratic" and info["predicted_score"] == pytest.approx(0, abs=0.01)
    linear, _ = fit_selection(prior, X, y, cfg, 0, "linear", combine)
    assert np.abs(linear - optimum).sum() > 0.2  # a plane's optimum is at the boundary
    assert linear.sum() == pytest.approx(1.0) and quadratic.sum() == pytest.approx(1.0)
    # same inputs, same choice
    again, _ = fit_selection(prior, X, y, cfg, 0, "quadratic", combine)
    np.testing.assert_array_equal(again, quadratic)
    with pytest.raises(ValueError, match="cubic"):
        fit_selection(prior, X, y, cfg, 0, "cubic", combine)


def _finals(shifts: dict[str, float], seeds: int = 2, docs: int = 60) -> dict[str, list[dict]]:
    """Constructed final results: every label scores the token prior's documents plus its
    shift (higher is better) with a little per-document noise of its own."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(seeds, len(TASKS), docs))
    out = {}
    for label, shift in {decision.BASELINE: 0.0, **shifts}.items():
        noise = 0.05 * rng.normal(size=base.shape) if label != decision.BASELINE else 0
        values = base + shift + noise
        out[label] = [
            {
                task: {"higher_is_better": True, "per_doc": values[s, t].tolist()}
                for t, task in enumerate(TASKS)
            }
            for s in range(seeds)
        ]
    return out


def _choices():
    return {
        "1x": {"merged 21": "m-good", "regmix": "m-flat", "linear fit": "m-bad"},
        "2x": {"merged 21": "m-good", "regmix": "m-best", "linear fit": "m-flat"},
    }


def _details(mixtures: dict[str, dict[str, float]]):
    return {
        "1x": {
            "merged 21": {"tokens": 1200, "proxies": 21, "mixture": mixtures["good"]},
            "regmix": {"tokens": 1200, "proxies": 24, "mixture": mixtures["flat"]},
            "linear fit": {"tokens": 1200, "proxies": 24, "mixture": mixtures["bad"]},
        },
        "2x": {
            "merged 21": {"tokens": 2400, "proxies": 21, "mixture": mixtures["good"]},
            "regmix": {"tokens": 2400, "proxies": 48, "mixture": mixtures["best"]},
            "linear fit": {"tokens": 2400, "proxies": 48, "mixture": mixtures["flat"]},
        },
    }


MIXTURES = {
    "good": {"a": 0.5, "b": 0.5},
    "flat": {"a": 0.6, "b": 0.4},
    "bad": {"a": 1.0, "b": 0.0},
    "best": {"a": 0.4, "b": 0.6},
}


def test_seed_rows_judge_each_choice_against_the_prior_the_best_and_its_budget(tmp_path):
    config = parse_config(smoke_config_dict(tmp_path))
    finals = _finals({"m-good": 0.5, "m-flat": 0.0, "m-bad": -0.5, "m-best": 1.0})
    seed = decision.seed_rows(config.evaluate, config.seed, _choices(), finals, _details(MIXTURES))
    assert seed["best"] == "m-best"
    rows = {(r["budget"], r["method"]): r for r in seed["rows"]}
    assert len(rows) == 6
    verdicts = {k: r["vs_token_prior"]["verdict"] for k, r in rows.items()}
    assert verdicts[("1x", "merged 21")] == verdicts[("2x", "merged 21")] == "better"
    assert verdicts[("1x", "linear fit")] == "worse"
    assert verdicts[("1x", "regmix")] == verdicts[("2x", "linear fit")] == "inconclusive"
    # the same final, judged once: the same entry at both budgets
    assert (
        rows[("1x", "merged 21")]["vs_token_prior"] == rows[("2x", "merged 21")]["vs_token_prior"]
    )
    # regret: how far the final most ahead of this one leads; none for the best itself
    assert rows[("2x", "regmix")]["regret"] is None
    assert rows[("1x", "linear fit")]["regret"]["verdict"] == "better"
    assert (
        rows[("1x", "linear fit")]["regret"]["diff"]
        > rows[("1x", "merged 21")]["regret"]["diff"]
        > 0
    )
    # method against method within a budget (row minus column)
    assert rows[("1x", "merged 21")]["vs_methods"]["linear fit"]["verdict"] == "better"
    assert rows[("2x", "merged 21")]["vs_methods"]["regmix"]["verdict"] == "worse"
    # the budget accounting rides along
    assert rows[("2x", "regmix")]["proxies"] == 48 and rows[("2x", "regmix")]["tokens"] == 2400


def test_no_choice_beats_the_prior_so_the_prior_is_the_best(tmp_path):
    config = parse_config(smoke_config_dict(tmp_path))
    finals = _finals({"m-good": -0.5, "m-flat": -1.0, "m-bad": -1.5})
    choices = {"1x": {"merged 21": "m-good", "regmix": "m-flat", "linear fit": "m-bad"}}
    seed = decision.seed_rows(config.evaluate, config.seed, choices, finals)
    assert seed["best"] == decision.BASELINE
    assert all(r["regret"]["verdict"] == "better" for r in seed["rows"])


def test_regret_takes_every_pairing_where_standardised_differences_are_not_transitive(tmp_path):
    # A: a small, clean gain on one task and a small, clean loss on the other; Q: a larger gain
    # on the second task, buried in noise. Against the prior A leads by far (clean differences
    # give large z-scores), yet paired with A, Q is ahead: the differences are not transitive,
    # and a regret taken from "the best by its distance from the prior" would be below zero.
    config = parse_config(smoke_config_dict(tmp_path))
    tasks, docs = TASKS[:2], 240
    rng = np.random.default_rng(3)
    base = rng.normal(size=(2, len(tasks), docs))
    shifts = {decision.BASELINE: (0.0, 0.0), "m-a": (0.1, -0.05), "m-q": (0.0, 0.3)}
    noise = {decision.BASELINE: 0.0, "m-a": 0.01, "m-q": 1.0}
    finals = {
        label: [
            {
                task: {
                    "higher_is_better": True,
                    "per_doc": (
                        base[s, t] + shift[t] + noise[label] * rng.normal(size=docs)
                    ).tolist(),
                }
                for t, task in enumerate(tasks)
            }
            for s in range(2)
        ]
        for label, shift in shifts.items()
    }
    evaluate = config.evaluate.model_copy(update={"categories": {"all": list(tasks)}})
    choices = {"1x": {"merged 21": "m-a", "regmix": "m-q"}}
    seed = decision.seed_rows(evaluate, config.seed, choices, finals)
    rows = {r["method"]: r for r in seed["rows"]}
    a, q = rows["merged 21"], rows["regmix"]
    assert a["vs_token_prior"]["diff"] > q["vs_token_prior"]["diff"] > 0
    assert a["vs_methods"]["regmix"]["diff"] < 0  # yet paired, Q is ahead of A
    assert seed["best"] == "m-q" and q["regret"] is None
    assert a["regret"]["rival"] == "m-q"
    assert a["regret"]["diff"] == pytest.approx(-a["vs_methods"]["regmix"]["diff"])
    assert all(r["regret"] is None or r["regret"]["diff"] > 0 for r in seed["rows"])


def test_table_rows_over_protocol_seeds_and_the_markdown(tmp_path):
    config = parse_config(smoke_config_dict(tmp_path))
    finals = _finals({"m-good": 0.5, "m-flat": 0.0, "m-bad": -0.5, "m-best": 1.0})
    first = decision.seed_rows(config.evaluate, config.seed, _choices(), finals, _details(MIXTURES))
    moved = dict(MIXTURES, good={"a": 0.45, "b": 0.55})
    second = decision.seed_rows(config.evaluate, 1, _choices(), finals, _details(moved))
    per_seed = [{"seed": 0, **first}, {"seed": 1, **second}]
    table = decision.table_rows(per_seed)
    assert [(r["budget"], r["method"]) for r in table] == [
        (r["budget"], r["method"]) for r in first["rows"]
    ]
    merged = table[0]
    assert merged["seeds"] == 2 and merged["verdicts"] == ["better", "better"]
    assert merged["l1_between_seeds"] == pytest.approx(0.1)
    low, high = merged["vs_token_prior"]["ci_low"], merged["vs_token_prior"]["ci_high"]
    assert low < merged["vs_token_prior"]["mean"] < high
    best = next(r for r in table if r["budget"] == "2x" and r["method"] == "regmix")
    assert best["regret"]["mean"] == 0 and best["regret_verdicts"] == ["best", "best"]
    text = format_decision({"datasets": ["a", "b"], "table": table, "per_seed": per_seed})
    line = next(x for x in text.splitlines() if x.startswith("| 1x | linear fit |"))
    assert "| 1,200 | 24 |" in line and "worse, worse" in line and "> 0, > 0" in line
    assert "best final: 2x regmix):" in text and "row − column" in text
    versus = decision.merged_versus_trained(per_seed)
    assert [(v["budget"], v["method"]) for v in versus] == [
        ("1x", "merged 21"),
        ("2x", "merged 21"),
    ]
    verdicts = {
        (v["budget"], m): [e["verdict"] for e in entries]
        for v in versus
        for m, entries in v["versus"].items()
    }
    assert verdicts == {
        ("1x", "regmix"): ["better", "better"],
        ("1x", "linear fit"): ["better", "better"],
        ("2x", "regmix"): ["worse", "worse"],
        ("2x", "linear fit"): ["better", "better"],
    }
    # the main table's row, then the merged-versus-trained row
    line = [x for x in text.splitlines() if x.startswith("| 2x | merged 21 |")][1]
    assert "worse; " in line and line.count("better") == 2


def test_the_shipped_decision_config_validates_and_opens_with_its_command():
    path = ROOT / "configs" / "reproduce-decision.yaml"
    config = load_config(path)
    assert path.read_text().startswith("# Run with:  make reproduce-decision")
    assert config.decision.budgets == [1.0, 2.0, 4.0]
    assert config.decision.merged_proxies == [21, 200] and config.decision.seeds == 3
    assert config.final.seeds == 3 and config.merge.weights == "component"
    plan = decision.budget_plan(
        config.decision, config.train, config.search, len(config.data.datasets)
    )
    assert all(p["proxies"] >= 4 for p in plan)


@pytest.mark.slow
def test_reproduce_decision_end_to_end_and_resumed(tmp_path, corpus_dir, monkeypatch, capsys):
    raw = smoke_config_dict(corpus_dir)
    raw["final"] = {"seeds": 2}
    raw["decision"] = {
        "budgets": [1, 2],
        "merged_proxies": [6, 9],
        "proxy_fraction": 0.5,
        "candidates": 500,
        "top_k": 8,
        "seeds": 1,
    }
    config = tmp_path / "decision.yaml"
    config.write_text(yaml.safe_dump(raw))
    argv = ["reproduce-decision", str(config), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    out = tmp_path / "out"
    printed = capsys.readouterr().out
    result = json.loads((out / "decision.json").read_text())
    assert (out / "decision.md").read_text() in printed
    methods = ["merged 6", "merged 9", "regmix", "linear fit", "quadratic fit"]
    assert [(r["budget"], r["method"]) for r in result["table"]] == [
        (b, m) for b in ("1x", "2x") for m in methods
    ]
    (seed,) = result["per_seed"]
    rows = {(r["budget"], r["method"]): r for r in seed["rows"]}
    # 3 components x 4,000 tokens x budget (whole steps of 256 tokens); trained proxies of
    # 2,000 tokens: 12,000 and 24,000 tokens buy 6 and 12
    assert rows[("1x", "merged 6")]["tokens"] == 3 * 4096
    assert rows[("2x", "merged 9")]["tokens"] == 3 * 8192
    assert rows[("1x", "regmix")]["proxies"] == 6 and rows[("2x", "regmix")]["proxies"] == 12
    assert rows[("1x", "regmix")]["tokens"] == 6 * 2048
    assert rows[("1x", "quadratic fit")]["proxies"] == 6
    assert rows[("1x", "merged 9")]["proxies"] == 9  # n = 6 in 2 rounds: 6 + 3
    for row in seed["rows"]:
        assert row["vs_token_prior"]["verdict"] in {"better", "worse", "inconclusive"}
        assert sum(row["mixture"].values()) == pytest.approx(1.0)
    finals = [p for p in (out / "finals").iterdir() if p.is_dir() and p.suffix != ".ckpt"]
    distinct = {r["final"] for r in seed["rows"]} | {decision.BASELINE}
    assert len(finals) == 2 * len(distinct)  # one model per distinct mixture and seed
    assert seed["final_tokens"] == len(finals) * 4096

    # resumed: nothing is trained or evaluated again
    class NoEvaluation:
        def evaluate(self, model):
            raise AssertionError("a kept evaluation ran again")

    # the evaluator the recipe loads (demix.stages.run_evaluator)
    monkeypatch.setattr("demix.proxies.make_evaluator", lambda *a, **k: NoEvaluation())
    assert main(argv) == 0
    again = json.loads((out / "decision.json").read_text())
    assert again["table"] == result["table"]


def test_each_finished_protocol_seed_is_written_before_the_next_runs(tmp_path, monkeypatch):
    """A run of hours shows what it has: after seed 0, decision.json and decision.md hold its
    table, marked provisional (1 of 2); a second seed that fails leaves them as they were."""
    from types import SimpleNamespace

    import demix.recipes.decision as recipe
    from demix.stages.values import Run

    config = _config(tmp_path, seeds=2)
    finals = _finals({"m-good": 0.5, "m-flat": 0.0, "m-bad": -0.5, "m-best": 1.0})
    seed = decision.seed_rows(config.evaluate, config.seed, _choices(), finals, _details(MIXTURES))
    data = SimpleNamespace(names=["a", "b"])
    calls = []

    def one_seed(run, folder, evaluator, timed):
        calls.append(run.config.seed)
        if len(calls) == 2:
            assert "Provisional: 1 of 2" in (tmp_path / "out" / "decision.md").read_text()
            raise KeyboardInterrupt  # the run stopped during seed 1
        return {"seed": run.config.seed, **seed}

    monkeypatch.setattr(recipe, "prepare_models", lambda c, o, t, components: Run(c, data, o))
    monkeypatch.setattr(recipe, "run_evaluator", lambda c, d: None)
    monkeypatch.setattr(recipe, "decision_seed", one_seed)
    with pytest.raises(KeyboardInterrupt):
        recipe.reproduce_decision(config, tmp_path / "out")
    assert calls == [config.seed, config.seed + 1]
    kept = json.loads((tmp_path / "out" / "decision.json").read_text())
    assert kept["seeds_planned"] == 2 and [s["seed"] for s in kept["per_seed"]] == [config.seed]
    assert kept["table"] == decision.table_rows([{"seed": config.seed, **seed}])
    text = (tmp_path / "out" / "decision.md").read_text()
    assert "**Provisional: 1 of 2 protocol seeds finished**" in text
    assert "| 1x | merged 21 |" in text
    # all seeds finished: the same table, no longer provisional
    calls.clear()
    monkeypatch.setattr(recipe, "decision_seed", lambda r, f, e, t: {"seed": r.config.seed, **seed})
    result = recipe.reproduce_decision(config, tmp_path / "out")
    assert result["seeds_planned"] == 2 and len(result["per_seed"]) == 2
    assert "Provisional" not in (tmp_path / "out" / "decision.md").read_text()
