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


def test_any_hf_causal_lm_folder_can_be_the_base(smoke_run, tmp_path, corpus_dir, eval_dir):
    """A base given as an HF folder (here a GPT-2 built from config) is used as is: its tokenizer
    curates the data and no base is pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, first = smoke_run
    from demix.data.shards import CuratedData

    tokenizer = CuratedData(first / "dataset").load_tokenizer()
    base = tmp_path / "gpt2-tiny"
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    raw = smoke_config_dict(corpus_dir, eval_dir)
    raw["model"] = {"base": str(base), "attn_implementation": None}
    raw["train"].pop("base")
    path = tmp_path / "hf-base.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["training_tokens"]["base"] == 0
    assert not (tmp_path / "out" / "models" / "base").exists()
    assert sum(summary["mixture"].values()) == pytest.approx(1.0, abs=1e-5)
