"""Training jobs reused across runs by content (demix.train.reuse): a component whose data,
settings and base did not change is copied from an earlier run, bit for bit what training it
again gives; one whose data changed trains."""

import json
import shutil

import yaml
from safetensors.numpy import load_file

from demix.config import parse_config
from demix.data.shards import CuratedData
from demix.stages import curate_stage, train_stage
from demix.train.job import data_read
from demix.train.reuse import record_uri, reused_from
from tests.conftest import smoke_config_dict


def _weights(folder):
    return {
        k: v for path in sorted(folder.glob("*.safetensors")) for k, v in load_file(path).items()
    }


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def test_a_component_is_reused_only_when_what_it_reads_is_unchanged(tmp_path, corpus_dir):
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    raw = smoke_config_dict(corpus)
    first = parse_config(raw)
    base = train_stage(first, curate_stage(first, tmp_path / "data0"), "base", tmp_path / "base")
    raw["model"]["base"] = str(base)  # a fixed tokenizer: curation no longer trains one
    config = parse_config(raw)
    before = curate_stage(config, tmp_path / "data-a")
    root = str(tmp_path / "pipeline-root")

    def component(data: CuratedData, name: str, folder: str, jobs_root: str = root):
        out = tmp_path / folder
        train_stage(config, data, "component", out, name, base, uri=str(out), jobs_root=jobs_root)
        fingerprint = json.loads((out / "manifest.json").read_text())["fingerprint"]
        return out, fingerprint

    code_a, job = component(before, "code", "run-a/code")
    assert json.loads((tmp_path / record_uri(root, job)[len(str(tmp_path)) + 1 :]).read_text())[
        "uri"
    ] == str(code_a)
    assert reused_from(root, job, str(code_a)) == ""  # trained by that run

    with open(corpus / "math.jsonl", "a") as fh:  # one candidate's data changes
        for i in range(40):
            fh.write(json.dumps({"text": f"Problem {i}: {i} + {i} = {2 * i}. " * 4}) + "\n")
    after = curate_stage(config, tmp_path / "data-b")
    assert data_read(after, {"general": 0.5, "code": 0.5}) == data_read(
        before, {"general": 0.5, "code": 0.5}
    )
    assert data_read(after, {"general": 0.5, "math": 0.5}) != data_read(
        before, {"general": 0.5, "math": 0.5}
    )

    code_b, job_b = component(after, "code", "run-b/code")
    assert job_b == job and reused_from(root, job, str(code_b)) == str(code_a)
    assert _same_weights(code_b, code_a)
    fresh, _ = component(after, "code", "fresh/code", jobs_root="")  # trained again, no reuse
    assert _same_weights(fresh, code_b)  # what reuse copied is what training gives

    math_a, math_job_a = component(before, "math", "run-a/math")
    math_b, math_job_b = component(after, "math", "run-b/math")
    assert math_job_b != math_job_a and reused_from(root, math_job_b, str(math_b)) == ""
    assert not _same_weights(math_a, math_b)

    shutil.rmtree(code_a)  # a record whose model is gone is ignored: the job trains
    code_c, _ = component(after, "code", "run-c/code")
    assert reused_from(root, job, str(code_c)) == ""
    assert _same_weights(code_c, code_b)


def test_the_config_of_a_reused_job_is_the_whole_training_job(tmp_path, corpus_dir):
    """A changed training setting, seed or general ratio is another job (never reused)."""
    from demix.train import role_job_id

    raw = smoke_config_dict(corpus_dir)
    config = parse_config(raw)
    data = curate_stage(config, tmp_path / "data")
    mix = {"general": 0.5, "code": 0.5, "math": 0.0}
    job = role_job_id(config.train, config.model, config.seed, data, mix, "component", "code", None)
    for key, value in (("seed", 1), ("train", {**raw["train"], "batch_size": 4})):
        other = parse_config(yaml.safe_load(yaml.safe_dump({**raw, key: value})))
        assert (
            role_job_id(other.train, other.model, other.seed, data, mix, "component", "code", None)
            != job
        )
    assert (
        role_job_id(
            config.train,
            config.model,
            config.seed,
            data,
            {**mix, "general": 0.4, "code": 0.6},
            "component",
            "code",
            None,
        )
        != job
    )


def test_reuse_never_replaces_a_folder_demix_did_not_write(tmp_path, user_file):
    """A model found for the job is copied only over an empty folder or a demix artifact: a
    user's folder at the task's output is refused in one line and kept byte for byte."""
    import pytest

    from demix.errors import DataError
    from demix.storage import write_manifest
    from demix.train.reuse import record_finished, reuse_finished

    trained = tmp_path / "earlier-run" / "model"
    trained.mkdir(parents=True)
    (trained / "model.safetensors").write_bytes(b"weights" * 10)
    write_manifest(trained, "demix.model", name="code", fingerprint="job-1")
    root = str(tmp_path / "root")
    record_finished(root, "job-1", str(trained), "component", "code")

    out = tmp_path / "this-run" / "model"
    notes = user_file(out / "notes.txt", b"mine")
    with pytest.raises(DataError, match="demix did not write"):
        reuse_finished(root, "job-1", out)
    assert notes.read_bytes() == b"mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    empty = tmp_path / "other-run" / "model"
    assert reuse_finished(root, "job-1", empty) == str(trained)
    assert (empty / "model.safetensors").read_bytes() == b"weights" * 10
