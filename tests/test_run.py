"""End to end: `demix run` on a smoke config writes the summary contract and the report."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from demix.cli import main

from .conftest import smoke_config_dict

CATEGORIES = {"general", "math", "code"}


def _as_other_formats(corpus_dir, root) -> dict[str, str]:
    """The smoke corpus as a team's shards would come: general as a Parquet folder, code as a
    .jsonl.zst file, math as a folder saved by `datasets` (each written by its own library)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = {
        name: [json.loads(line)["text"] for line in (corpus_dir / f"{name}.jsonl").open()]
        for name in ("general", "code", "math")
    }
    (root / "general").mkdir()
    for part, start in enumerate(range(0, len(texts["general"]), 100)):
        chunk = pa.table({"text": texts["general"][start : start + 100]})
        pq.write_table(chunk, root / "general" / f"part-{part}.parquet", row_group_size=32)
    jsonl = "".join(json.dumps({"text": t}) + "\n" for t in texts["code"]).encode()
    (root / "code.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    datasets.Dataset.from_dict({"text": texts["math"]}).save_to_disk(
        str(root / "math"), num_shards=2
    )
    return {"general": "general", "code": "code.jsonl.zst", "math": "math"}


@pytest.fixture(scope="module")
def smoke_run(corpus_dir, eval_dir, tmp_path_factory):
    """`demix run` of the smoke config, its candidates in Parquet, zstd JSONL and `datasets`."""
    root = tmp_path_factory.mktemp("run")
    raw = smoke_config_dict(corpus_dir, eval_dir)
    formats = _as_other_formats(corpus_dir, root)
    for spec in raw["data"]["datasets"]:
        spec["paths"] = [str(root / formats[spec["name"]])]
    config = root / "smoke.yaml"
    config.write_text(yaml.safe_dump(raw))
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
        assert "ranking_score" not in result and result["seeds"] == 1
        assert {"heldout:general", "basic_skills_arithmetic", "math500_bpb"} <= set(result["tasks"])
        for task in result["tasks"].values():
            assert task["stderr"] >= 0 and task["per_seed"] == [task["value"]]
    assert summary["predictor"] == {"kind": "lightgbm", "why": "search.predictor.kind"}
    assert set(summary["verdict"]) == {"uniform", "token_prior"}
    for entries in summary["verdict"].values():
        assert set(entries) == CATEGORIES | {"objective", "tasks"}
        for entry in [entries["objective"], *entries["tasks"].values()]:
            assert entry["ci_low"] <= entry["diff"] <= entry["ci_high"]
            assert entry["verdict"] in ("better", "worse", "inconclusive")
    per_doc = json.loads((out / "final_scores.json").read_text())
    assert set(per_doc) == {"chosen", "uniform", "token_prior"} and len(per_doc["chosen"]) == 1
    assert all(len(v) > 1 for v in per_doc["chosen"][0].values())
    tokens = summary["training_tokens"]
    assert tokens["base"] > 0 and tokens["components"] == 3 * 4096 and tokens["final"] == 3 * 4096
    assert set(summary["timings_s"]) == {"curate", "base", "components", "search", "final"}
    rows = (out / "search" / "scores.jsonl").read_text().splitlines()
    assert len(rows) == summary["proxies_evaluated"]
    report = (out / "report.html").read_text()
    assert "Chosen mixture" in report
    # the four plots of the search and verdict, and a loss-curve plot per training role
    assert report.count("<img") == 4 + 3
    for role in ("base", "component", "final"):
        assert f'<img alt="training loss: {role}" src="data:image/png;base64,' in report
    assert (out / "models" / "base" / "tensorboard" / "events.out.tfevents.demix").is_file()


def test_export_of_the_finished_run(smoke_run, capsys):
    """`demix export` of the run: the summary's mixture, the curated train tokens and the final
    budget of the run's config (see tests/test_export.py for each format parsed back)."""
    _, out = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    manifest = json.loads((out / "dataset" / "manifest.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert main(["export", str(out), "--format", "json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["mixture"] == summary["mixture"] and found["datasets"] == summary["datasets"]
    train = {n: d["train_tokens"] for n, d in manifest["datasets"].items()}
    assert found["train_tokens"] == summary["dataset_train_tokens"] == train
    assert found["final_tokens"] == summary["final_tokens"] == config["train"]["final"]["tokens"]
    assert main(["export", str(out), "--format", "megatron"]) == 0
    pairs = capsys.readouterr().out.split()
    assert pairs[1::2] == [n for n in summary["datasets"] if summary["mixture"][n] > 0]
    assert main(["export", str(out), "--format", "olmo"]) == 0
    sources = yaml.safe_load(capsys.readouterr().out)["sources"]
    assert [s["source_name"] for s in sources] == pairs[1::2]
    assert main(["export", str(out), "--format", "hf"]) == 0
    hf = json.loads(capsys.readouterr().out)
    assert hf["probabilities"] == pytest.approx([float(w) for w in pairs[0::2]])


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


def test_a_search_resumed_with_other_evaluation_settings_is_refused(smoke_run, capsys):
    """Scores rows carry what they were scored with; a rerun in the same folder with other
    evaluation settings must not mix old and new scores."""
    config, out = smoke_run
    scores = out / "search" / "scores.jsonl"
    before = scores.read_text()
    rows = [json.loads(line) for line in before.splitlines()]
    assert len({row["scored_with"] for row in rows}) == 1
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(out), "--set", "evaluate.limit=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("demix: error: ") and "scored with other evaluation" in err[-1]
    assert scores.read_text() == before


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


def test_the_search_builds_proxies_with_the_configured_merge_method(smoke_run, tmp_path):
    """`merge.method` and its parameters reach the search's in-memory proxies: a proxy equals
    `demix merge` of the same mixture with the same config."""
    from demix.config import load_config
    from demix.data.shards import CuratedData
    from demix.model import load_model
    from demix.stages.proxies import ProxyEvaluator

    config_path, out = smoke_run
    overrides = {"merge.method": "dare_linear", "merge.drop_rate": 0.3, "merge.seed": 4}
    config = load_config(config_path, overrides)
    data = CuratedData(out / "dataset")
    models = out / "models"
    components = {name: models / f"component-{name}" for name in data.names}

    class Snapshot:
        """Evaluator stand-in that keeps a copy of the proxy's weights."""

        def evaluate(self, model):
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters()}
            return {}

    snapshot = Snapshot()
    proxies = ProxyEvaluator(config, data, models / "base", components, snapshot)
    assert proxies.stack.method.describe() == {
        "name": "dare_linear",
        "scale": 1.0,
        "drop_rate": 0.3,
        "seed": 4,
    }
    mixture = {"general": 0.5, "code": 0.3, "math": 0.2}
    proxies(np.array([mixture[n] for n in data.names]))
    argv = [
        "merge",
        str(config_path),
        "--data",
        str(out / "dataset"),
        "--base",
        str(models / "base"),
    ]
    argv += ["--mixture", json.dumps(mixture), "--out", str(tmp_path / "merged"), "--components"]
    argv += [f"{n}={p}" for n, p in components.items()]
    argv += [f"--set={key}={value}" for key, value in overrides.items()]
    assert main(argv) == 0
    merged = dict(load_model(tmp_path / "merged").named_parameters())
    for name, value in snapshot.weights.items():
        torch.testing.assert_close(value, merged[name].detach(), rtol=0, atol=1e-6)


def _run_parts(smoke_run):
    from demix.config import load_config
    from demix.data.shards import CuratedData

    config_path, out = smoke_run
    data = CuratedData(out / "dataset")
    models = out / "models"
    components = {name: models / f"component-{name}" for name in data.names}
    return config_path, load_config(config_path), data, models / "base", components


def test_the_training_based_search_runs_the_same_loop(smoke_run, tmp_path, capsys):
    """`search.method: trained` trains one proxy per mixture (component budget), needs no
    components, accounts its training tokens, and resumes without training again."""
    config_path, config, data, base, _ = _run_parts(smoke_run)
    argv = ["search", str(config_path), "--data", str(smoke_run[1] / "dataset")]
    argv += [
        "--base",
        str(base),
        "--out",
        str(tmp_path / "search"),
        "--set",
        "search.method=trained",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    result = json.loads((tmp_path / "search" / "result.json").read_text())
    proxies = sorted((tmp_path / "search" / "proxies").glob("proxy-*"))
    assert result["search_method"] == "trained"
    assert result["proxies_evaluated"] == len(proxies) == 4 + 2
    assert result["proxy_training_tokens"] == len(proxies) * 4096  # 4000 rounded up to whole steps
    assert result["relative_delta_norms"] is None
    assert sum(result["mixture"].values()) == pytest.approx(1.0, abs=1e-5)
    stamps = [p.stat().st_mtime_ns for p in proxies]
    assert main(argv) == 0  # resumed: nothing trained or evaluated again
    assert [p.stat().st_mtime_ns for p in proxies] == stamps
    assert (
        json.loads((tmp_path / "search" / "result.json").read_text())["mixture"]
        == result["mixture"]
    )
    # a proxy an earlier search left in the folder is not this search's cost
    shutil.copytree(proxies[0], proxies[0].with_name("proxy-m-000000000000"))
    assert main(argv) == 0
    again = json.loads((tmp_path / "search" / "result.json").read_text())
    assert again["proxy_training_tokens"] == result["proxy_training_tokens"]


@pytest.mark.slow
def test_validate_compares_proxies_with_trained_references(smoke_run, tmp_path, capsys):
    from demix.fidelity import AGGREGATE

    config_path, config, data, base, components = _run_parts(smoke_run)
    argv = ["validate", str(config_path), "--data", str(smoke_run[1] / "dataset")]
    argv += ["--base", str(base), "--out", str(tmp_path / "validate"), "--components"]
    argv += [f"{n}={p}" for n, p in components.items()]
    argv += ["--set", "fidelity.references=2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "rho proxy" in printed and "weights-only predictor" in printed
    result = json.loads((tmp_path / "validate" / "fidelity.json").read_text())
    # 2 sampled + 3 vertices + uniform (unless a sample hit one of them)
    assert 5 <= result["n"] == len(result["mixtures"]) <= 6
    assert {m["id"] for m in result["mixtures"]} == {
        p.name.removeprefix("reference-")
        for p in (tmp_path / "validate" / "references").iterdir()
        if p.is_dir()  # each model's evaluation is kept beside it (<name>.eval.json)
    }
    entry = result["categories"][AGGREGATE]
    assert {"proxy", "trivial_linear", "trivial_weight", "proxy_beats_trivial"} <= set(entry)
    assert -1.0 <= entry["proxy"]["rho"] <= 1.0 and entry["proxy"]["regret"] >= 0.0
    assert set(result["crr"]) == CATEGORIES | {"mean"}
    tokens = result["cost"]["reference_training_tokens"]
    assert tokens == result["n"] * 4096
    assert (tmp_path / "validate" / "fidelity.html").read_text().count("<img") == len(
        CATEGORIES
    ) + 1


@pytest.mark.slow
def test_reproduce_writes_one_table_of_every_step(
    tmp_path, corpus_dir, eval_dir, capsys, monkeypatch
):
    config = tmp_path / "smoke.yaml"
    config.write_text(yaml.safe_dump(smoke_config_dict(corpus_dir, eval_dir)))
    argv = ["reproduce", str(config), "--out", str(tmp_path / "out")]
    argv += [
        *("--set", "fidelity.references=3", "--set", "fidelity.replicates=3"),
        *("--set", "fidelity.sweep=[{tokens: 2048, lr: 0.005}]"),
        *("--set", "fidelity.budgets=[0.5]", "--set", "fidelity.seeds=2"),
        *("--set", "fidelity.ablations=[{method: dare_linear, weights: component}]"),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    result = json.loads((out / "reproduce.json").read_text())
    searches = result["searches"]
    assert searches["merge"]["proxies_evaluated"] == searches["trained"]["proxies_evaluated"] == 6
    # 6 trained proxies against 3 components of the same budget
    assert searches["token_ratio"] == pytest.approx(2.0)
    assert set(result["final"]) == {"chosen_merge", "chosen_trained", "uniform", "token_prior"}
    # the run's own components (the sweep's reference row), then the swept point
    assert [(p["tokens"], p["lr"]) for p in result["sweep"]] == [(4000, 5e-3), (2048, 5e-3)]
    assert set(result["timings_s"]) >= {
        "base",
        "search_merge/0",
        "search_trained/0",
        "validate/0",
        "validate/1",
        "sweep",
        "budgets",
        "ablations",
    }
    # references and replicates: the 3 sampled mixtures once more with the next seed, counted
    # apart (the weights-only fits are labelled with the references' tokens alone)
    fid = result["fidelity"]
    assert fid["weights_only_training_tokens"] == fid["n"] * 4096
    assert result["training_tokens"]["replicates"] == 2 * 3 * 4096  # two seeds
    assert fid["reliability"]["k"] == 3 and fid["n"] == 7
    assert len(list((out / "validate" / "references").glob("reference-*-seed1"))) == 3
    # the budget ladder: half the component budget, the merged proxies' tokens against it
    (rung,) = result["budgets"]
    assert rung["fraction"] == 0.5 and rung["tokens_per_proxy"] == pytest.approx(2048)
    matched = result["matched_fidelity"]
    assert matched["ratio"] == pytest.approx(6 * 2048 / (3 * 4096))
    assert [a["label"] for a in result["ablations"]] == ["dare_linear (component)"]
    # the second seed: its own components, search and references; the base is shared
    (second,) = [s for s in result["per_seed"] if s["seed"] != result["seed"]]
    assert second["seed"] == result["seed"] + 1
    assert (out / "seed-1" / "models" / "component-code").is_dir()
    assert not (out / "seed-1" / "models" / "base").exists()
    assert "chosen_trained" not in second["mixtures"] and not second["budgets"]
    head = result["headline"]
    assert head["seeds"] == 2 and len(head["verdicts"]["uniform"]) == 2
    assert set(head["verdicts"]["uniform"]) <= {"better", "worse", "inconclusive"}
    assert head["search_l1_between_seeds"] == pytest.approx(
        sum(
            abs(result["mixtures"]["chosen_merge"][k] - v)
            for k, v in second["mixtures"]["chosen_merge"].items()
        )
    )
    table = (out / "reproduce.md").read_text()
    assert table in printed
    assert (
        "| aggregate |" in table and "| chosen_trained |" in table and "| 2,048 | 0.005 |" in table
    )
    assert "test-retest" in table and "Matched fidelity" in table and "dare_linear" in table
    assert "| mean [95%] |" in table
    # resumed: the sweep's and the ablations' merged proxies are read back, not evaluated again
    import demix.stages.reproduce as reproduce

    def no_proxies(*args, **kwargs):
        raise AssertionError("a kept proxy evaluated again")

    monkeypatch.setattr(reproduce, "ProxyEvaluator", no_proxies)
    assert main(argv) == 0
    again = json.loads((out / "reproduce.json").read_text())
    assert again["sweep"] == result["sweep"] and again["ablations"] == result["ablations"]

    def scaling(args: list[str]) -> int:
        return main(["scaling", *args])

    assert scaling([str(out), "--out", str(tmp_path / "scaling.md")]) == 0
    (row,) = [
        r for r in (tmp_path / "scaling.md").read_text().splitlines() if r.startswith("| 3 |")
    ]
    assert "| out | 7 |" in row
    assert scaling([str(tmp_path / "missing")]) == 2  # DemixError


@pytest.mark.slow
def test_validate_component_writes_fidelity_artifacts(smoke_run, tmp_path):
    from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model

    from components.validate_fidelity import validate_fidelity
    from demix.stages import write_model_index

    config_path, config, data, base, components = _run_parts(smoke_run)
    raw = yaml.safe_load(config_path.read_text())
    raw["fidelity"] = {"references": 2}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    write_model_index([(p, str(p)) for p in components.values()], tmp_path / "index.json")

    def artifact(cls, path):
        art = cls(uri=str(path))
        art.path = str(path)
        return art

    metrics = artifact(Metrics, tmp_path / "metrics")
    validate_fidelity.python_func(
        config=artifact(Artifact, tmp_path / "config.yaml"),
        data=artifact(Dataset, smoke_run[1] / "dataset"),
        base=artifact(Model, base),
        component_index=artifact(Artifact, tmp_path / "index.json"),
        metrics=metrics,
        fidelity=artifact(Artifact, tmp_path / "fidelity"),
        report=artifact(HTML, tmp_path / "report.html"),
    )
    result = json.loads((tmp_path / "fidelity").read_text())
    assert result["n"] >= 5 and "aggregate" in result["categories"]
    assert "<h1>DeMix proxy fidelity</h1>" in (tmp_path / "report.html").read_text()
    assert metrics.metadata["crr/mean"] == pytest.approx(result["crr"]["mean"], nan_ok=True)
    assert metrics.metadata["macro_rho_proxy"] == pytest.approx(
        result["macro"]["proxy"]["rho"], nan_ok=True
    )
    # the base is evaluated on the same tasks: loss tasks get the improvement CRR (a note may
    # still say where the smoke run's references do not improve on the base: no gap to recover)
    assert set(result["base_result"]) == set(result["reference_results"][0])
    assert "No base model result" not in result.get("crr_note", "")
    assert set(result["crr_ci"]) == set(result["crr"])
    assert {e["kind"] for e in result["crr_tasks"].values()} >= {"improvement"}
    assert result["weights_only_training_tokens"] == result["cost"]["reference_training_tokens"]


def test_run_outputs_hold_no_credentials(smoke_run):
    from .conftest import key_like

    _, out = smoke_run
    for name in ("report.html", "summary.json", "config.json", "search/result.json"):
        found = key_like((out / name).read_text())
        assert not found, f"{name}: key-like string {found!r}"


def test_the_training_seed_is_an_explicit_argument_never_read_from_a_name(smoke_run, tmp_path):
    """A further seed of a final run trains with the run seed + its offset, given as such; a
    name that looks seeded changes nothing, and a run name maps back to its run by lookup."""
    from demix.checkpoint import read_model_manifest
    from demix.errors import DemixError
    from demix.mixtures import SeededRun, final_run, final_runs
    from demix.stages import train_stage

    _, config, data, base, _ = _run_parts(smoke_run)
    mixture = dict(data.token_prior)
    offset = train_stage(config, data, "final", tmp_path / "a", "x", base, mixture, seed_offset=2)
    named = train_stage(config, data, "final", tmp_path / "b", "x-seed2", base, mixture)
    assert read_model_manifest(offset)["seed"] == config.seed + 2
    assert read_model_manifest(named)["seed"] == config.seed
    assert final_runs(2)[:2] == [SeededRun("chosen", 0), SeededRun("chosen", 1)]
    assert final_run("uniform-seed1", 2) == SeededRun("uniform", 1)
    with pytest.raises(DemixError, match="final.seeds=1"):
        final_run("uniform-seed1", 1)
    with pytest.raises(DemixError, match="seed offset"):
        train_stage(config, data, "component", tmp_path / "c", "general", base, seed_offset=1)


def test_the_verdict_on_final_models(smoke_run, tmp_path):
    """Two finals trained alike (same mixture, same seed) are the same model: inconclusive on
    every score. A final trained four times as long is better on the objective, with an
    interval that excludes 0."""
    from demix.stages import evaluate_each, judge_finals, train_stage

    _, config, data, base, _ = _run_parts(smoke_run)
    mixture = dict(data.token_prior)
    final = config.train.final.model_copy(update={"tokens": 4 * config.train.final.tokens})
    longer = config.model_copy(update={"train": config.train.model_copy(update={"final": final})})
    models = {
        "chosen": train_stage(config, data, "final", tmp_path / "a", "chosen", base, mixture),
        "uniform": train_stage(config, data, "final", tmp_path / "b", "chosen", base, mixture),
        "longer": train_stage(longer, data, "final", tmp_path / "c", "chosen", base, mixture),
    }
    results = {name: [r] for name, r in evaluate_each(config, data, models).items()}
    same = judge_finals(config, {"chosen": results["chosen"], "uniform": results["uniform"]})
    entries = same["uniform"]
    for entry in [
        entries["objective"],
        *[entries[c] for c in CATEGORIES],
        *entries["tasks"].values(),
    ]:
        assert entry["verdict"] == "inconclusive" and entry["diff"] == 0.0
    longer_vs = judge_finals(
        config, {"longer": results["longer"], "chosen": results["chosen"]}, chosen="longer"
    )["chosen"]
    assert longer_vs["objective"]["verdict"] == "better"
    assert longer_vs["objective"]["ci_low"] > 0
    # held-out loss is what more training moves most surely
    assert longer_vs["tasks"]["heldout:general"]["verdict"] == "better"
