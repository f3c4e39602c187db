"""Never write over an input: an output path equal to, inside or holding a path the command
reads (after resolving symbolic links) is refused with one line before any work; a table
demix appends to is never a link to someone else's file; export replaces only an earlier
export and refuses a mixture off the simplex in every format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from demix.cli import main
from demix.config import ArchitectureConfig
from demix.errors import DataError
from demix.export import FORMATS, is_export
from demix.model import build_tiny_llama
from demix.search import ScoresTable
from demix.storage.files import open_append
from demix.storage.outputs import SEARCH_KIND, claim_folder

from . import reliability
from .conftest import smoke_config_dict

pytestmark = pytest.mark.reliability

MIXTURE = "general=0.4,code=0.3,math=0.3"


@pytest.fixture(scope="module")
def setup(corpus_dir, tmp_path_factory):
    """A config, a curated dataset, a plain base folder and a merged demix model artifact."""
    from demix.data.shards import CuratedData

    root = tmp_path_factory.mktemp("inputs")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(smoke_config_dict(corpus_dir)))
    data = root / "data"
    assert main(["curate", str(config), "--out", str(data)]) == 0
    tok = CuratedData(data).load_tokenizer()
    spec = ArchitectureConfig(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    base = root / "base"
    build_tiny_llama(spec, len(tok), tok.eos_token_id, seed=0).save_pretrained(base)
    tok.save_pretrained(base)
    found = {"root": root, "config": str(config), "data": str(data), "base": str(base)}
    merged = root / "merged"
    assert main(_merge(found, str(base), str(merged))) == 0
    return {**found, "merged": str(merged)}


def _merge(setup: dict, base: str, out: str) -> list[str]:
    components = [f"{n}={setup['base']}" for n in ("general", "code", "math")]
    return [
        "merge",
        setup["config"],
        "--data",
        setup["data"],
        "--base",
        base,
        "--components",
        *components,
        "--mixture",
        MIXTURE,
        "--out",
        out,
    ]


def _tree(root: Path) -> dict[str, bytes | None]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _refused(capsys, argv: list[str], *expected: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("demix: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_merge_out_equal_to_its_base_is_refused(setup, capsys):
    merged = Path(setup["merged"])
    before = _tree(merged)
    argv = _merge(setup, str(merged), str(merged))
    _refused(capsys, argv, f"{merged}: the output is the input {merged}")
    reliability.intact(_tree(merged) == before, "merge wrote over its base")
    components = argv.index("--components") + 1
    argv = _merge(setup, setup["base"], str(merged))
    argv[components] = f"general={merged}"
    _refused(capsys, argv, "the output is the input")
    reliability.intact(_tree(merged) == before, "merge wrote over a component")
    reliability.count("inputs_kept", 2)


def test_train_out_equal_to_its_init_is_refused(setup, capsys):
    merged = Path(setup["merged"])
    before = _tree(merged)
    argv = ["train", setup["config"], "--role", "component", "--dataset", "code"]
    argv += ["--data", setup["data"], "--init", str(merged), "--out", str(merged)]
    _refused(capsys, argv, "the output is the input")
    reliability.intact(_tree(merged) == before, "train wrote over its init")
    reliability.count("inputs_kept")


def test_an_output_reached_through_a_link_into_an_input_is_refused(setup, tmp_path, capsys):
    link = tmp_path / "alias"
    link.symlink_to(setup["data"])  # the dataset folder under another name
    before = _tree(Path(setup["data"]))
    argv = ["evaluate", setup["config"], "--data", setup["data"], "--models", setup["base"]]
    _refused(capsys, [*argv, "--out", str(link / "scores.json")], "lies inside the input")
    argv = ["train", setup["config"], "--role", "base", "--data", str(link)]
    _refused(capsys, [*argv, "--out", str(link / "model")], "lies inside the input")
    reliability.intact(_tree(Path(setup["data"])) == before, "a command wrote into its input")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alias"]
    reliability.count("inputs_kept", 2)


def test_curate_out_holding_its_own_source_files_is_refused(setup, corpus_dir, tmp_path, capsys):
    out = Path(setup["data"])
    raw = smoke_config_dict(corpus_dir)
    source = out / "extra.jsonl"  # a user's source file kept in the dataset folder
    source.write_text((corpus_dir / "general.jsonl").read_text())
    try:
        raw["data"]["datasets"][0]["paths"] = [str(source)]
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump(raw))
        before = _tree(out)
        _refused(capsys, ["curate", str(config), "--out", str(out)], "the output holds the input")
        reliability.intact(_tree(out) == before, "curate wrote over its own source")
    finally:
        source.unlink()
    reliability.count("inputs_kept")


def test_a_scores_table_linked_to_a_user_file_is_refused_without_appending(
    setup, tmp_path, capsys, user_file
):
    search = tmp_path / "search"
    claim_folder(search, SEARCH_KIND)
    mine = user_file(tmp_path / "mine.jsonl", b'{"id": "my own row"}\n')
    (search / "scores.jsonl").symlink_to(mine)
    components = [f"{n}={setup['base']}" for n in ("general", "code", "math")]
    argv = ["search", setup["config"], "--data", setup["data"], "--base", setup["base"]]
    _refused(capsys, [*argv, "--components", *components, "--out", str(search)], "symbolic link")
    assert mine.read_bytes() == b'{"id": "my own row"}\n'
    with pytest.raises(Exception, match="symbolic link"):
        ScoresTable(search / "scores.jsonl").append({"id": "x"})
    assert mine.read_bytes() == b'{"id": "my own row"}\n'
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(Exception, match="not a regular file"):
        ScoresTable(tmp_path / "fifo").append({"id": "x"})
    with pytest.raises(DataError, match="fifo: cannot open it to append"):
        open_append(tmp_path / "fifo")  # no reader: refused at once, never waiting
    reliability.count("inputs_kept")


# ---------------------------------------------------------------- export


def _run(tmp_path: Path, mixture: dict[str, float]) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    summary = {
        "datasets": list(mixture),
        "token_prior": {n: 1 / len(mixture) for n in mixture},
        "dataset_train_tokens": {n: 1000 for n in mixture},
        "final_tokens": 4000,
        "mixture": mixture,
        "component_weights": mixture,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.mark.parametrize("notes", [b"3 eggs\n", b"- milk\n", b"1 2\n", b'{"kind": "x"}\n'])
def test_export_never_replaces_a_user_s_file(notes, tmp_path, capsys, user_file):
    run = _run(tmp_path, {"a": 0.5, "b": 0.5})
    out = user_file(tmp_path / "notes.txt", notes)
    assert not is_export(notes)
    for fmt in FORMATS:
        argv = ["export", str(run), "--format", fmt, "--out", str(out)]
        _refused(capsys, argv, str(out), "not a file demix wrote")
        assert out.read_bytes() == notes
        reliability.count("exports_refused")


def test_every_format_replaces_an_earlier_export_of_any_format(tmp_path, capsys):
    run = _run(tmp_path, {"a": 0.5, "b": 0.5})
    out = tmp_path / "mix"
    for fmt in [*FORMATS, *FORMATS]:
        assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
        text = out.read_text()
        assert is_export(text.encode()) and ("demix" in text.splitlines()[0] or "kind" in text)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("weights", [(1.0, 0.5), (0.5, 0.4999)])
def test_a_mixture_off_the_simplex_is_refused_in_every_format(fmt, weights, tmp_path, capsys):
    run = _run(tmp_path, dict(zip(["a", "b"], weights, strict=True)))
    out = tmp_path / "mix"
    line = _refused(capsys, ["export", str(run), "--format", fmt, "--out", str(out)], "not 1")
    assert f"sums to {sum(weights):.10g}" in line, line
    _refused(capsys, ["export", str(run), "--format", fmt], "not 1")
    assert not out.exists()
    reliability.count("exports_refused")


def test_the_local_run_log_is_never_written_through_a_link(tmp_path, user_file):
    from deploy.local import quiet_tasks

    mine = user_file(tmp_path / "mine.txt")
    before = mine.read_bytes()
    (tmp_path / "kfp-local.log").symlink_to(mine)
    with (
        pytest.raises(OSError, match="symbolic links"),
        quiet_tasks(tmp_path / "kfp-local.log", {}),
    ):
        raise AssertionError("the block must not run")
    assert mine.read_bytes() == before
    reliability.count("inputs_kept")
