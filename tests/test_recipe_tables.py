"""The tables `demix reproduce` and `demix scaling` print, from constructed
results: one row per N sorted by N, a missing run refused in one line, and what a run did not
measure shown as "-" rather than NaN."""

from __future__ import annotations

import json

import pytest

from demix.cli import main as demix_main
from demix.fidelity import AGGREGATE
from demix.report.reproduce import _seed_lines
from demix.report.scaling import is_scaling_table

NAN = float("nan")


def _comparison(diff: float, verdict: str) -> dict:
    return {"diff": diff, "ci_low": diff - 0.5, "ci_high": diff + 0.5, "verdict": verdict}


def _result(names: list[str], macro: float, aggregate: float, tokens: int) -> dict:
    """The fields of reproduce.json the tables read, for one seed."""
    objective = {
        "token_prior": {"objective": _comparison(-1.25, "worse")},
        "uniform": {"objective": _comparison(0.5, "inconclusive")},
    }
    fidelity = {
        "n": 20 + len(names) + 1,
        "macro": {
            "proxy": {"rho": macro, "rho_ci": [macro - 0.1, macro + 0.1]},
            "proxy_minus": {"trivial_linear": _comparison(-0.25, "inconclusive")},
        },
        "categories": {
            AGGREGATE: {
                "proxy": {"rho": aggregate, "rho_ci": [aggregate - 0.2, 1.0], "regret": 0.125},
                "proxy_minus": {"trivial_linear": _comparison(0.25, "inconclusive")},
            }
        },
        "crr": {"mean": NAN},
        "crr_ci": {"mean": [NAN, NAN]},
    }
    mixture = {n: 1 / len(names) for n in names}
    return {
        "datasets": names,
        "mixtures": {"chosen_merge": mixture},
        "timings_s": {"base": 1000.0, "components/0": 150.25, "search_merge/0": 200.0},
        "fidelity": fidelity,
        "verdicts": {"chosen_merge": objective},
        "searches": {"merge": {"training_tokens": tokens}},
        "per_seed": [
            {
                "seed": 0,
                "fidelity": fidelity,
                "mixtures": {"chosen_merge": mixture},
                "verdicts": {"chosen_merge": {b: objective[b] for b in objective}},
            }
        ],
        "headline": {
            "seeds": 1,
            "macro_rho": {"mean": macro, "ci_low": macro - 0.1, "ci_high": macro + 0.1},
            "aggregate_rho": {"mean": aggregate, "ci_low": 0.0, "ci_high": 1.0},
            "reference_retest_rho": {"mean": NAN, "ci_low": NAN, "ci_high": NAN},
            "crr_improvement": {"mean": NAN, "ci_low": NAN, "ci_high": NAN},
            "search_l1_between_seeds": NAN,
        },
    }


def _write(folder, result: dict, files: dict[str, list[str]] | None = None):
    """A finished run: reproduce.json and the config.json that names each candidate's files
    (`files`: name -> paths; by default each candidate reads data/<name>.jsonl)."""
    folder.mkdir()
    (folder / "reproduce.json").write_text(json.dumps(result))
    files = files or {n: [f"data/{n}.jsonl"] for n in result["datasets"]}
    datasets = [{"name": n, "paths": files[n]} for n in result["datasets"]]
    (folder / "config.json").write_text(json.dumps({"data": {"datasets": datasets}}))
    return folder


def test_scaling_table_has_one_row_per_run_sorted_by_n(tmp_path, capsys):
    """Rows by N; the chosen mixtures compared on the files they split: 9 candidates over the
    three files (3 each, uniform) against the 3-candidate mixture, 9 candidates over other
    files not comparable ("-")."""
    split = {f"d{i}": [f"data/{('general', 'code', 'math')[i % 3]}.jsonl"] for i in range(9)}
    nine = _write(tmp_path / "n9", _result(list(split), 0.25, 0.5, 3_600_000), split)
    three = _write(tmp_path / "n3", _result(["general", "code", "math"], 0.375, 0.625, 1_200_000))
    other = _write(tmp_path / "other", _result(list(split), 0.25, 0.5, 1))
    # the 3-candidate run chose general 0.5, code 0.25, math 0.25: L1 1/3 from uniform
    result = json.loads((three / "reproduce.json").read_text())
    result["mixtures"]["chosen_merge"] = {"general": 0.5, "code": 0.25, "math": 0.25}
    (three / "reproduce.json").write_text(json.dumps(result))
    out = tmp_path / "scaling.md"
    assert demix_main(["scaling", str(nine), str(three), str(other), "--out", str(out)]) == 0
    table = out.read_text()
    assert table == capsys.readouterr().out
    header, rule, first, *nines = table.strip().split("\n")
    assert header.startswith("| N | run | references | macro rho")
    assert first.startswith("| 3 | n3 | 24 | 0.375 [0.275, 0.475] | 0.625 [0.425, 1.000] | 0.125 |")
    assert (
        "| -0.250 [-0.750, +0.250] inconclusive | +0.250 [-0.250, +0.750] inconclusive |" in first
    )
    assert "| -1.250 [-1.750, -0.750] worse | +0.500 [+0.000, +1.000] inconclusive |" in first
    assert "| code 0.250, general 0.500, math 0.250 | 0.000 | 1,200,000 | 350 |" in first
    second = next(r for r in nines if "| n9 |" in r)
    assert second.startswith("| 9 | n9 | 30 | 0.250 [0.150, 0.350] | 0.500 [0.300, 1.000] |")
    assert "| code 0.333, general 0.333, math 0.333 | 0.333 | 3,600,000 |" in second
    assert "| - | 1 | 350 |" in next(r for r in nines if "| other |" in r)


def test_scaling_out_replaces_only_an_earlier_scaling_table(tmp_path, capsys):
    """--out follows the output rule: an earlier table is replaced, a user's file (a Markdown
    table under another header among them) is refused in one line and kept as it was."""
    run = _write(tmp_path / "n3", _result(["general", "code", "math"], 0.4, 0.6, 1))
    out = tmp_path / "scaling.md"
    for _ in range(2):  # the second writes over the first
        assert demix_main(["scaling", str(run), "--out", str(out)]) == 0
        assert is_scaling_table(out.read_bytes())
    capsys.readouterr()
    theirs = {
        "notes.md": "my notes\n",
        "table.md": "| N | run |\n|---|---|\n| 3 | n3 |\n",
        "longer.md": out.read_text() + "\nmy conclusions\n",
    }
    for name, text in theirs.items():
        (tmp_path / name).write_text(text)
        assert not is_scaling_table(text.encode())
        assert demix_main(["scaling", str(run), "--out", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert len([line for line in err.splitlines() if line.startswith("demix:")]) == 1, err
        assert "not a file demix wrote" in err
        assert (tmp_path / name).read_text() == text
    assert demix_main(["scaling", str(run), "--out", str(run / "reproduce.json")]) == 2
    assert json.loads((run / "reproduce.json").read_text())["datasets"] == [
        "general",
        "code",
        "math",
    ]


def test_scaling_refuses_a_run_that_has_not_finished(tmp_path, capsys):
    done = _write(tmp_path / "n3", _result(["general", "code", "math"], 0.4, 0.6, 1))
    (tmp_path / "n6").mkdir()  # started, no reproduce.json yet
    argv = ["scaling", str(done), str(tmp_path / "n6"), "--out", str(tmp_path / "t.md")]
    assert demix_main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "n6/reproduce.json: not found; run demix reproduce into" in err
    assert not (tmp_path / "t.md").exists()


@pytest.mark.parametrize("seeds", [1, 2])
def test_the_seed_table_shows_what_was_not_measured_as_a_dash(seeds):
    result = _result(["general", "code", "math"], 0.4, 0.6, 1)
    if seeds == 2:
        second = dict(result["per_seed"][0], seed=1)
        second["fidelity"] = dict(
            second["fidelity"],
            reliability={"categories": {AGGREGATE: {"retest": {"rho": 0.9, "rho_ci": [0.8, 1.0]}}}},
        )
        result["per_seed"].append(second)
        result["headline"].update(
            seeds=2,
            search_l1_between_seeds=0.25,
            reference_retest_rho={"mean": 0.9, "ci_low": 0.8, "ci_high": 1.0},
        )
    mean = next(line for line in _seed_lines(result) if line.startswith("| mean [95%] |"))
    cells = [c.strip() for c in mean.strip("|").split("|")]
    assert cells[1:3] == ["0.400 [0.300, 0.500]", "0.600 [0.000, 1.000]"]
    if seeds == 1:
        assert cells[3] == "-" and cells[9] == "L1 between seeds: - (one seed)"
    else:
        assert cells[3] == "0.900 [0.800, 1.000]" and cells[9] == "L1 between seeds 0.250"
    assert cells[6:9] == ["-", "-", "-"]  # proxy minus each fit over seeds: not in this result
    assert cells[4] == "nan [nan, nan]"  # CRR: measured and undefined, not missing
    assert cells[5] == "-"  # CRR against the control: no control in these runs


def test_a_fidelity_only_seed_shows_its_paired_macro_and_no_decision():
    """fidelity.finals false: no chosen mixture, no verdicts; the macro rho minus each
    weights-only predictor is in the seed's row and, over seeds, in the mean row."""
    result = _result(["general", "code", "math"], 0.4, 0.6, 1)
    seed = result["per_seed"][0]
    seed.update(mixtures={}, verdicts={})
    seed["fidelity"]["macro"]["proxy_minus"]["trivial_quadratic"] = _comparison(0.75, "better")
    result["headline"]["macro_minus"] = {
        "trivial_quadratic": {"mean": 0.75, "ci_low": 0.25, "ci_high": 1.25}
    }
    lines = _seed_lines(result)
    row = next(line for line in lines if line.startswith("| 0 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[6:9] == [
        "-0.250 [-0.750, +0.250] inconclusive",
        "+0.750 [+0.250, +1.250] better",
        "-",
    ]
    assert cells[9:] == ["-", "-", "-"]
    mean = next(line for line in lines if line.startswith("| mean [95%] |"))
    assert "0.750 [0.250, 1.250]" in mean
