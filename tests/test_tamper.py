"""An artifact is exactly its manifest: every reader refuses one that was tampered with.

Each case tampers with a copy of a tiny real artifact (a curated dataset, a model written by
demix) after it was published: a file added that the manifest does not list (weights a merge
would load, tokenizer files that change the vocabulary), a symlink out of the folder, a listed
file removed, grown, flipped or swapped (with its entry removed or left stale), manifest entries
that leave the folder, and each manifest field of the wrong type or value. Every reader that
takes artifacts on the command line (merge, evaluate, train --init, validate, search) refuses
each in one line naming the artifact and the file or field, exit 2, before writing anything.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from demix.checkpoint import MODEL_KIND, TensorIndex
from demix.cli import main
from demix.config import ArchitectureConfig
from demix.data.shards import CuratedData
from demix.errors import DataError, DemixError
from demix.model import build_tiny_llama, save_model
from demix.storage import MANIFEST, read_manifest, verify_artifact, write_manifest
from demix.storage import manifest as manifest_module

from . import reliability
from .conftest import smoke_config_dict

pytestmark = pytest.mark.reliability
MIXTURE = "general=0.4,code=0.3,math=0.3"


@pytest.fixture(scope="module")
def published(corpus_dir, tmp_path_factory):
    """A curated dataset and two model artifacts (a base and a component) written by demix."""
    from demix.config import parse_config
    from demix.data.curate import curate

    root = tmp_path_factory.mktemp("tamper")
    raw = smoke_config_dict(corpus_dir)
    (root / "config.yaml").write_text(yaml.safe_dump(raw))
    config = parse_config(raw)
    curate(config.data, root / "dataset", config.seed)
    tok = CuratedData(root / "dataset").load_tokenizer()
    arch = ArchitectureConfig(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    for name, seed in (("base", 0), ("component", 1)):
        model = build_tiny_llama(arch, len(tok), tok.eos_token_id, seed=seed)
        save_model(model, tok, root / name, role=name, name=name, tokens=1000)
    (root / "outside.txt").write_text("a file outside every artifact\n")
    return root


def _copy(published: Path, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(published / name, dst, symlinks=True)
    return dst


def _edit_manifest(folder: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- tampering, one kind each


def _unlisted_weights(folder: Path, published: Path) -> str:
    """An extra *.safetensors beside the weights (a merge used to load it, overriding)."""
    shutil.copy(published / "component" / "model.safetensors", folder / "zz-extra.safetensors")
    return "zz-extra.safetensors"


def _unlisted_tokenizer_file(folder: Path, published: Path) -> str:
    tokenizer = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
    (tokenizer / "added_tokens.json").write_text(json.dumps({"<a>": 320, "<b>": 321}))
    return "added_tokens.json"


def _unlisted_symlink_out(folder: Path, published: Path) -> str:
    (folder / "notes.json").symlink_to(published / "outside.txt")
    return "notes.json"


def _unlisted_dotfile(folder: Path, published: Path) -> str:
    (folder / ".hidden.safetensors").write_bytes(b"\0" * 16)
    return ".hidden.safetensors"


def _listed_symlink_out(folder: Path, published: Path) -> str:
    rel = _big_file(folder)
    outside = published.parent / f"{folder.parent.name}-{rel.replace('/', '-')}"
    shutil.copy(folder / rel, outside)  # the same bytes, outside the artifact
    (folder / rel).unlink()
    (folder / rel).symlink_to(outside)
    return rel


def _missing_file(folder: Path, published: Path) -> str:
    rel = _big_file(folder)
    (folder / rel).unlink()
    return rel


def _grown_file(folder: Path, published: Path) -> str:
    rel = _big_file(folder)
    with open(folder / rel, "ab") as f:
        f.write(b"\0" * 8)
    return rel


def _flipped_byte(folder: Path, published: Path) -> str:
    rel = _big_file(folder)
    _flip_byte(folder / rel)
    return rel


def _swapped_entry_removed(folder: Path, published: Path) -> str:
    """Other bytes in place of a listed file, and its manifest entry removed."""
    rel = _big_file(folder)
    data = bytearray((folder / rel).read_bytes())
    data[-8:] = b"\x01" * 8
    (folder / rel).write_bytes(bytes(data))
    _edit_manifest(folder, lambda m: m["files"].pop(rel))
    return rel


def _swapped_entry_stale(folder: Path, published: Path) -> str:
    """Other bytes of the same size in place of a listed file; its entry left as it was."""
    rel = _big_file(folder)
    size = (folder / rel).stat().st_size
    (folder / rel).unlink()
    (folder / rel).write_bytes(bytes(size))
    return rel


def _traversal_entry(folder: Path, published: Path) -> str:
    _edit_manifest(
        folder, lambda m: m["files"].update({"../outside.txt": {"size": 30, "sha256": "0" * 64}})
    )
    return "../outside.txt"


def _absolute_entry(folder: Path, published: Path) -> str:
    path = str(published / "outside.txt")
    _edit_manifest(folder, lambda m: m["files"].update({path: {"size": 30, "sha256": "0" * 64}}))
    return path


def _big_file(folder: Path) -> str:
    """The artifact's main data file: a model's weights, a dataset's first train stream."""
    if (folder / "model.safetensors").is_file():
        return "model.safetensors"
    return "general/train.bin"


MODEL_TAMPERING = [
    _unlisted_weights,
    _unlisted_tokenizer_file,
    _unlisted_symlink_out,
    _unlisted_dotfile,
    _listed_symlink_out,
    _missing_file,
    _grown_file,
    _flipped_byte,
    _swapped_entry_removed,
    _swapped_entry_stale,
    _traversal_entry,
    _absolute_entry,
]
DATASET_TAMPERING = [t for t in MODEL_TAMPERING if t is not _unlisted_weights]
# The reliability table's row of each kind of tampering
ROW = {
    **dict.fromkeys(
        [_unlisted_weights, _unlisted_tokenizer_file, _unlisted_symlink_out, _unlisted_dotfile],
        "tamper_unlisted",
    ),
    **dict.fromkeys(
        [
            _listed_symlink_out,
            _missing_file,
            _grown_file,
            _flipped_byte,
            _swapped_entry_removed,
            _swapped_entry_stale,
        ],
        "tamper_changed",
    ),
    **dict.fromkeys([_traversal_entry, _absolute_entry], "tamper_paths"),
}


def _tokenizer_entry(value: str) -> Callable[[Path, Path], str]:
    def tamper(folder: Path, published: Path) -> str:
        _edit_manifest(folder, lambda m: m.update(tokenizer=value))
        return value

    tamper.__name__ = f"_tokenizer_entry_{value.strip('/').replace('/', '_')}"
    ROW[tamper] = "tamper_paths"
    return tamper


DATASET_TAMPERING += [_tokenizer_entry("../base"), _tokenizer_entry("/tmp")]


# ---------------------------------------------------------------- readers on the command line


def _argv(reader: str, root: Path, data: Path, base: Path, out: Path) -> list[str]:
    config = str(root / "config.yaml")
    component = root / "component"
    components = [f"{n}={component}" for n in ("general", "code", "math")]
    return {
        "merge": [
            "merge", config, "--data", str(data), "--base", str(base), "--mixture", MIXTURE,
            "--out", str(out), "--components", *components,
        ],
        "evaluate": ["evaluate", config, "--data", str(data), "--models", str(base),
                     "--out", str(out)],
        "train": [
            "train", config, "--role", "final", "--data", str(data), "--init", str(base),
            "--mixture", MIXTURE, "--out", str(out),
        ],
        "validate": [
            "validate", config, "--data", str(data), "--base", str(base), "--out", str(out),
            "--components", *components,
        ],
        "search": [
            "search", config, "--data", str(data), "--base", str(base), "--out", str(out),
            "--components", *components,
        ],
    }[reader]  # fmt: skip


READERS = ["merge", "evaluate", "train", "validate", "search"]


def _refused(argv: list[str], capsys, out: Path, row: str, *names: str) -> str:
    """Run the command; it must exit 2 with one error line naming each of `names`, and leave
    nothing at `out` (counted in the reliability table's `row`)."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("demix: error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for name in names:
        assert name in lines[0], lines[0]
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith((".out", "out"))]
    reliability.intact(not leftovers, f"{argv[0]}: left {leftovers} at the output location")
    reliability.count("tampered_refused")
    reliability.count(row)
    return lines[0]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("tamper", MODEL_TAMPERING, ids=lambda t: t.__name__.strip("_"))
def test_every_reader_refuses_a_tampered_model(reader, tamper, published, tmp_path, capsys):
    base = _copy(published, "base", tmp_path)
    rel = tamper(base, published)
    argv = _argv(reader, published, published / "dataset", base, tmp_path / "out")
    _refused(argv, capsys, tmp_path / "out", ROW[tamper], str(base), rel)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("tamper", DATASET_TAMPERING, ids=lambda t: t.__name__.strip("_"))
def test_every_reader_refuses_a_tampered_dataset(reader, tamper, published, tmp_path, capsys):
    data = _copy(published, "dataset", tmp_path)
    rel = tamper(data, published)
    argv = _argv(reader, published, data, published / "base", tmp_path / "out")
    _refused(argv, capsys, tmp_path / "out", ROW[tamper], str(data), rel)


def test_the_untampered_artifacts_are_accepted(published):
    """The fixtures themselves pass: what the cases refuse is the tampering alone."""
    for name, kind in (("dataset", "demix.dataset"), ("base", MODEL_KIND)):
        verify_artifact(published / name, read_manifest(published / name, kind))
    data = CuratedData(published / "dataset")
    assert len(data.load_tokenizer()) == data.vocab_size
    assert data.tokens("general").size > 0


# ---------------------------------------------------------------- the library readers


def test_a_merge_reads_only_the_listed_weights(published, tmp_path):
    base = _copy(published, "base", tmp_path)
    _unlisted_weights(base, published)
    with pytest.raises(DataError, match="zz-extra.safetensors: a file not listed"):
        TensorIndex(base)
    (base / "zz-extra.safetensors").unlink()
    assert sorted(TensorIndex(base).names())  # the artifact as published reads again


def test_an_unlisted_tokenizer_file_never_reaches_the_tokenizer(published, tmp_path):
    data = _copy(published, "dataset", tmp_path)
    _unlisted_tokenizer_file(data, published)
    with pytest.raises(DataError, match="tokenizer/added_tokens.json: a file not listed"):
        CuratedData(data).load_tokenizer()
    with pytest.raises(DataError, match="added_tokens.json: a file not listed"):
        CuratedData(data).tokens("general")


def test_demix_own_files_beside_the_content_are_not_refused(published, tmp_path):
    """The manifest, the output marker and `.demix*` names (locks, records) are demix's own."""
    base = _copy(published, "base", tmp_path)
    (base / "demix-output.json").write_text('{"kind": "demix.model"}')
    (base / ".demix-lock").write_text("pid 1 on host\n")
    (base / ".demix-scratch").mkdir()
    (base / ".demix-scratch" / "part.bin").write_bytes(b"\0")
    (base / "sub").mkdir()
    (base / "sub" / ".demix-record.json").write_text("{}")
    assert sorted(TensorIndex(base).names())
    manifest = write_manifest(base, MODEL_KIND)
    assert not any(
        rel in ("demix-output.json", "sub/.demix-record.json") or rel.startswith(".demix")
        for rel in manifest["files"]
    )


def test_a_file_changed_after_its_hash_was_cached_is_hashed_again(published, tmp_path):
    """sha256 once per file per process, keyed by inode, size and times: a file replaced, or
    rewritten in place with its old mtime put back, is hashed again."""
    base = _copy(published, "base", tmp_path)
    weights = base / "model.safetensors"
    old = weights.stat().st_mtime_ns - 10**10  # old enough to be cached
    os.utime(weights, ns=(old, old))
    manifest = read_manifest(base, MODEL_KIND)
    verify_artifact(base, manifest)
    assert any(key[0] == str(weights.absolute()) for key in manifest_module._HASHES)
    verify_artifact(base, manifest)  # from the cache
    _flip_byte(weights)  # in place: the same inode and size
    os.utime(weights, ns=(old, old))
    with pytest.raises(DataError, match="model.safetensors: sha256 does not match"):
        verify_artifact(base, manifest)
    shutil.copy(published / "component" / "model.safetensors", tmp_path / "swap")
    os.utime(tmp_path / "swap", ns=(old, old))
    os.replace(tmp_path / "swap", weights)  # another inode, the same size and mtime
    with pytest.raises(DataError, match="model.safetensors: sha256 does not match"):
        verify_artifact(base, manifest)


def test_validate_verifies_its_dataset_and_base(published, tmp_path, capsys):
    data = _copy(published, "dataset", tmp_path)
    _flip_byte(data / "general" / "train.bin")
    argv = _argv("validate", published, data, published / "base", tmp_path / "out")
    _refused(argv, capsys, tmp_path / "out", "tamper_changed", "general/train.bin", "sha256")
    base = _copy(published, "base", tmp_path)
    _flip_byte(base / "model.safetensors")
    argv = _argv("validate", published, published / "dataset", base, tmp_path / "out")
    _refused(argv, capsys, tmp_path / "out", "tamper_changed", "model.safetensors", "sha256")


# ---------------------------------------------------------------- manifest fields


DATASET_FIELDS = [
    ("dtype", "float32"),
    ("dtype", 5),
    ("dtype", "uint8"),  # cannot hold the vocabulary
    ("vocab_size", "320"),
    ("vocab_size", 0),
    ("vocab_size", 320.5),
    ("vocab_size", True),
    ("eos_token_id", -1),
    ("eos_token_id", 320),
    ("eos_token_id", None),
    ("eos_token_id", "0"),
    ("datasets", []),
    ("datasets", {}),
    ("datasets", {"general": 3}),
    ("datasets", {"general": {"train_tokens": "many", "heldout_tokens": 1}}),
    ("datasets", {"general": {"train_tokens": -1, "heldout_tokens": 1}}),
    ("token_prior", {"general": "half"}),
    ("token_prior", {"general": 1.0}),  # not the datasets
    ("targets", {"t": {"heldout_tokens": "x"}}),
    ("tokenizer", 7),
    ("files", {"general/train.bin": {"size": "big", "sha256": "0" * 64}}),
    ("files", {"general/train.bin": {"size": 1, "sha256": "not hex"}}),
]
MODEL_FIELDS = [
    ("tokens", "many"),
    ("tokens", -5),
    ("seconds", float("nan")),
    ("relative_delta_norm", "small"),
    ("component_weights", "0.5"),
    ("role", 3),
    ("name", ["base"]),
    ("fingerprint", {}),
    ("files", []),
]


def _field_case(field: str, value) -> str:
    return f"{field}={json.dumps(value)}"


@pytest.mark.parametrize(
    "field, value", DATASET_FIELDS, ids=[_field_case(*c) for c in DATASET_FIELDS]
)
def test_a_wrong_dataset_manifest_field_is_refused(field, value, published, tmp_path, capsys):
    data = _copy(published, "dataset", tmp_path)
    _edit_manifest(data, lambda m: m.update({field: value}))
    argv = _argv("merge", published, data, published / "base", tmp_path / "out")
    line = _refused(argv, capsys, tmp_path / "out", "tamper_fields", str(data / MANIFEST))
    assert f"'{field}" in line or field == "files" and "general/train.bin" in line, line
    with pytest.raises(DemixError):
        CuratedData(data)


@pytest.mark.parametrize("field, value", MODEL_FIELDS, ids=[_field_case(*c) for c in MODEL_FIELDS])
def test_a_wrong_model_manifest_field_is_refused(field, value, published, tmp_path, capsys):
    base = _copy(published, "base", tmp_path)
    _edit_manifest(base, lambda m: m.update({field: value}))
    argv = _argv("merge", published, published / "dataset", base, tmp_path / "out")
    line = _refused(argv, capsys, tmp_path / "out", "tamper_fields", str(base / MANIFEST))
    assert f"'{field}" in line or field == "files", line


@pytest.mark.parametrize("step", ["3", -1, 2.5, None])
def test_a_wrong_checkpoint_step_is_refused(step, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    write_manifest(folder, "demix.checkpoint", step=step)
    with pytest.raises(DataError, match="manifest field 'step'"):
        read_manifest(folder, "demix.checkpoint")
    reliability.count("tampered_refused")
    reliability.count("tamper_fields")


def test_a_kept_dataset_changed_since_it_was_written_is_curated_again(published, tmp_path):
    from demix.config import parse_config
    from demix.stages.curate import curate_stage

    config = parse_config(yaml.safe_load((published / "config.yaml").read_text()))
    out = tmp_path / "data"
    curate_stage(config, out)
    _flip_byte(out / "general" / "train.bin")
    with pytest.raises(DataError, match="sha256 does not match"):
        CuratedData(out).tokens("general")
    assert curate_stage(config, out).tokens("general").size > 0  # curated again, intact


def test_a_tampered_model_base_artifact_is_refused(published, tmp_path):
    """model.base given as a demix model artifact is held to its manifest like any input."""
    from demix.base_model import base_fingerprint

    base = _copy(published, "base", tmp_path)
    assert base_fingerprint(str(base)).startswith("sha256:")
    _unlisted_tokenizer_file(base, published)
    with pytest.raises(DataError, match="added_tokens.json: a file not listed"):
        base_fingerprint(str(base))
    reliability.count("tampered_refused")
    reliability.count("tamper_unlisted")
