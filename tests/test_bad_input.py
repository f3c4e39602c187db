"""Bad input through the `demix` CLI, one table: each case gets one line naming the file, key
or value and how to fix it, exit code 2, and nothing (not even a temporary) at its output.

A case builds its bad input in a fresh folder and returns the argv; `out` is where the command
would write. Cases that need more than the error line (the pickle payload never ran, the last
good checkpoint was kept) add a check.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from demix.checkpoint import MODEL_KIND
from demix.cli import main
from demix.config import ArchitectureConfig
from demix.model import build_tiny_llama
from demix.storage import write_manifest

from . import reliability
from .conftest import smoke_config_dict

pytestmark = pytest.mark.reliability


@dataclass
class Ctx:
    """What a case builds on: a fresh folder, the smoke corpus, a curated dataset, tiny models."""

    tmp: Path
    corpus: Path
    curated: Path
    models: Path
    bucket: str

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def config(self, edit: Callable[[dict], None] | None = None) -> str:
        raw = smoke_config_dict(self.corpus)
        if edit:
            edit(raw)
        path = self.tmp / "config.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    def curate(self, edit: Callable[[dict], None] | None = None) -> list[str]:
        return ["curate", self.config(edit), "--out", str(self.out)]

    def dataset(self, index: int, path: Path, **spec) -> Callable[[dict], None]:
        def edit(raw: dict) -> None:
            raw["data"]["datasets"][index].update(paths=[str(path)], **spec)

        return edit

    def final(self, mixture: str) -> list[str]:
        return [
            "train", self.config(), "--role", "final", "--data", str(self.curated),
            "--init", str(self.models / "base"), "--mixture", mixture, "--out", str(self.out),
        ]  # fmt: skip

    def component(self, init: Path) -> list[str]:
        return [
            "train", self.config(), "--role", "component", "--dataset", "code",
            "--data", str(self.curated), "--init", str(init), "--out", str(self.out),
        ]  # fmt: skip

    def merge(self, code: Path, config_edit: Callable[[dict], None] | None = None) -> list[str]:
        good = self.models / "good"
        return [
            "merge", self.config(config_edit), "--data", str(self.curated),
            "--base", str(self.models / "base"), "--mixture", "general=0.4,code=0.3,math=0.3",
            "--out", str(self.out), "--components", f"general={good}", f"code={code}",
            f"math={good}",
        ]  # fmt: skip

    def evaluate(self, edit: Callable[[dict], None]) -> list[str]:
        return [
            "evaluate", self.config(edit), "--data", str(self.curated),
            "--models", str(self.models / "base"), "--out", str(self.out),
        ]  # fmt: skip

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path


@dataclass
class Case:
    name: str
    build: Callable[[Ctx], list[str]]
    expected: str
    check: Callable[[Ctx], None] | None = None


def _set(path: str, value) -> Callable[[dict], None]:
    def edit(raw: dict) -> None:
        node = raw
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[keys[-1]] = value

    return edit


def _jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


DOC = "A long enough document about rivers and cities, written for the cleaning filter. " * 2


def _unreadable(ctx: Ctx) -> Path:
    """A dataset file that exists but cannot be read (EACCES; as root, an EIO file)."""
    path = ctx.tmp / "locked.txt"
    if os.geteuid() != 0:
        path.write_text(DOC)
        path.chmod(0)
    else:  # root reads any mode: a procfs file whose read fails instead
        path.symlink_to("/proc/self/mem")
    return path


def _malformed(ctx: Ctx) -> Path:
    lines = (ctx.corpus / "math.jsonl").read_text().splitlines()[:5]
    lines.insert(3, '{"text": "unterminated')
    return ctx.write("bad.jsonl", "\n".join(lines) + "\n")


def _pickle_only(ctx: Ctx) -> Path:
    marker = ctx.tmp / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = ctx.tmp / "evil"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    return folder


def _escaping_manifest(ctx: Ctx) -> Path:
    folder = ctx.tmp / "escape"
    shutil.copytree(ctx.models / "base", folder)
    write_manifest(folder, MODEL_KIND)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../../outside.safetensors"] = {"size": 1, "sha256": "0" * 64}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _tampered_data(ctx: Ctx) -> Path:
    folder = ctx.tmp / "tampered"
    shutil.copytree(ctx.curated, folder)
    blob = bytearray((folder / "general" / "train.bin").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (folder / "general" / "train.bin").write_bytes(bytes(blob))
    return folder


def _unfinished_data(ctx: Ctx) -> Path:
    folder = ctx.tmp / "unfinished"
    shutil.copytree(ctx.curated, folder)
    (folder / "manifest.json").unlink()
    return folder


def _train_base(
    ctx: Ctx, data: Path | str, edit: Callable[[dict], None] | None = None
) -> list[str]:
    return [
        "train", ctx.config(edit), "--role", "base", "--data", str(data), "--out", str(ctx.out),
    ]  # fmt: skip


def _diverge(raw: dict) -> None:
    raw["train"].update(checkpoint_every=2, grad_clip=1e9)
    raw["train"]["base"].update(tokens=256 * 30, lr=1e6)


def _pickle_never_ran(ctx: Ctx) -> None:
    reliability.intact(not (ctx.tmp / "pwned").exists(), "the pickle payload ran")


def _last_good_checkpoint_kept(ctx: Ctx) -> None:
    ckpt = ctx.tmp / "out.ckpt" / "manifest.json"
    reliability.intact(ckpt.is_file(), "the last good checkpoint was not kept")


CASES = [
    # config
    Case("config-unknown-key", lambda c: c.curate(_set("search.nn", 3)), "search.nn: unknown key"),
    Case("config-wrong-type", lambda c: c.curate(_set("train.batch_size", "many")), "train.batch_size: Input should be a valid integer"),
    Case("config-negative-budget", lambda c: c.curate(_set("train.component.tokens", -100)), "train.component.tokens: Input should be greater than 0"),
    Case("config-general-ratio-above-1", lambda c: c.curate(_set("train.general_ratio", 1.5)), "train.general_ratio: Input should be less than 1"),
    Case("config-general-ratio-negative", lambda c: c.curate(_set("train.general_ratio", -0.1)), "train.general_ratio: Input should be greater than or equal to 0"),
    Case("config-n-below-4", lambda c: c.curate(_set("search.n", 2)), "search.n: Input should be greater than or equal to 4"),
    Case("config-not-yaml", lambda c: ["curate", str(c.write("c.yaml", "data: [unclosed")), "--out", str(c.out)], "not valid YAML"),
    Case("config-missing-file", lambda c: ["curate", str(c.tmp / "nope.yaml"), "--out", str(c.out)], "nope.yaml: cannot read config"),
    # datasets
    Case("dataset-missing", lambda c: c.curate(c.dataset(1, c.tmp / "nowhere.jsonl")), "nowhere.jsonl does not exist; fix data.datasets paths"),
    Case("dataset-unreadable", lambda c: c.curate(c.dataset(1, _unreadable(c))), "locked.txt"),
    Case("dataset-empty-after-cleaning", lambda c: c.curate(c.dataset(1, c.write("short.jsonl", _jsonl(*[{"text": "tiny"}] * 5)))), "dataset 'code' is empty after cleaning"),
    Case("dataset-malformed-jsonl-line", lambda c: c.curate(c.dataset(2, _malformed(c))), "bad.jsonl:4: not valid JSON"),
    Case("dataset-wrong-text-field", lambda c: c.curate(c.dataset(1, c.write("t.jsonl", _jsonl({"text": DOC})), text_field="content")), "t.jsonl:1: no field 'content'"),
    Case("dataset-binary-file", lambda c: c.curate(c.dataset(1, c.write("blob.txt", b"\x00\x01" * 100))), "blob.txt is binary"),
    Case("dataset-not-utf8", lambda c: c.curate(c.dataset(1, c.write("latin.txt", DOC.encode() + b"\xe9t\xe9"))), "latin.txt is not UTF-8"),
    Case("dataset-duplicate-names", lambda c: c.curate(_set("data.datasets.1.name", "general")), "duplicate dataset names ['general']"),
    # mixtures
    Case("mixture-nan", lambda c: c.final("general=nan,code=0.5,math=0.5"), "NaN or infinite"),
    Case("mixture-negative", lambda c: c.final("general=-0.2,code=0.6,math=0.6"), "negative weights {'general': -0.2}"),
    Case("mixture-not-summing-to-1", lambda c: c.final("general=0.5,code=0.3,math=0.3"), "sum to 1.10000000"),
    Case("mixture-unknown-dataset", lambda c: c.final("general=0.5,code=0.3,physics=0.2"), "unknown dataset(s) ['physics']"),
    Case("mixture-not-a-number", lambda c: c.final("general=half,code=0.5"), "'half' is not a number"),
    # models
    Case("model-missing-safetensors", lambda c: c.component(c.write("bare/config.json", "{}").parent), "no *.safetensors weights"),
    Case("model-pickle-only-checkpoint", lambda c: c.component(_pickle_only(c)), "DeMix loads safetensors only", _pickle_never_ran),
    Case("model-mismatched-shapes", lambda c: c.merge(c.models / "wide"), "has shape (32, 96), base has (32, 64)"),
    Case("model-mismatched-tokenizer", lambda c: c.merge(c.models / "swapped"), "tokenizer differs from base"),
    Case("model-vocab-size-mismatch", lambda c: c.merge(c.models / "bigvocab"), "config vocab_size="),
    # tasks
    Case("task-unknown", lambda c: c.evaluate(_set("evaluate.categories.code", ["no_such_task_xyz"])), "no_such_task_xyz"),
    Case("task-empty-eval-set", lambda c: c.evaluate(lambda raw: (_set("evaluate.categories.math", ["gsm8k_bpb"])(raw), _set("evaluate.data_dir", str(c.write("eval/gsm8k_bpb.jsonl", "\n").parent))(raw))), "task 'gsm8k_bpb' has no documents"),
    # URIs
    Case("uri-unknown-scheme", lambda c: ["curate", c.config(), "--out", "s3://bucket/run"], "s3://bucket/run: unknown scheme 's3://'"),
    Case("uri-missing-bucket", lambda c: ["curate", c.config(), "--out", f"gs://{c.bucket}-missing/run"], "-missing: bucket does not exist"),
    Case("uri-no-bucket-name", lambda c: _train_base(c, "gs:///data"), "no bucket name"),
    # manifests
    Case("manifest-path-escapes", lambda c: c.component(_escaping_manifest(c)), "'../../outside.safetensors' escapes the artifact directory"),
    Case("manifest-hash-mismatch", lambda c: _train_base(c, _tampered_data(c)), "general/train.bin: sha256 does not match manifest.json"),
    Case("manifest-missing", lambda c: _train_base(c, _unfinished_data(c)), "unfinished: no manifest.json"),
    # training
    Case("training-nan-loss", lambda c: _train_base(c, c.curated, _diverge), "loss is nan at step", _last_good_checkpoint_kept),
    Case("cli-component-without-base", lambda c: ["train", c.config(), "--role", "component", "--dataset", "code", "--data", str(c.curated), "--out", str(c.out)], "--role component needs --init"),
]  # fmt: skip


def _save_tiny(folder: Path, tokenizer, **arch) -> Path:
    spec = ArchitectureConfig(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64
    ).model_copy(update=arch)
    build_tiny_llama(spec, len(tokenizer), tokenizer.eos_token_id, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inputs(corpus_dir, tmp_path_factory):
    """A curated dataset and tiny models: base, a good component and three incompatible ones."""
    from demix.config import parse_config
    from demix.data.curate import curate
    from demix.data.shards import CuratedData

    root = tmp_path_factory.mktemp("bad-input")
    config = parse_config(smoke_config_dict(corpus_dir))
    curate(config.data, root / "curated", config.seed)
    tok = CuratedData(root / "curated").load_tokenizer()
    models = root / "models"
    _save_tiny(models / "base", tok)
    _save_tiny(models / "good", tok)
    _save_tiny(models / "wide", tok, intermediate_size=96)
    swapped = _save_tiny(models / "swapped", tok)
    data = json.loads((swapped / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, different tokenizer
    (swapped / "tokenizer.json").write_text(json.dumps(data))
    tok.add_tokens(["<extra>"])
    _save_tiny(models / "bigvocab", tok)
    return root


def test_the_table_covers_every_kind_of_bad_input():
    kinds = {case.name.split("-")[0] for case in CASES}
    assert kinds >= {"config", "dataset", "mixture", "model", "task", "uri", "manifest", "training"}
    assert len(CASES) >= 20 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case, inputs, corpus_dir, tmp_path, capsys, gcs, one_thread):
    ctx = Ctx(tmp_path, corpus_dir, inputs / "curated", inputs / "models", gcs.bucket)
    argv = case.build(ctx)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("demix: error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert case.expected in lines[0], lines[0]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
    if case.check is _last_good_checkpoint_kept:
        leftovers.remove("out.ckpt")
    reliability.intact(not leftovers, f"{case.name}: left {leftovers} at the output location")
    if case.check:
        case.check(ctx)
    reliability.count("bad_inputs")
