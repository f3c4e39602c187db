"""Output safety, one rule for every command: demix writes an output path only where nothing is,
into an empty folder, or over what it wrote itself; anything else is refused with one line
before any work, nothing touched. A refused or failed command removes what it created.

User files are planted with conftest's `user_file`; the suite checks after every test that each
one is still there, byte for byte.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from demix.checkpoint import MODEL_KIND, read_model_manifest
from demix.cli import main
from demix.config import ArchitectureConfig
from demix.errors import DataError, DemixError
from demix.model import build_tiny_llama
from demix.storage import staged_dir, upload_artifact, write_manifest
from demix.storage.outputs import (
    OUTPUT_MARKER,
    RUN_KIND,
    Output,
    check_output,
    guarded_outputs,
)

from . import reliability
from .conftest import smoke_config_dict

pytestmark = pytest.mark.reliability

MIXTURE = "general=0.4,code=0.3,math=0.3"


def _save_tiny(folder: Path, tokenizer, seed: int) -> str:
    spec = ArchitectureConfig(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    build_tiny_llama(spec, len(tokenizer), tokenizer.eos_token_id, seed=seed).save_pretrained(
        folder
    )
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def inputs(corpus_dir, tmp_path_factory):
    """A config, a dataset curated by `demix curate` into an empty folder, and tiny models."""
    from demix.data.shards import CuratedData

    root = tmp_path_factory.mktemp("outputs")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(smoke_config_dict(corpus_dir)))
    (root / "curated").mkdir()  # an empty folder is a fine output
    assert main(["curate", str(config), "--out", str(root / "curated")]) == 0
    tok = CuratedData(root / "curated").load_tokenizer()
    models = {name: _save_tiny(root / name, tok, seed) for seed, name in enumerate(["base", "c"])}
    return {"root": root, "config": str(config), "data": str(root / "curated"), **models}


def _components(inputs: dict, names=("general", "code", "math")) -> list[str]:
    return [f"{name}={inputs['c']}" for name in names]


def _argv(command: str, inputs: dict, out: str) -> list[str]:
    """The command's argv writing to `out`, with real inputs."""
    config, data, base = inputs["config"], inputs["data"], inputs["base"]
    common = [config, "--data", data, "--base", base, "--components", *_components(inputs)]
    return {
        "fetch-demo": ["data", "fetch-demo", "--out", out],
        "fetch-demo --force": ["data", "fetch-demo", "--force", "--out", out],
        "curate": ["curate", config, "--out", out],
        "train": ["train", config, "--role", "base", "--data", data, "--out", out],
        "merge": ["merge", *common, "--mixture", MIXTURE, "--out", out],
        "evaluate": ["evaluate", config, "--data", data, "--models", base, "--out", out],
        "search": ["search", *common, "--out", out],
        "validate": ["validate", *common, "--out", out],
        "reproduce": ["reproduce", config, "--out", out],
        "reproduce-decision": ["reproduce-decision", config, "--out", out],
        "run": ["run", config, "--out", out],
        "report": ["report", out],
    }[command]


WRITERS = ["fetch-demo", "curate", "train", "merge", "evaluate", "search", "validate"]
WRITERS += ["reproduce", "reproduce-decision", "run", "report", "fetch-demo --force"]


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a folder)."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _refused(capsys, argv: list[str], *expected: str) -> str:
    """Run argv; it must exit 2 with exactly one `demix: error:` line holding `expected`."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("demix: error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", WRITERS)
def test_every_writing_command_refuses_a_folder_holding_a_user_file(
    command, inputs, tmp_path, capsys, user_file
):
    out = tmp_path / "project"
    user_file(out / "notes.txt")
    user_file(out / "drafts" / "plan.md")
    before = _tree(tmp_path)
    why = "holds no finished run" if command == "report" else "demix did not write"
    why = "is a folder" if command == "evaluate" else why
    _refused(capsys, _argv(command, inputs, str(out)), str(out), why)
    reliability.intact(_tree(tmp_path) == before, f"{command} changed what was at {out}")
    reliability.count("outputs_refused")


@pytest.mark.parametrize("command", [c for c in WRITERS if c != "report"])
def test_an_existing_regular_file_as_out_is_refused(command, inputs, tmp_path, capsys, user_file):
    out = user_file(tmp_path / "results.txt")
    before = _tree(tmp_path)
    _refused(capsys, _argv(command, inputs, str(out)), str(out))
    reliability.intact(_tree(tmp_path) == before, f"{command} changed {out} or wrote beside it")
    reliability.count("outputs_refused")


@pytest.mark.parametrize("command", ["curate", "train", "merge", "fetch-demo", "search", "run"])
def test_out_dot_is_refused_with_one_line(
    command, inputs, tmp_path, capsys, monkeypatch, user_file
):
    cwd = tmp_path / "work"
    user_file(cwd / "notes.txt")
    monkeypatch.chdir(cwd)
    before = _tree(tmp_path)
    _refused(capsys, _argv(command, inputs, "."), ".:")
    assert _tree(tmp_path) == before
    reliability.count("outputs_refused")


def test_the_current_folder_is_never_an_artifact_even_when_empty(
    inputs, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    _refused(capsys, _argv("merge", inputs, "."), "is the current folder")
    _refused(capsys, _argv("merge", inputs, ".."), "is the current folder")
    assert not any(tmp_path.iterdir())


def test_an_empty_folder_is_accepted_and_a_demix_artifact_is_replaced(inputs, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    assert main(_argv("merge", inputs, str(out))) == 0
    first = read_model_manifest(out)["data_mixture"]
    argv = _argv("merge", inputs, str(out))
    argv[argv.index(MIXTURE)] = "general=0.2,code=0.4,math=0.4"
    assert main(argv) == 0
    assert read_model_manifest(out)["data_mixture"] != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no `.merged.old` left


def test_rerunning_curate_into_its_artifact_skips_it(inputs, capsys):
    manifest = Path(inputs["data"]) / "manifest.json"
    mtime = manifest.stat().st_mtime_ns
    assert main(_argv("curate", inputs, inputs["data"])) == 0
    assert manifest.stat().st_mtime_ns == mtime


def test_evaluate_replaces_its_own_result_file_only(inputs, tmp_path, capsys, user_file):
    out = tmp_path / "scores.json"
    out.write_text(json.dumps({"old": {"ranking_score": 0.5, "categories": {}}}))
    assert main(_argv("evaluate", inputs, str(out))) == 0
    assert "base" in json.loads(out.read_text())
    other = user_file(tmp_path / "mine.json", b'{"base": 1}\n')
    _refused(capsys, _argv("evaluate", inputs, str(other)), "not a file demix wrote")


def test_an_artifact_of_another_kind_is_refused(inputs, capsys):
    before = _tree(Path(inputs["data"]))
    _refused(capsys, _argv("merge", inputs, inputs["data"]), "demix 'demix.dataset' output")
    assert _tree(Path(inputs["data"])) == before


def test_a_run_folder_is_claimed_with_a_marker_and_resumed(tmp_path):
    out = tmp_path / "run"
    with guarded_outputs(Output(out, RUN_KIND, "folder")):
        (out / "config.json").write_text("{}")
    assert json.loads((out / OUTPUT_MARKER).read_text())["kind"] == RUN_KIND
    check_output(Output(out, RUN_KIND, "folder"))  # rerun: it is demix's own
    with pytest.raises(DataError, match="demix 'demix.run' output, not 'demix.search'"):
        check_output(Output(out, "demix.search", "folder"))


def test_a_checkpoint_path_holding_user_files_is_refused_before_training(
    inputs, tmp_path, capsys, user_file
):
    user_file(tmp_path / "model.ckpt" / "notes.txt")
    before = _tree(tmp_path)
    _refused(capsys, _argv("train", inputs, str(tmp_path / "model")), "model.ckpt")
    assert _tree(tmp_path) == before


def test_a_demo_folder_in_the_config_holding_user_files_is_refused(
    inputs, corpus_dir, tmp_path, capsys, user_file
):
    raw = smoke_config_dict(corpus_dir)
    raw["data"]["fetch_demo"] = str(tmp_path / "demo")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    user_file(tmp_path / "demo" / "general.jsonl")
    before = _tree(tmp_path)
    _refused(capsys, ["curate", str(config), "--out", str(tmp_path / "data")], "demo")
    assert _tree(tmp_path) == before


def test_staged_dir_never_replaces_what_demix_did_not_write(tmp_path, user_file):
    user_file(tmp_path / "folder" / "notes.txt")
    user_file(tmp_path / "file")
    for final in (tmp_path / "folder", tmp_path / "file"):
        with pytest.raises(DataError, match=str(final)), staged_dir(final):
            raise AssertionError("the block must not run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]


# ---------------------------------------------------------------- failed commands leave nothing


def _missing_dataset(inputs: dict, tmp_path: Path) -> str:
    raw = yaml.safe_load(Path(inputs["config"]).read_text())
    raw["data"]["datasets"][1]["paths"] = [str(tmp_path / "nowhere.jsonl")]
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    return str(config)


@pytest.mark.parametrize("command", ["run", "reproduce", "reproduce-decision"])
def test_a_refused_recipe_leaves_no_folder(command, inputs, tmp_path, capsys):
    out = tmp_path / "runs" / "a"
    argv = [command, _missing_dataset(inputs, tmp_path), "--out", str(out)]
    _refused(capsys, argv, "nowhere.jsonl does not exist")
    left = sorted(p.name for p in tmp_path.iterdir())
    reliability.intact(left == ["bad.yaml"], f"{command} left {left}")
    reliability.count("outputs_removed")


@pytest.mark.parametrize("command", ["search", "validate"])
def test_a_failed_search_or_validate_leaves_no_folder(command, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _argv(command, inputs, str(out))
    argv[argv.index("--components") + 1 : argv.index("--out")] = _components(inputs, ["code"])
    _refused(capsys, argv, "no component model given for dataset(s) ['general', 'math']")
    reliability.intact(not out.exists(), f"{command} left {out}")
    reliability.count("outputs_removed")


def test_a_failed_run_empties_a_folder_that_was_empty(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    _refused(capsys, ["run", _missing_dataset(inputs, tmp_path), "--out", str(out)], "nowhere")
    assert out.is_dir() and not any(out.iterdir())


def test_a_failed_command_keeps_completed_work(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DemixError), guarded_outputs(Output(out, RUN_KIND, "folder")):
        (out / "dataset").mkdir()
        write_manifest(out / "dataset", "demix.dataset")
        raise DemixError("a later stage failed")
    assert (out / "dataset" / "manifest.json").is_file()
    search = tmp_path / "search"
    with pytest.raises(DemixError), guarded_outputs(Output(search, "demix.search", "folder")):
        (search / "scores.jsonl").write_text('{"id": "a"}\n')
        raise DemixError("evaluation failed")
    assert (search / "scores.jsonl").is_file()


# ---------------------------------------------------------------- gs:// alike


def _blobs(bucket: str, prefix: str) -> dict[str, bytes]:
    from demix import gcs as gcs_io

    bkt = gcs_io.bucket(bucket)
    return {name: gcs_io.read_bytes(bkt, name) for name in gcs_io.list_blobs(bkt, prefix)}


def _put(bucket: str, name: str, data: bytes, tmp_path: Path) -> None:
    from demix import gcs as gcs_io

    path = tmp_path / "upload"
    path.write_bytes(data)
    gcs_io.upload_file(gcs_io.bucket(bucket), name, path)


@pytest.mark.parametrize("command", ["curate", "train", "merge", "search", "evaluate"])
def test_a_gs_prefix_holding_foreign_objects_is_refused(command, inputs, gcs, tmp_path, capsys):
    _put(gcs.bucket, "project/notes.txt", b"a user's notes\n", tmp_path)
    before = _blobs(gcs.bucket, "project")
    uri = f"gs://{gcs.bucket}/project"
    why = "is a folder" if command == "evaluate" else "demix did not write (first 'notes.txt';"
    _refused(capsys, _argv(command, inputs, uri), uri, why)
    reliability.intact(_blobs(gcs.bucket, "project") == before, f"{command} changed {uri}")
    reliability.count("outputs_refused")


def test_a_gs_object_as_out_is_refused(inputs, gcs, tmp_path, capsys):
    _put(gcs.bucket, "results", b"a user's file\n", tmp_path)
    uri = f"gs://{gcs.bucket}/results"
    _refused(capsys, _argv("merge", inputs, uri), uri, "is an object (a file), not a folder")
    assert _blobs(gcs.bucket, "results") == {"results": b"a user's file\n"}


def test_a_gs_artifact_is_replaced_and_a_cut_off_publish_is_still_demix_own(
    inputs, gcs, tmp_path, capsys
):
    from demix import gcs as gcs_io

    uri = f"gs://{gcs.bucket}/merged"
    assert main(_argv("merge", inputs, uri)) == 0
    gcs_io.delete(gcs_io.bucket(gcs.bucket), "merged/manifest.json")  # cut off mid-publish
    check_output(Output(uri, MODEL_KIND))
    argv = _argv("merge", inputs, uri)
    argv[argv.index(MIXTURE)] = "general=0.2,code=0.4,math=0.4"
    assert main(argv) == 0
    assert "merged/manifest.json" in _blobs(gcs.bucket, "merged")


def test_a_failed_gs_search_leaves_no_objects(inputs, gcs, capsys):
    uri = f"gs://{gcs.bucket}/search"
    argv = _argv("search", inputs, uri)
    argv[argv.index("--components") + 1 : argv.index("--out")] = _components(inputs, ["code"])
    _refused(capsys, argv, "no component model given")
    reliability.intact(not _blobs(gcs.bucket, "search"), "a failed search left objects")
    reliability.count("outputs_removed")


def test_upload_artifact_marks_the_prefix_before_deleting_the_manifest(gcs, tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "w.bin").write_bytes(os.urandom(64))
    write_manifest(folder, "demix.test")
    upload_artifact(folder, f"gs://{gcs.bucket}/a")
    marker = json.loads(_blobs(gcs.bucket, "a")[f"a/{OUTPUT_MARKER}"])
    assert marker["kind"] == "demix.test"


def test_a_gs_artifact_whose_publish_failed_is_kept_for_the_rerun(
    inputs, gcs, tmp_path, capsys, monkeypatch
):
    uri = f"gs://{gcs.bucket}/merged"
    monkeypatch.setenv("DEMIX_GCS_DEADLINE_S", "0.5")
    decide = gcs.plan.decide

    def uploads_fail(method, path, length):
        return "status:503" if method in ("POST", "PUT") else decide(method, path, length)

    gcs.plan.decide = uploads_fail
    _refused(capsys, _argv("merge", inputs, uri), "upload failed after retries")
    gcs.plan.decide = decide
    local = tmp_path / "cache" / "gcs" / gcs.bucket / "merged"  # conftest's DEMIX_CACHE
    reliability.intact((local / "manifest.json").is_file(), "a failed publish lost the artifact")
    monkeypatch.setenv("DEMIX_GCS_DEADLINE_S", "600")
    assert main(_argv("merge", inputs, uri)) == 0
    assert "merged/manifest.json" in _blobs(gcs.bucket, "merged")
