"""The CLI's one boundary for errors, and bad inputs that used to end in a traceback.

Bad input (a DemixError, or a library's error about an input) is one line `demix: error: ...`
naming the file, exit 2, nothing at the output; anything else is one line `demix: internal
error: ...` with a hint, exit 3, and the traceback only under --debug.
"""

from __future__ import annotations

import errno
import json
import pickle
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from demix import cli
from demix.cli import main, parse_mixture
from demix.config import ArchitectureConfig, load_config
from demix.errors import ConfigError, DataError, MixtureError, ModelError
from demix.model import build_tiny_llama, load_model

from . import reliability
from .conftest import smoke_config_dict

pytestmark = pytest.mark.reliability

DOC = "A long enough document about rivers and cities, written for the cleaning filter. " * 2


@pytest.fixture(scope="module")
def inputs(corpus_dir, tmp_path_factory) -> Path:
    """A curated dataset and one tiny model saved by transformers (no demix manifest)."""
    from demix.config import parse_config
    from demix.data.curate import curate
    from demix.data.shards import CuratedData

    root = tmp_path_factory.mktemp("boundary")
    config = parse_config(smoke_config_dict(corpus_dir))
    curate(config.data, root / "curated", config.seed)
    tok = CuratedData(root / "curated").load_tokenizer()
    spec = ArchitectureConfig(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    model = build_tiny_llama(spec, len(tok), tok.eos_token_id, seed=0)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root


@dataclass
class Ctx:
    """A fresh folder, the smoke corpus, the curated dataset and the tiny base model."""

    tmp: Path
    corpus: Path
    inputs: Path

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def base(self) -> Path:
        return self.inputs / "base"

    def config(self, edit: Callable[[dict], None] | None = None) -> str:
        raw = smoke_config_dict(self.corpus)
        if edit:
            edit(raw)
        path = self.tmp / "config.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def corrupt_model(self, how: str) -> Path:
        """A copy of the base whose model.safetensors is broken in one way."""
        folder = self.tmp / f"model-{how}"
        shutil.copytree(self.base, folder)
        weights = folder / "model.safetensors"
        blob = weights.read_bytes()
        n = struct.unpack("<Q", blob[:8])[0]
        if how == "truncated":
            blob = blob[: len(blob) // 2]
        elif how == "header-longer-than-file":
            blob = struct.pack("<Q", len(blob) * 4) + blob[8:]
        elif how == "offsets-past-end":
            header = json.loads(blob[8 : 8 + n])
            name = next(k for k in header if k != "__metadata__")
            begin, end = header[name]["data_offsets"]
            header[name]["data_offsets"] = [begin + 10**9, end + 10**9]
            text = json.dumps(header).encode()
            text += b" " * (-len(text) % 8)
            blob = struct.pack("<Q", len(text)) + text + blob[8 + n :]
        elif how == "trailing-bytes":
            blob += b"\0" * 64
        elif how == "pickle":
            blob = pickle.dumps({"weight": [1.0, 2.0]})
        weights.write_bytes(blob)
        return folder

    def component(self, init: Path) -> list[str]:
        return [
            "train", self.config(), "--role", "component", "--dataset", "code",
            "--data", str(self.inputs / "curated"), "--init", str(init), "--out", str(self.out),
        ]  # fmt: skip

    def evaluate(self, model: Path) -> list[str]:
        return [
            "evaluate", self.config(), "--data", str(self.inputs / "curated"),
            "--models", str(model), "--out", str(self.out),
        ]  # fmt: skip

    def final(self, mixture: str) -> list[str]:
        return [
            "train", self.config(), "--role", "final", "--data", str(self.inputs / "curated"),
            "--init", str(self.base), "--mixture", mixture, "--out", str(self.out),
        ]  # fmt: skip

    def merge(self, code: Path) -> list[str]:
        return [
            "merge", self.config(), "--data", str(self.inputs / "curated"), "--base",
            str(self.base), "--mixture", "general=0.4,code=0.3,math=0.3", "--out", str(self.out),
            "--components", f"general={self.base}", f"code={code}", f"math={self.base}",
        ]  # fmt: skip

    def curate_with(self, path: Path) -> list[str]:
        def edit(raw: dict) -> None:
            raw["data"]["datasets"][1]["paths"] = [str(path)]

        return ["curate", self.config(edit), "--out", str(self.out)]


def _utf16_dataset(ctx: Ctx) -> Path:
    return ctx.write("wide.jsonl", (json.dumps({"text": DOC}) + "\n").encode("utf-16"))


def _symlink_loop(ctx: Ctx) -> Path:
    a, b = ctx.tmp / "loop-a.jsonl", ctx.tmp / "loop-b.jsonl"
    a.symlink_to(b)
    b.symlink_to(a)
    return a


def _bad_tokenizer(ctx: Ctx) -> Path:
    folder = ctx.tmp / "bad-tokenizer"
    shutil.copytree(ctx.base, folder)
    (folder / "tokenizer.json").write_text('{"model": ')
    return folder


def _duplicate_key_config(ctx: Ctx) -> str:
    lines = yaml.safe_dump(smoke_config_dict(ctx.corpus), sort_keys=False).splitlines()
    at = lines.index("train:") + 1
    lines.insert(at + 1, lines[at])  # the first key of train, given twice
    return str(ctx.write("config.yaml", "\n".join(lines) + "\n"))


@dataclass
class Case:
    name: str
    build: Callable[[Ctx], list[str]]
    expected: str


CORRUPT = ("truncated", "header-longer-than-file", "offsets-past-end", "trailing-bytes", "pickle")
CASES = [
    *(
        Case(f"train-init-{how}", lambda c, how=how: c.component(c.corrupt_model(how)), "model.safetensors: ")
        for how in CORRUPT
    ),
    *(
        Case(f"evaluate-models-{how}", lambda c, how=how: c.evaluate(c.corrupt_model(how)), "model.safetensors: ")
        for how in CORRUPT
    ),
    Case("merge-corrupt-tokenizer-json", lambda c: c.merge(_bad_tokenizer(c)), "tokenizer.json: not valid JSON"),
    Case("mixture-json-string-weight", lambda c: c.final('{"general": "half", "code": 0.5}'), "mixture entry 'general': weight is a string"),
    Case("mixture-json-null-weight", lambda c: c.final('{"general": null, "code": 1}'), "mixture entry 'general': weight is null"),
    Case("mixture-json-object-weight", lambda c: c.final('{"general": {"w": 1}}'), "mixture entry 'general': weight is an object"),
    Case("mixture-json-list", lambda c: c.final("[0.5, 0.5]"), "expected a JSON object {dataset: weight}, got an array"),
    Case("mixture-json-boolean-weight", lambda c: c.final('{"general": true}'), "mixture entry 'general': weight is a boolean"),
    Case("mixture-json-file-utf16", lambda c: c.final(str(c.write("m.json", '{"general": 1}'.encode("utf-16")))), "m.json: UTF-16 encoded; convert it to UTF-8"),
    Case("train-base-with-model-base", lambda c: ["train", c.config(lambda raw: raw["model"].update(base=str(c.base))), "--role", "base", "--data", str(c.inputs / "curated"), "--out", str(c.out)], "--role base: the base is model.base"),
    Case("config-duplicate-key", lambda c: ["curate", _duplicate_key_config(c), "--out", str(c.out)], "config.yaml:"),
    Case("config-impossible-date", lambda c: ["curate", str(c.write("config.yaml", Path(c.config()).read_text() + "when: 2024-13-45\n")), "--out", str(c.out)], "not valid YAML (month must be in 1..12)"),
    Case("set-impossible-date", lambda c: ["curate", c.config(), "--set", "seed=2024-13-45", "--out", str(c.out)], "--set 'seed=2024-13-45': not valid YAML"),
    Case("dataset-utf16", lambda c: c.curate_with(_utf16_dataset(c)), "wide.jsonl is UTF-16 encoded; convert it to UTF-8"),
    Case("dataset-symlink-loop", lambda c: c.curate_with(_symlink_loop(c)), "loop-a.jsonl is a symlink loop"),
]  # fmt: skip


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_is_one_line(case, inputs, corpus_dir, tmp_path, capsys, one_thread):
    ctx = Ctx(tmp_path, corpus_dir, inputs)
    code, err = _run(case.build(ctx), capsys)
    assert code == 2, err[-2000:]
    assert err.count("\n") == 1 and err.startswith("demix: error: "), err[-2000:]
    assert case.expected in err, err
    reliability.intact(not ctx.out.exists(), f"{case.name}: wrote {ctx.out}")
    reliability.count("bad_inputs")


def test_duplicate_key_names_line_and_key_path(tmp_path, corpus_dir):
    ctx = Ctx(tmp_path, corpus_dir, tmp_path)
    path = _duplicate_key_config(ctx)
    lines = Path(path).read_text().splitlines()
    first = lines.index("train:") + 2
    key = lines[first - 1].split(":")[0].strip()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:{first + 1}: duplicate key train.{key} ")
    assert f"first given at line {first}" in str(err.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"a": "half"}', "mixture entry 'a': weight is a string ('half'), not a number"),
        ('{"a": null}', "mixture entry 'a': weight is null"),
        ('{"a": {"b": 1}}', "mixture entry 'a': weight is an object"),
        ('{"a": [0.5]}', "mixture entry 'a': weight is an array"),
        ("[0.5, 0.5]", "got an array"),
        ('{"mixture": [1]}', "mixture entry 'mixture': weight is an array"),
        ('{"a": true}', "mixture entry 'a': weight is a boolean"),
        ('{"a": NaN}', "mixture weight of 'a' is NaN or infinite"),
        ('{"a": -Infinity}', "mixture weight of 'a' is NaN or infinite"),
        ('{"a": 1' + "0" * 400 + "}", "mixture entry 'a': weight is too large"),
        ('{"a": 1' + "0" * 5000 + "}", "not valid JSON (Exceeds the limit"),
        ("[" * 100_000, "not valid JSON (nested too deeply)"),
        ('{"a": -0.5, "b": 1.5}', "negative weights {'a': -0.5}"),
        ('{"a": 0.5, "a": 0.5}', "'a' is given twice"),
        ("a=0.5,a=0.5", "'a' is given twice"),
        ("a=inf,b=0", "mixture weight of 'a' is NaN or infinite"),
        ("=1", "expected name=weight"),
        ("missing.json", "mixture file missing.json: cannot read it (No such file"),
        ("a\0.json", "mixture file 'a\\x00.json': cannot read it"),
    ],
)
def test_parse_mixture_refuses_bad_weights_naming_the_entry(text, message):
    with pytest.raises(MixtureError) as err:
        parse_mixture(text)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("how", CORRUPT)
def test_load_model_checks_weights_before_the_library(how, inputs, tmp_path, corpus_dir):
    path = Ctx(tmp_path, corpus_dir, inputs).corrupt_model(how)
    with pytest.raises(ModelError) as err:
        load_model(path)
    assert str(err.value).startswith(str(path / "model.safetensors") + ": ")
    if how == "pickle":
        assert "DeMix loads safetensors only" in str(err.value)


def test_a_shard_index_naming_a_missing_file_is_refused(inputs, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(inputs / "base", folder)
    weight_map = {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelError, match="model-00002-of-00002.safetensors"):
        load_model(folder)


@pytest.mark.parametrize("text", ['{"model": ', '{"model": 1, "version": "1.0"}', "[]"])
def test_a_malformed_tokenizer_json_is_a_model_error(text, inputs, tmp_path):
    from demix.model import load_tokenizer

    folder = tmp_path / "tok"
    shutil.copytree(inputs / "base", folder)
    (folder / "tokenizer.json").write_text(text)
    with pytest.raises(ModelError, match="cannot load tokenizer"):
        load_tokenizer(folder)


def test_utf16_without_bom_and_binary_are_told_apart(tmp_path, corpus_dir):
    from demix.config import DatasetSpec
    from demix.data.curate import read_documents

    for name, blob, message in [
        ("le.txt", DOC.encode("utf-16-le"), "is UTF-16 encoded"),
        ("be.txt", DOC.encode("utf-16-be"), "is UTF-16 encoded"),
        ("wide32.txt", DOC.encode("utf-32"), "is UTF-32 encoded"),
        ("blob.txt", b"\x00\x01" * 100, "is binary (NUL bytes)"),
    ]:
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(DataError, match=re.escape(message)):
            list(read_documents(DatasetSpec(name="d", paths=[str(path)])))


# ---------------------------------------------------------------- the boundary itself


def _raising(err: BaseException) -> Callable:
    def command(args) -> None:
        raise err

    return command


@pytest.mark.parametrize(
    "err, expected",
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.safetensors"),
            "demix: error: /runs/x/model.safetensors: No space left on device",
        ),
        (
            json.JSONDecodeError("Expecting value", '{"a": }', 6),
            "demix: error: not valid JSON at line 1 column 7 (Expecting value)",
        ),
        (
            UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte"),
            "demix: error: input is not utf-8 text (bad byte at offset 2: invalid start byte)",
        ),
    ],
)  # fmt: skip
def test_library_errors_about_inputs_are_one_line(err, expected, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "_cmd_validate_config", _raising(err))
    code, stderr = _run(["check-config", "c.yaml"], capsys)
    assert code == 2 and stderr.startswith(expected) and stderr.count("\n") == 1, stderr


def test_errors_of_input_libraries_are_one_line(monkeypatch, capsys):
    import jinja2
    from safetensors import SafetensorError

    for err, expected in [
        (SafetensorError("invalid header length"), "not a readable safetensors file"),
        (jinja2.exceptions.UndefinedError("'doc' is undefined"), "template error ('doc' is undefined)"),
        (yaml.YAMLError("bad"), "not valid YAML"),
    ]:  # fmt: skip
        monkeypatch.setattr(cli, "_cmd_validate_config", _raising(err))
        code, stderr = _run(["check-config", "c.yaml"], capsys)
        assert code == 2 and stderr.count("\n") == 1 and expected in stderr, stderr


def test_an_internal_error_is_one_line_with_a_hint_and_a_traceback_under_debug(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_cmd_validate_config", _raising(KeyError("oops")))
    code, err = _run(["check-config", "c.yaml"], capsys)
    assert code == 3, err
    assert err == (
        "demix: internal error: KeyError: 'oops' (rerun with --debug for the traceback)\n"
    )
    for argv in (["--debug", "check-config", "c.yaml"], ["check-config", "c.yaml", "--debug"]):
        code, err = _run(argv, capsys)
        assert code == 3 and "Traceback (most recent call last)" in err, err
        assert err.splitlines()[-1] == "demix: internal error: KeyError: 'oops'"


def test_debug_shows_the_traceback_of_bad_input_too(capsys, tmp_path):
    code, err = _run(["check-config", str(tmp_path / "nope.yaml"), "--debug"], capsys)
    assert code == 2 and "Traceback" in err
    assert err.splitlines()[-1].startswith("demix: error: ") and "nope.yaml" in err


def test_only_rank_0_prints_bad_input_every_rank_prints_internal_errors(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    code, err = _run(["check-config", "/nonexistent/c.yaml"], capsys)
    assert code == 2 and err == ""
    monkeypatch.setattr(cli, "_cmd_validate_config", _raising(RuntimeError("boom")))
    code, err = _run(["check-config", "c.yaml"], capsys)
    assert code == 3 and err.startswith("demix: internal error (rank 1): RuntimeError: boom")


def test_the_yaml_error_of_a_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  datasets: [unclosed\n")
    code, err = _run(["check-config", str(path)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"demix: error: {path}:3: not valid YAML (expected ',' or ']'")


def test_config_files_are_read_as_utf8_or_utf16_with_a_bom(tmp_path, corpus_dir):
    text = yaml.safe_dump(smoke_config_dict(corpus_dir))
    path = tmp_path / "c.yaml"
    path.write_bytes(text.encode("utf-16"))
    assert load_config(path).seed == 0
    path.write_bytes(text.encode("utf-8") + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)


def test_recursive_yaml_aliases_are_refused(tmp_path, corpus_dir):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(smoke_config_dict(corpus_dir)) + "extra: &a\n  self: *a\n")
    with pytest.raises(ConfigError, match="an alias refers to a value that contains it"):
        load_config(path)
