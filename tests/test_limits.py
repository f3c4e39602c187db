"""Limits before allocation: sizes bounded by the config schema, memory plans of training and
of the search pool refused before anything is allocated (check-config too), and documents
read in bounded pieces, so a decompression bomb is refused with little memory."""

from __future__ import annotations

import gzip
import json
import resource
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from demix.cli import main
from demix.config import ArchitectureConfig, DataConfig, DatasetSpec, parse_config
from demix.data.curate import curate
from demix.data.lines import bounded_lines
from demix.errors import ConfigError, DataError
from demix.memory_plans import (
    search_plan,
    shape_of_architecture,
    shape_of_folder,
    training_plan,
)
from demix.model import build_tiny_llama

from . import reliability
from .conftest import smoke_config_dict

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[1]
# The address space a command may map: 2 GiB. `demix check-config` (torch imported) runs in 1
# GiB, but commands that import more may crash at exit there; a 1 GiB line read whole cannot
# fit (before documents were bounded, a 3 GiB line took 11.7 GB). What a command did use is
# measured too: its peak resident memory must stay under 1 GB.
ADDRESS_SPACE = 2 * 1024**3
MAX_RESIDENT = 1e9
# The command in the child: demix's entry point, then its own peak resident memory into a file.
CHILD = (
    "import os, resource, sys; from demix.cli import main; code = main(sys.argv[1:]); "
    "open(os.environ['PEAK_FILE'], 'w').write(str(resource.getrusage(resource.RUSAGE_SELF)"
    ".ru_maxrss * 1024)); sys.exit(code)"
)
HANG_GUARD_S = 300  # a timeout for the subprocess, not a timed assertion

# One size bomb per bounded field: (dotted key, value far above its bound).
SIZE_BOMBS = [
    ("model.architecture.hidden_size", 1_000_000),
    ("model.architecture.intermediate_size", 10_000_000_000),
    ("model.architecture.num_layers", 1_000_000),
    ("model.architecture.num_heads", 1_000_000),
    ("model.architecture.max_position_embeddings", 10**9),
    ("train.seq_len", 10**9),
    ("train.batch_size", 1_000_000_000),
    ("train.micro_batch_size", 1_000_000_000),
    ("train.base.tokens", 10**18),
    ("search.n", 10**9),
    ("search.rounds", 10**6),
    ("search.candidates", 10**12),
    ("search.top_k", 10**12),
    ("search.sampler.num_scales", 10**9),
    ("search.predictor.num_iterations", 10**9),
    ("final.seeds", 10**6),
    ("fidelity.references", 1_000_000_000),
    ("fidelity.seeds", 10**6),
    ("decision.candidates", 10**12),
    ("decision.seeds", 10**6),
    ("evaluate.batch_size", 10**9),
    ("evaluate.limit", 10**12),
    ("data.curate_groups", 10**9),
    ("data.tokenizer.sample_chars", 10**13),
    ("data.max_document_bytes", 10**12),
    ("merge.shard_bytes", 10**15),
]


@pytest.fixture
def config_file(tmp_path, corpus_dir) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(smoke_config_dict(corpus_dir)))
    return path


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def _demix(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real command in a subprocess under the address-space limit; `peak` is the bytes of
    its peak resident memory."""
    peak = cwd / "peak-resident"
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *argv],
        cwd=cwd,
        env={
            "PYTHONPATH": str(ROOT),
            "PATH": "/usr/bin:/bin",
            "HOME": str(cwd),
            "MALLOC_ARENA_MAX": "2",
            "PEAK_FILE": str(peak),
        },
        preexec_fn=_limited,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    result.peak = int(peak.read_text()) if peak.is_file() else None
    peak.unlink(missing_ok=True)
    return result


def _one_line_refusal(result: subprocess.CompletedProcess, *words: str) -> str:
    err = result.stderr.strip()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(err.splitlines()) == 1 and err.startswith("demix: error: "), err
    for word in words:
        assert word in err, err
    assert result.peak < MAX_RESIDENT, f"peak resident memory {result.peak / 1e6:.0f} MB"
    return err


# ------------------------------------------------------------------ the schema's bounds


@pytest.mark.parametrize(("key", "value"), SIZE_BOMBS)
def test_a_size_over_its_bound_is_one_line_in_check_config(config_file, capsys, key, value):
    assert main(["check-config", str(config_file), "--set", f"{key}={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err, err
    assert f"{value} is above the limit" in err, err
    reliability.count("size_bombs")


@pytest.mark.parametrize(
    ("key", "value", "command"),
    [
        ("model.architecture.hidden_size", 1_000_000, "train"),
        ("model.architecture.intermediate_size", 10_000_000_000, "train"),
        ("model.architecture.num_layers", 1_000_000, "train"),
        ("train.batch_size", 1_000_000_000, "train"),
        ("search.candidates", 10**12, "search"),
        ("fidelity.references", 1_000_000_000, "validate"),
        ("search.candidates", 10**12, "run"),
    ],
)
def test_the_command_that_would_run_a_size_bomb_refuses_it(
    config_file, tmp_path, key, value, command
):
    out = tmp_path / "out"
    argv = {
        "train": ["--role", "base", "--data", str(tmp_path / "data"), "--out", str(out)],
        "search": ["--data", "d", "--base", "b", "--out", str(out)],
        "validate": ["--data", "d", "--base", "b", "--components", "x=c", "--out", str(out)],
        "run": ["--out", str(out)],
    }[command]
    result = _demix(command, str(config_file), "--set", f"{key}={value}", *argv, cwd=tmp_path)
    _one_line_refusal(result, key, "is above the limit")
    assert not out.exists() and not Path(f"{out}.ckpt").exists()
    reliability.count("size_bombs")


def test_a_70b_class_architecture_passes_the_schema_and_the_memory_plan_refuses_it(
    corpus_dir, tmp_path, capsys
):
    raw = smoke_config_dict(corpus_dir)
    raw["model"]["architecture"] = {
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_layers": 80,
        "num_heads": 64,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
    }
    raw["data"]["tokenizer"]["vocab_size"] = 65536
    raw["train"].update(seq_len=8192, batch_size=512, micro_batch_size=1)
    config = parse_config(raw)  # the schema takes it
    plan = training_plan(
        shape_of_architecture(config.model.architecture, 65536), config.train, "eager", 1,
        ("cuda:0", True, 80 * 10**9),
    )  # fmt: skip
    # 79B: demix builds every layer with as many key/value heads as heads (no GQA)
    assert 78e9 < plan.parts["weights"] / 4 < 80e9
    assert not plan.fits
    with pytest.raises(ConfigError, match=r"training memory plan: a 78\.\d\dB-parameter model"):
        plan.check()
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "training memory plan" in err
    assert " needs " in err and " is available " in err, err


# ------------------------------------------------------------------ memory plans


def test_the_plan_counts_a_real_tiny_models_parameter_bytes(tmp_path):
    for arch in (
        ArchitectureConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        ArchitectureConfig(
            hidden_size=48, num_layers=3, num_heads=4, intermediate_size=96,
            tie_word_embeddings=False,
        ),
    ):  # fmt: skip
        model = build_tiny_llama(arch, 320, 0, 0)
        measured = sum(p.numel() * p.element_size() for p in model.parameters())
        shape = shape_of_architecture(arch, 320)
        plan = training_plan(shape, parse_train(), "eager", 1, ("host memory", False, None))
        assert plan.parts["weights"] == measured  # float32 master weights, byte for byte
        assert plan.parts["gradients"] == measured and plan.parts["AdamW"] == 3 * measured
        model.save_pretrained(tmp_path / "m", safe_serialization=True)
        assert shape_of_folder(tmp_path / "m").parameters * 4 == measured
        assert shape_of_folder(tmp_path / "m").hidden == arch.hidden_size


def parse_train():
    from demix.config import TrainConfig

    return TrainConfig(seq_len=32, batch_size=8, component={"tokens": 1}, final={"tokens": 1})


def test_a_training_plan_over_the_memory_is_refused_before_any_output(config_file, tmp_path):
    out = tmp_path / "out"
    for sets in (
        [
            "--set",
            "model.architecture.num_layers=1024",
            "--set",
            "model.architecture.hidden_size=4096",
        ],
        ["--set", "train.batch_size=1000000"],
    ):
        result = _demix("check-config", str(config_file), *sets, cwd=tmp_path)
        _one_line_refusal(result, "training memory plan", " needs ", " is available ")
        argv = ["--role", "base", "--data", str(tmp_path / "d"), "--out", str(out)]
        result = _demix("train", str(config_file), *sets, *argv, cwd=tmp_path)
        _one_line_refusal(result, "training memory plan", " needs ", " is available ")
        assert not out.exists() and not Path(f"{out}.ckpt").exists()
        reliability.count("size_bombs", 2)


def test_a_search_pool_over_the_memory_is_refused_before_any_output(config_file, tmp_path):
    out = tmp_path / "out"
    sets = ["--set", "search.candidates=100000000", "--set", "search.top_k=8"]
    for command, argv in (
        ("check-config", []),
        ("search", ["--data", "d", "--base", "b", "--out", str(out)]),
        ("run", ["--out", str(out)]),
    ):
        plan = search_plan(100_000_000, 3, 3)
        if plan.fits:  # a machine with more than ~80 GB available: nothing to refuse
            pytest.skip(f"{plan.line}: fits this machine")
        result = _demix(command, str(config_file), *sets, *argv, cwd=tmp_path)
        _one_line_refusal(result, "search pool memory plan", "search.candidates", " needs ")
        assert not out.exists()
        reliability.count("size_bombs")


def test_check_config_reports_the_plans(config_file, tmp_path, capsys):
    assert main(["check-config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert "training memory plan: a " in out and "search pool memory plan: 500" in out
    arch = ArchitectureConfig(hidden_size=48, num_layers=3, num_heads=4, intermediate_size=96)
    model = build_tiny_llama(arch, 320, 0, 0)
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    assert main(["check-config", str(config_file), "--set", f"model.base={tmp_path / 'base'}"]) == 0
    out = capsys.readouterr().out
    assert f"training memory plan: a {n / 1e6:.1f}M-parameter model ({tmp_path / 'base'};" in out


def test_the_training_loop_plans_before_it_builds_a_model(tmp_path, monkeypatch):
    """train_model refuses from the plan alone: a model built would fail the test."""
    from demix.config import ModelConfig, StageTraining
    from demix.train import loop

    monkeypatch.setattr(loop, "build_tiny_llama", lambda *a, **k: pytest.fail("allocated"))

    class Data:
        vocab_size, eos_token_id, manifest = 320, 0, {}

    monkeypatch.setattr(loop, "job_fingerprint", lambda *a, **k: "job")
    arch = ArchitectureConfig(hidden_size=8192, num_layers=512, num_heads=64, intermediate_size=8)
    with pytest.raises(ConfigError, match="training memory plan: .* needs .* is available"):
        loop.train_model(
            tmp_path / "m", Data(), {"a": 1.0}, StageTraining(tokens=64), parse_train(),
            ModelConfig(), 0, "base", "base", arch=arch, quiet=True,
        )  # fmt: skip
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------ documents read in bounds


def test_lines_are_split_without_holding_a_long_one():
    chunks = iter([b"ab\ncd", b"efgh", b"ij\n\nk"])
    lines = [(1, 0, b"ab"), (2, 3, None), (3, 12, b""), (4, 13, b"k")]
    assert list(bounded_lines(chunks, 4)) == lines
    assert list(bounded_lines(iter([b"abcd\n"]), 4)) == [(1, 0, b"abcd"), (2, 5, b"")]


def _gzip_bomb(path: Path, line_bytes: int, text_field: bool = True) -> None:
    """A gzip file of one JSON line of `line_bytes` bytes, written in chunks (little memory)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip header and trailer
    block = b"a" * (1 << 20)
    with open(path, "wb") as f:
        f.write(compressor.compress(b'{"text": "' if text_field else b""))
        for _ in range(line_bytes // len(block)):
            f.write(compressor.compress(block))
        f.write(compressor.compress(b'"}\n' if text_field else b"\n"))
        f.write(compressor.flush())


def _data_config(corpus_dir: Path, bad: Path, **settings) -> dict:
    return {
        "datasets": [
            {"name": "general", "paths": [str(corpus_dir / "general.jsonl")]},
            {"name": "bomb", "paths": [str(corpus_dir / "math.jsonl"), str(bad)]},
        ],
        "tokenizer": {"vocab_size": 300},
        **settings,
    }


@pytest.mark.slow
def test_a_gzip_bomb_is_refused_with_little_memory(corpus_dir, tmp_path):
    """One 1 GiB line in a 1 MB gzip file: refused naming file and line, or skipped and
    counted, in a process that could not hold the line."""
    bomb = tmp_path / "bomb.jsonl.gz"
    _gzip_bomb(bomb, 1 << 30)
    assert bomb.stat().st_size < 8 << 20
    raw = smoke_config_dict(corpus_dir)
    raw["data"] = _data_config(corpus_dir, bomb)
    raw["evaluate"]["categories"] = {"general": ["heldout:general"]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "data"
    result = _demix("curate", "run.yaml", "--out", str(out), cwd=tmp_path)
    _one_line_refusal(result, f"{bomb}:1: a record of more than 4,194,304 bytes")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".data")]
    reliability.count("decompression_bombs")
    # under oversize: skip the same command reads past the line, in the same memory
    raw["data"]["oversize"] = "skip"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    result = _demix("curate", "run.yaml", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.peak < MAX_RESIDENT, f"peak resident memory {result.peak / 1e6:.0f} MB"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["datasets"]["bomb"]["oversize_skipped"] == 1
    assert "1 over data.max_document_bytes skipped" in result.stderr


@pytest.mark.parametrize("name", ["long.txt.gz", "long.jsonl.gz", "long.jsonl.zst", "long.txt"])
def test_a_long_document_is_refused_naming_the_file(corpus_dir, tmp_path, name):
    path = tmp_path / name
    body = b"word " * 2000 + b"\n"
    data = json.dumps({"text": body.decode()}).encode() + b"\n" if ".jsonl" in name else body
    if name.endswith(".gz"):
        data = gzip.compress(data)
    elif name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    config = DataConfig(**_data_config(corpus_dir, path, max_document_bytes=4096))
    where = f"{path}:1: a record" if ".jsonl" in name else f"{path}: a document"
    with pytest.raises(DataError, match=f"^{where} of more than 4,096 bytes"):
        curate(config, tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()
    reliability.count("decompression_bombs")


def test_long_documents_skipped_or_truncated_are_counted_in_the_manifest(corpus_dir, tmp_path):
    long_line = json.dumps({"text": "word " * 2000}) + "\n"
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": "short doc " * 20}) + "\n" + long_line)
    text = "Ünïcödé " * 1000  # cut at 4096 bytes falls inside a character
    (tmp_path / "long.txt").write_text(text)
    (tmp_path / "short.txt").write_text("a short text file, kept as it is " * 4)
    for oversize, key, n in (
        ("skip", "oversize_skipped", 2),
        ("truncate", "oversize_truncated", 1),
    ):
        config = DataConfig(
            **_data_config(
                corpus_dir, tmp_path / "long.jsonl", max_document_bytes=4096, oversize=oversize
            )
        )
        config = config.model_copy(
            update={
                "datasets": [
                    *config.datasets,
                    DatasetSpec(
                        name="txt", paths=[str(tmp_path / "long.txt"), str(tmp_path / "short.txt")]
                    ),
                ]
            }
        )
        out = tmp_path / f"out-{oversize}"
        manifest = curate(config, out, seed=0)
        counted = {name: s.get(key, 0) for name, s in manifest["datasets"].items()}
        if oversize == "skip":  # the JSONL record and the text file
            assert counted == {"general": 0, "bomb": 1, "txt": 1} and n == 2
        else:  # the text file cut; a JSONL record cannot be cut and is skipped
            assert counted == {"general": 0, "bomb": 0, "txt": 1}
            assert manifest["datasets"]["bomb"]["oversize_skipped"] == 1
            kept = (out / "txt" / "train.bin").stat().st_size + (
                out / "txt" / "heldout.bin"
            ).stat().st_size
            assert kept > 0
    reliability.count("decompression_bombs", 2)


def test_no_torch_tensor_is_needed_to_plan(monkeypatch):
    """Planning reads shapes only: no tensor of the model's size is made."""
    made = []
    real = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: made.append(a) or real(*a, **k))
    arch = ArchitectureConfig(hidden_size=65536, num_layers=1024, num_heads=1024)
    plan = training_plan(shape_of_architecture(arch, 65536), parse_train(), "eager")
    assert plan.needed > 10**13 and not made
