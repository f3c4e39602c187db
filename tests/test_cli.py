"""The `demix` CLI: mixture forms and --set overrides (bad input: tests/test_bad_input.py)."""

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


def test_merge_with_any_method_through_set(tmp_path, config_path, curated, capsys):
    from demix.checkpoint import read_model_manifest, tensor_shapes
    from demix.data.shards import CuratedData

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
    assert (
        main([*argv, "--set", "merge.output_dtype=bfloat16", "--set", "merge.shard_bytes=20000"])
        == 0
    )
    capsys.readouterr()
    assert {dtype for _, dtype in tensor_shapes(out).values()} == {"BF16"}
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    assert all(p.stat().st_size <= 20000 + 4096 for p in out.glob("*.safetensors"))
    out.rename(tmp_path / "second")
    _fails(capsys, [*argv, "--set", "merge.output_dtype=int8"], "merge.output_dtype")
    _fails(capsys, [*argv, *settings, "--set", "merge.drop_rate=0.3"], "merge.drop_rate")
    _fails(capsys, [*argv, "--set", "merge.method"], "expected KEY=VALUE")
    _fails(capsys, [*argv, "--set", "merge.method=slerp"], "merge.method")
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--processes", "3"], "train.batch_size=8 does not split over 3 processes"),
        (["--processes", "2", "--set", "train.micro_batch_size=8"], "not a multiple of 2"),
        (["--processes", "0"], "--processes 0: give 1 or more"),
        (["--name", "x"], "--name names a final model"),
    ],
)
def test_train_refuses_processes_that_cannot_split_the_batch(
    tmp_path, config_path, curated, capsys, extra, expected
):
    out = tmp_path / "base"
    argv = ["train", str(config_path), "--role", "base", "--data", str(curated), "--out", str(out)]
    _fails(capsys, [*argv, *extra], expected)  # before any process is launched
    assert not list(tmp_path.glob("base*")) and not list(tmp_path.glob(".base*"))
