"""Fidelity against the branch point and the control, and the soup bonus, on constructed score
tables: the numbers the references' improvements, improvement-CRR and merging's bonus must be."""

from __future__ import annotations

import numpy as np
import pytest

from demix.improvement import against_anchors, improvements, soup_bonus
from demix.report.anchors import anchor_lines

DOCS = 60


def _result(docs: dict[str, np.ndarray]) -> dict:
    """An evaluation result of loss tasks (lower is better) with per-document losses."""
    return {
        task: {"value": float(v.mean()), "higher_is_better": False, "per_doc": v.tolist()}
        for task, v in docs.items()
    }


@pytest.fixture
def tables():
    """Branch point at loss 3, control 2.8 (the anneal alone), references at 2.6 - 0.1 k on
    `own` and 2.7 on `other`; each proxy 0.05 below its reference on `own` (a soup bonus),
    0.05 above it on `other`. Per-document noise is shared by every model (paired)."""
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.05, DOCS)
    base = {"own": 3.0 + noise, "other": 3.0 + noise}
    control = {"own": 2.8 + noise, "other": 2.8 + noise}
    references = [{"own": 2.6 - 0.1 * k + noise, "other": 2.7 + noise} for k in range(4)]
    proxies = [{"own": r["own"] - 0.05, "other": r["other"] + 0.05} for r in references]
    return (
        _result(base),
        _result(control),
        [_result(r) for r in references],
        [_result(p) for p in proxies],
    )


def test_references_improve_on_each_anchor_by_their_paired_difference(tables):
    base, control, references, _ = tables
    on_base = improvements(references, base, ["own", "other"], ["a", "b", "c", "d"])
    on_control = improvements(references, control, ["own", "other"])
    # oriented: a loss 0.55 lower on average is +0.55
    assert on_base["own"]["mean"]["diff"] == pytest.approx(3.0 - 2.45)
    assert on_control["own"]["mean"]["diff"] == pytest.approx(2.8 - 2.45)
    assert on_control["other"]["mean"]["diff"] == pytest.approx(0.1)
    assert on_base["own"]["mean"]["verdict"] == "better"
    first = on_base["own"]["models"][0]
    assert first["label"] == "a" and first["diff"] == pytest.approx(0.4)
    # noise shared by the models cancels in the pairing: every paired stderr is ~0
    assert first["stderr"] < 1e-9 and on_control["own"]["beyond"] == 4


def test_an_effect_within_the_noise_is_not_counted_beyond_four_stderrs():
    rng = np.random.default_rng(1)
    anchor = _result({"t": rng.normal(3, 1, DOCS)})
    model = _result({"t": np.asarray(anchor["t"]["per_doc"]) + rng.normal(-0.01, 0.5, DOCS)})
    entry = improvements([model], anchor, ["t"])["t"]
    assert entry["beyond"] == 0 and abs(entry["models"][0]["z"]) < 4
    assert entry["mean"]["verdict"] == "inconclusive"


def test_soup_bonus_is_merged_minus_trained_at_the_same_mixture(tables):
    _, _, references, proxies = tables
    bonus = soup_bonus(proxies, references, ["own", "other"])
    assert bonus["own"]["diff"] == pytest.approx(0.05) and bonus["own"]["verdict"] == "better"
    assert bonus["other"]["diff"] == pytest.approx(-0.05) and bonus["other"]["verdict"] == "worse"


def test_improvement_crr_against_the_control_does_not_count_the_anneal(tables):
    base, control, references, proxies = tables
    categories = {"own": ["own"], "other": ["other"]}
    out = against_anchors(
        proxies, references, categories, {"branch_point": base, "control": control}
    )
    crr = {name: out["crr"][name]["crr"] for name in ("branch_point", "control")}
    # own: proxies at 2.40 on average, references 2.45
    assert crr["branch_point"]["own"] == pytest.approx((3.0 - 2.40) / (3.0 - 2.45))
    assert crr["control"]["own"] == pytest.approx((2.8 - 2.40) / (2.8 - 2.45))
    # other: proxies 2.75, references 2.70: most of the base's gap is the anneal
    assert crr["branch_point"]["other"] == pytest.approx(0.25 / 0.3)
    assert crr["control"]["other"] == pytest.approx(0.05 / 0.1)
    assert set(out["improvements"]) == {"branch_point", "control"}
    lines = "\n".join(anchor_lines(out))
    assert "| own | +0.550 [" in lines and "| 4/4 |" in lines
    assert "| other | 0.833 [" in lines


def test_own_domain_effect_is_the_vertex_reference_on_its_heldout_loss():
    """Two datasets: the vertex of `a` improves heldout:a by 0.3 on the control with per-document
    noise of its own; a reference with less weight on `a` improves it more but is not its vertex."""
    rng = np.random.default_rng(2)
    anchor = rng.normal(3, 0.2, DOCS)
    control = _result({"heldout:a": anchor, "heldout:b": anchor})
    vertex = _result({"heldout:a": anchor - 0.3 + rng.normal(0, 0.1, DOCS), "heldout:b": anchor})
    other = _result({"heldout:a": anchor - 0.5, "heldout:b": anchor + 0.01})
    weights = np.array([[1.0, 0.0], [0.5, 0.5]])
    proxies = [vertex, other]
    out = against_anchors(
        proxies,
        [vertex, other],
        {"a": ["heldout:a"], "b": ["heldout:b"]},
        {"branch_point": None, "control": control},
        ["vertex-a", "mid"],
        mixtures=(["a", "b"], weights),
    )
    own = out["own_domain"]["control"]
    assert own["a"]["label"] == "vertex-a" and own["a"]["weight"] == 1.0
    assert own["a"]["diff"] == pytest.approx(0.3, abs=0.05)
    assert own["a"]["z"] > 4 and own["a"]["beyond"]
    assert own["b"]["label"] == "mid" and not own["b"]["beyond"]  # no vertex of b: the most weight
    lines = "\n".join(anchor_lines(out))
    assert "| a | vertex-a | 1.000 | +0.3" in lines


def test_an_anchor_not_measured_is_left_out(tables):
    base, _, references, proxies = tables
    out = against_anchors(
        proxies, references, {"own": ["own"]}, {"branch_point": base, "control": None}
    )
    assert list(out["improvements"]) == list(out["crr"]) == ["branch_point"]
    assert "vs control" not in "\n".join(anchor_lines(out))
