"""`demix export`: a finished run's mixture as Megatron-LM, OLMo-core, `datasets` and plain JSON
input, each parsed back the way its consumer reads it; bad run folders are one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import yaml

from demix.cli import main
from demix.data.shards import DATASET_KIND
from demix.export import is_export, read_run, render, selection_export
from demix.storage import write_manifest

NAMES = ["general", "code", "math", "legal"]
MIXTURE = {"general": 0.45, "code": 0.35, "math": 0.2, "legal": 0.0}
COMPONENTS = {"general": 0.5, "code": 0.3, "math": 0.15, "legal": 0.05}
PRIOR = {"general": 0.55, "code": 0.2, "math": 0.15, "legal": 0.1}
TRAIN = {"general": 55_000, "code": 20_000, "math": 15_000, "legal": 10_000}
FINAL = 60_000


def _summary() -> dict:
    """What summarize() writes, the fields export reads (others omitted)."""
    return {
        "datasets": NAMES,
        "token_prior": PRIOR,
        "dataset_train_tokens": TRAIN,
        "final_tokens": FINAL,
        "mixture": MIXTURE,
        "component_weights": COMPONENTS,
        "proxies_evaluated": 6,
    }


@pytest.fixture
def run(tmp_path) -> Path:
    """A finished run folder as `demix run` leaves it, reduced to what export reads."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(_summary()))
    return folder


def _export(capsys, *argv: str) -> str:
    assert main(["export", *argv]) == 0
    return capsys.readouterr().out


def test_json_has_the_mixture_weights_prior_tokens_and_epochs(run, capsys):
    found = json.loads(_export(capsys, str(run), "--format", "json"))
    assert found["datasets"] == NAMES
    assert found["mixture"] == MIXTURE and found["component_weights"] == COMPONENTS
    assert found["token_prior"] == PRIOR and found["train_tokens"] == TRAIN
    assert found["final_tokens"] == FINAL
    assert found["epochs"] == pytest.approx(
        {"general": 0.45 * 60_000 / 55_000, "code": 1.05, "math": 0.8, "legal": 0.0}
    )


def test_megatron_data_path_is_weight_prefix_pairs_in_dataset_order(run, capsys):
    text = _export(capsys, str(run), "--format", "megatron", "--prefix", "code=/data/code_text")
    tokens = text.split()
    pairs = list(zip(tokens[0::2], tokens[1::2], strict=True))
    assert [p for _, p in pairs] == ["general", "/data/code_text", "math"]  # legal: weight 0
    weights = [float(w) for w, _ in pairs]
    assert weights == pytest.approx([0.45, 0.35, 0.2]) and sum(weights) == pytest.approx(1.0)


def test_olmo_sources_use_olmo_core_field_names(run, capsys):
    """Field names and checks as OLMo-core defines them: SourceMixtureConfig (source_name,
    target_ratio, paths, max_repetition_ratio >= 1, max_source_fraction) and SourceMixtureList
    (sources, target ratios summing to 1), in allenai/OLMo-core
    src/olmo_core/data/source_mixture.py (commit 004bb4672e5a6bc7f0aa70f08b893df86ae4451d)."""
    text = _export(capsys, str(run), "--format", "olmo", "--prefix", "math=s3://b/math/*.npy")
    config = yaml.safe_load(text)
    assert list(config) == ["sources"]
    sources = config["sources"]
    fields = {"source_name", "target_ratio", "paths", "max_repetition_ratio", "max_source_fraction"}
    assert all(set(s) <= fields for s in sources)
    assert [s["source_name"] for s in sources] == ["general", "code", "math"]
    assert math.isclose(sum(s["target_ratio"] for s in sources), 1.0)
    assert all(0 < s["target_ratio"] <= 1 and s["paths"] for s in sources)
    assert sources[2]["paths"] == ["s3://b/math/*.npy"]
    # the final budget takes 1.05 epochs of code: it must be allowed to repeat that much
    assert [s["max_repetition_ratio"] for s in sources] == [1.0, 1.05, 1.0]
    assert f"requested_tokens of SourceMixtureDatasetConfig: {FINAL}" in text


def test_hf_probabilities_are_accepted_by_interleave_datasets(run, capsys):
    found = json.loads(_export(capsys, str(run), "--format", "hf"))
    assert found["datasets"] == ["general", "code", "math"]
    assert sum(found["probabilities"]) == pytest.approx(1.0, abs=1e-12)
    parts = [
        datasets.Dataset.from_dict({"text": [f"{name} {i}" for i in range(20)]})
        for name in found["datasets"]
    ]
    mixed = datasets.interleave_datasets(
        parts,
        probabilities=found["probabilities"],
        seed=0,
        stopping_strategy=found["stopping_strategy"],
    )
    drawn = [row["text"].split()[0] for row in mixed]
    assert set(drawn) == set(found["datasets"])  # all_exhausted: every source read through
    assert drawn.count("general") > drawn.count("math")


def test_out_writes_the_file_and_replaces_only_an_earlier_export(run, tmp_path, capsys):
    out = tmp_path / "mix.txt"
    for fmt in ("megatron", "olmo", "hf", "json"):  # each over the previous one
        assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
        assert is_export(out.read_bytes())
    assert json.loads(out.read_text()) == read_run(run)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert main(["export", str(run), "--format", "json", "--out", str(notes)]) == 2
    assert "not a file demix wrote" in capsys.readouterr().err
    assert notes.read_text() == "my notes\n"


def _one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("demix: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_run_folders_and_prefixes_are_one_line_errors(run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_error_line(capsys, ["export", str(empty), "--format", "json"])
    assert f"{empty}: not a finished demix run folder (no summary.json)" in line
    (empty / "summary.json").write_text('{"datasets": ["a"]}')
    line = _one_error_line(capsys, ["export", str(empty), "--format", "json"])
    assert "summary.json: not the summary of a finished demix run" in line
    argv = ["export", str(run), "--format", "megatron", "--prefix"]
    assert "'physics' is not a dataset of the run" in _one_error_line(capsys, [*argv, "physics=x"])
    assert "expected NAME=PATH" in _one_error_line(capsys, [*argv, "code"])
    line = _one_error_line(capsys, ["export", str(run), "--format", "hf", "--prefix", "code=x"])
    assert "--prefix names data paths of --format megatron or olmo" in line


def test_a_summary_without_token_fields_reads_them_from_the_run(run, capsys):
    """Summaries written before they held train tokens and the final budget: dataset/ and
    config.json of the same `demix run` folder hold them."""
    summary = _summary()
    del summary["dataset_train_tokens"], summary["final_tokens"]
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "dataset").mkdir()
    datasets_ = {n: {"train_tokens": t} for n, t in TRAIN.items()}
    (run / "dataset" / "manifest.json").write_text(json.dumps({"datasets": datasets_}))
    (run / "config.json").write_text(json.dumps({"train": {"final": {"tokens": FINAL}}}))
    assert read_run(run) == json.loads(render(read_run(run), "json"))
    assert read_run(run)["epochs"]["code"] == pytest.approx(1.05)
    (run / "config.json").unlink()
    assert "no config.json" in _one_error_line(capsys, ["export", str(run), "--format", "json"])


def test_the_pipeline_export_artifact_equals_the_cli_json(run, tmp_path, capsys):
    from kfp.dsl import Artifact, Dataset

    from components.export_mixture import export_mixture
    from demix.config import RunConfig

    def artifact(cls, path: Path):
        art = cls(uri=str(path))
        art.path = str(path)
        return art

    data = tmp_path / "dataset"
    data.mkdir()
    write_manifest(
        data, DATASET_KIND, datasets={n: {"train_tokens": t, "heldout_tokens": 0} for n, t in TRAIN.items()},
        token_prior=PRIOR, dtype="uint16", vocab_size=300, eos_token_id=0, tokenizer="tokenizer",
    )  # fmt: skip
    selection = tmp_path / "result.json"
    selection.write_text(json.dumps({"mixture": MIXTURE, "component_weights": COMPONENTS}))
    config = tmp_path / "config.yaml"
    raw = {
        "data": {"datasets": [{"name": n, "paths": [f"/data/{n}"]} for n in NAMES]},
        "train": {
            "base": {"tokens": 100},
            "component": {"tokens": 100},
            "final": {"tokens": FINAL},
        },
        "evaluate": {"categories": {"general": ["heldout:general"]}},
    }
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "export.json"
    exported = artifact(Artifact, out)
    export_mixture.python_func(
        config=artifact(Artifact, config),
        data=artifact(Dataset, data),
        selection=artifact(Artifact, selection),
        export=exported,
    )
    assert json.loads(out.read_text()) == read_run(run)
    # the run page shows the mixture and its text in every other format, as `demix export`
    assert exported.metadata["mixture"] == read_run(run)["mixture"]
    for fmt in ("megatron", "olmo", "hf"):
        assert exported.metadata[fmt] == _export(capsys, str(run), "--format", fmt), fmt
    from demix.data.shards import CuratedData

    direct = selection_export(
        CuratedData(data),
        json.loads(selection.read_text()),
        RunConfig.model_validate(raw).train.final.tokens,
    )
    assert direct == read_run(run)
