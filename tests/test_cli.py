"""Bad input through the `demix` CLI: one line naming what and where, exit 2, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from demix.cli import main, parse_mixture
from demix.config import ArchitectureConfig
from demix.errors import MixtureError
from demix.model import build_tiny_llama

from .conftest import smoke_config_dict


def _write_config(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _fails(capsys, argv: list[str], expected: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("demix: error:")]
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def config_path(tmp_path, corpus_dir):
    return _write_config(tmp_path, smoke_config_dict(corpus_dir))


def test_unknown_config_key(tmp_path, corpus_dir, capsys):
    raw = smoke_config_dict(corpus_dir)
    raw["search"]["nn"] = 3
    _fails(capsys, ["check-config", str(_write_config(tmp_path, raw))], "search.nn: unknown key")


def test_missing_dataset_path(tmp_path, corpus_dir, capsys):
    raw = smoke_config_dict(corpus_dir)
    raw["data"]["datasets"][1]["paths"] = [str(tmp_path / "nowhere.jsonl")]
    out = tmp_path / "curated"
    _fails(
        capsys, ["curate", str(_write_config(tmp_path, raw)), "--out", str(out)], "nowhere.jsonl"
    )
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".curated")]


def test_malformed_jsonl_names_the_line(tmp_path, corpus_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = (corpus_dir / "math.jsonl").read_text().splitlines()[:5]
    lines.insert(3, '{"text": "unterminated')
    bad.write_text("\n".join(lines) + "\n")
    raw = smoke_config_dict(corpus_dir)
    raw["data"]["datasets"][2]["paths"] = [str(bad)]
    out = tmp_path / "curated"
    _fails(capsys, ["curate", str(_write_config(tmp_path, raw)), "--out", str(out)], "bad.jsonl:4")
    assert not out.exists()


def test_dataset_empty_after_cleaning(tmp_path, corpus_dir, capsys):
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"text": "tiny"}) + "\n" for _ in range(5)))
    raw = smoke_config_dict(corpus_dir)
    raw["data"]["datasets"][1]["paths"] = [str(short)]
    _fails(
        capsys, ["curate", str(_write_config(tmp_path, raw)), "--out", str(tmp_path / "c")], "code"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("general=-0.2,code=0.6,math=0.6", "negative"),
        ("general=nan,code=0.5,math=0.5", "NaN"),
        ("general=0.5,code=0.3,math=0.3", "sum"),
        ("general=0.5,code=0.3,physics=0.2", "physics"),
    ],
)
def test_bad_mixtures(tmp_path, config_path, capsys, text, expected, curated):
    out = tmp_path / "final"
    _fails(
        capsys,
        [
            "train",
            str(config_path),
            "--role",
            "final",
            "--data",
            str(curated),
            "--init",
            str(curated),
            "--mixture",
            text,
            "--out",
            str(out),
        ],
        expected,
    )
    assert not out.exists()


def test_parse_mixture_forms(tmp_path):
    assert parse_mixture("a=0.25, b=0.75") == {"a": 0.25, "b": 0.75}
    assert parse_mixture('{"a": 1}') == {"a": 1.0}
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"mixture": {"a": 0.5, "b": 0.5}}))
    assert parse_mixture(str(f)) == {"a": 0.5, "b": 0.5}
    with pytest.raises(MixtureError, match="name=weight"):
        parse_mixture("a:0.5")


@pytest.fixture(scope="module")
def curated(corpus_dir, tmp_path_factory):
    from demix.config import parse_config
    from demix.data.curate import curate

    out = tmp_path_factory.mktemp("cli") / "curated"
    config = parse_config(smoke_config_dict(corpus_dir))
    curate(config.data, out, config.seed)
    return out


def _save_tiny(folder: Path, tokenizer, **arch) -> Path:
    spec = ArchitectureConfig(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64
    ).model_copy(update=arch)
    build_tiny_llama(spec, len(tokenizer), tokenizer.eos_token_id, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _merge_argv(config_path: Path, curated: Path, base: Path, out: Path) -> list[str]:
    """`demix merge` arguments up to --components (the caller appends NAME=PATH entries)."""
    return [
        "merge",
        str(config_path),
        "--data",
        str(curated),
        "--base",
        str(base),
        "--mixture",
        "general=0.4,code=0.3,math=0.3",
        "--out",
        str(out),
        "--components",
    ]


def test_merge_refuses_mismatched_components(tmp_path, config_path, curated, capsys):
    from demix.data.shards import CuratedData

    tok = CuratedData(curated).load_tokenizer()
    base = _save_tiny(tmp_path / "base", tok)
    good = _save_tiny(tmp_path / "good", tok)
    wide = _save_tiny(tmp_path / "wide", tok, intermediate_size=96)
    out = tmp_path / "merged"
    args = _merge_argv(config_path, curated, base, out)
    _fails(capsys, [*args, f"general={good}", f"code={wide}", f"math={good}"], "shape")
    assert not out.exists()
    # a different tokenizer (one token added) is refused too
    tok.add_tokens(["<extra>"])
    other_tok = tmp_path / "othertok"
    _save_tiny(other_tok, tok)
    _fails(capsys, [*args, f"general={good}", f"code={other_tok}", f"math={good}"], "vocab_size")


def test_base_without_safetensors(tmp_path, config_path, curated, capsys):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "llama"}')
    (base / "pytorch_model.bin").write_bytes(b"not loaded")
    _fails(
        capsys,
        [
            "train",
            str(config_path),
            "--role",
            "component",
            "--data",
            str(curated),
            "--init",
            str(base),
            "--dataset",
            "code",
            "--out",
            str(tmp_path / "c"),
        ],
        "safetensors only",
    )


def test_unknown_task(tmp_path, corpus_dir, curated, capsys):
    raw = smoke_config_dict(corpus_dir)
    raw["evaluate"]["categories"]["code"].append("no_such_task_xyz")
    path = _write_config(tmp_path, raw)
    _fails(
        capsys,
        ["evaluate", str(path), "--data", str(curated), "--models", str(curated)],
        "no_such_task_xyz",
    )


def test_merge_refuses_a_different_tokenizer_of_the_same_size(
    tmp_path, config_path, curated, capsys
):
    from demix.data.shards import CuratedData

    tok = CuratedData(curated).load_tokenizer()
    base = _save_tiny(tmp_path / "base", tok)
    good = _save_tiny(tmp_path / "good", tok)
    other = _save_tiny(tmp_path / "other", tok)
    # swap the ids of two tokens: same vocabulary size, different tokenizer
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(data))
    out = tmp_path / "merged"
    argv = _merge_argv(config_path, curated, base, out)
    _fails(capsys, [*argv, f"general={good}", f"code={other}", f"math={good}"], "tokenizer differs")
    assert not out.exists()


def test_merge_with_any_method_through_set(tmp_path, config_path, curated, capsys):
    from demix.data.shards import CuratedData
    from demix.model import read_model_manifest

    tok = CuratedData(curated).load_tokenizer()
    base = _save_tiny(tmp_path / "base", tok)
    comps = [f"{name}={_save_tiny(tmp_path / name, tok)}" for name in ("general", "code", "math")]
    out = tmp_path / "merged"
    argv = [*_merge_argv(config_path, curated, base, out), *comps]
    settings = ["--set", "merge.method=ties", "--set", "merge.weights=component"]
    assert main([*argv, *settings, "--set", "merge.density=0.3"]) == 0
    capsys.readouterr()
    assert read_model_manifest(out)["method"] == {"name": "ties", "density": 0.3, "scale": 1.0}
    out.rename(tmp_path / "first")
    _fails(capsys, [*argv, *settings, "--set", "merge.drop_rate=0.3"], "merge.drop_rate")
    _fails(capsys, [*argv, "--set", "merge.method"], "expected KEY=VALUE")
    _fails(capsys, [*argv, "--set", "merge.method=slerp"], "merge.method")
    assert not out.exists()
