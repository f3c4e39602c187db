"""Parquet, zstd-compressed JSONL and folders saved by `datasets` as curation inputs, written by
those libraries themselves: read in order, curated exactly like the same texts as .jsonl (any
grouping, local or gs://), and bad files refused in one line naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from demix.config import DataConfig, DatasetSpec
from demix.data.curate import curate, curate_group, merge_groups, plan_curation
from demix.data.sources import input_files, read_file_documents
from demix.errors import DataError
from demix.storage import read_manifest

from .test_curate_fanout import _docs  # the same seeded documents

datasets.disable_progress_bars()


# Each dataset has a short document and a repeat of its own, and one repeats another's.
TEXTS = {
    "p": [*_docs("parquet", 50), "too short", _docs("parquet", 3)[1]],
    "z": [*_docs("zstd", 40), _docs("parquet", 50)[7]],
    "s": [*_docs("saved", 45), "tiny", _docs("saved", 1)[0]],
}


def _jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def _zstd(data: bytes) -> bytes:
    """`data` as two zstd frames, as a file appended to later would be."""
    half = len(data) // 2
    return b"".join(zstandard.ZstdCompressor().compress(d) for d in (data[:half], data[half:]))


def _parquet(path: Path, texts: list[str], **columns) -> Path:
    table = pa.table({"id": list(range(len(texts))), "text": texts, **columns})
    pq.write_table(table, path, row_group_size=8)  # several row groups
    return path


def _saved(path: Path, columns: dict, shards: int = 2) -> Path:
    datasets.Dataset.from_dict(columns).save_to_disk(str(path), num_shards=shards)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The texts as a Parquet folder, a .jsonl.zst file and a saved `datasets` folder, and
    again as plain .jsonl files under jsonl/."""
    root = tmp_path_factory.mktemp("formats")
    (root / "parquet").mkdir()
    _parquet(root / "parquet" / "part-0.parquet", TEXTS["p"][:30])
    _parquet(root / "parquet" / "part-1.parquet", TEXTS["p"][30:])
    (root / "parquet" / "_SUCCESS").write_text("")  # not an input file
    (root / "z.jsonl.zst").write_bytes(_zstd(_jsonl(TEXTS["z"])))
    saved = _saved(root / "saved", {"text": TEXTS["s"], "n": list(range(len(TEXTS["s"])))})
    # a cache file `datasets` may leave beside the shards: not part of the saved dataset
    shutil.copy(saved / "data-00000-of-00002.arrow", saved / "cache-0123abcd.arrow")
    (root / "jsonl").mkdir()
    for name, texts in TEXTS.items():
        (root / "jsonl" / f"{name}.jsonl").write_bytes(_jsonl(texts))
    return root


def _config(paths: dict[str, str]) -> DataConfig:
    return DataConfig(
        datasets=[{"name": name, "paths": [path]} for name, path in paths.items()],
        heldout_fraction=0.1,
        tokenizer={"vocab_size": 300},
    )


def _formats(root: Path | str) -> dict[str, str]:
    return {"p": f"{root}/parquet", "z": f"{root}/z.jsonl.zst", "s": f"{root}/saved"}


def _documents(spec: DatasetSpec) -> list[str]:
    return [doc for f in input_files(spec) for doc in read_file_documents(Path(f.uri), spec)]


def test_each_format_reads_its_texts_in_order(corpus):
    for name, path in _formats(corpus).items():
        assert _documents(DatasetSpec(name=name, paths=[path])) == TEXTS[name]
    saved = DatasetSpec(name="s", paths=[str(corpus / "saved")])
    shards = [Path(f.uri) for f in input_files(saved)]  # state.json's, not the cache file
    assert [p.name for p in shards] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    # each shard alone (as a curation group reads it) holds its part of the rows
    first, second = (list(read_file_documents(p, saved)) for p in shards)
    assert first and second and first + second == TEXTS["s"]


def test_text_field_names_the_column_in_every_format(tmp_path):
    texts = _docs("body", 5)
    _parquet(tmp_path / "t.parquet", ["x"] * 5, body=texts)
    (tmp_path / "t.jsonl.zstd").write_bytes(_zstd(_jsonl(texts).replace(b'"text"', b'"body"')))
    _saved(tmp_path / "saved", {"body": texts, "text": ["x"] * 5}, shards=1)
    for path in ("t.parquet", "t.jsonl.zstd", "saved"):
        spec = DatasetSpec(name="b", paths=[str(tmp_path / path)], text_field="body")
        assert _documents(spec) == texts


def test_where_selects_records_by_metadata_in_every_format(tmp_path):
    """One corpus split into candidates by a metadata field: glob patterns, every field must
    match, records without the field or with a non-string value are left out."""
    texts = _docs("meta", 8)
    source = ["math/geometry/1", "math/algebra/2", "code/x", "math/geometry/3",
              "math/number_theory/4", None, "math/geometry/5", "math/algebra/6"]  # fmt: skip
    lang = ["en", "en", "en", "de", "en", "en", "en", "en"]
    records = [
        {"text": t, "lang": g, **({"source": s} if s is not None else {})}
        for t, s, g in zip(texts, source, lang, strict=True)
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "m.jsonl.zst").write_bytes(_zstd((tmp_path / "m.jsonl").read_bytes()))
    _parquet(tmp_path / "m.parquet", texts, source=source, lang=lang)
    _saved(tmp_path / "saved", {"text": texts, "source": source, "lang": lang}, shards=2)
    geometry_en = [texts[0], texts[6]]  # texts[3] is German
    for path in ("m.jsonl", "m.jsonl.zst", "m.parquet", "saved"):
        spec = DatasetSpec(
            name="g",
            paths=[str(tmp_path / path)],
            where={"source": ["math/geometry/*", "math/topology/*"], "lang": "en"},
        )
        assert _documents(spec) == geometry_en, path
        algebra = DatasetSpec(
            name="a", paths=[str(tmp_path / path)], where={"source": "*/algebra/*"}
        )
        assert _documents(algebra) == [texts[1], texts[7]], path
        nothing = DatasetSpec(name="n", paths=[str(tmp_path / path)], where={"missing": "*"})
        assert _documents(nothing) == [], path
    (tmp_path / "plain.txt").write_text(texts[0])
    spec = DatasetSpec(name="t", paths=[str(tmp_path / "plain.txt")], where={"source": "*"})
    with pytest.raises(DataError, match=r"plain\.txt: dataset 't' selects records by \['source'\]"):
        _documents(spec)
    with pytest.raises(ValueError, match="needs at least one pattern"):
        DatasetSpec(name="e", paths=["x.jsonl"], where={"source": []})


def test_where_counts_in_the_curation_fingerprint(tmp_path):
    from demix.config import parse_config
    from demix.stages import curation_fingerprint

    from .conftest import smoke_config_dict

    for name in ("general", "code", "math"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"text": name * 40}) + "\n")
    raw = smoke_config_dict(tmp_path)
    plain = curation_fingerprint(parse_config(raw), None)
    raw["data"]["datasets"][0]["where"] = {}
    assert curation_fingerprint(parse_config(raw), None) == plain  # the default: no selection
    raw["data"]["datasets"][0]["where"] = {"source": ["brown/*"]}
    assert curation_fingerprint(parse_config(raw), None) != plain


def _manifest_files(root: Path) -> dict:
    return read_manifest(root)["files"]


@pytest.fixture(scope="module")
def as_jsonl(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("as-jsonl") / "data"
    jsonl = {name: str(corpus / "jsonl" / f"{name}.jsonl") for name in TEXTS}
    curate(_config(jsonl), out, seed=0, groups=1)
    return out


@pytest.mark.parametrize("groups", [1, 4])
def test_curation_equals_the_same_texts_as_jsonl(corpus, as_jsonl, tmp_path, groups):
    manifest = curate(_config(_formats(corpus)), tmp_path / "data", seed=0, groups=groups)
    # every file: the tokenizer (trained on the same sample) and each dataset's token files
    assert _manifest_files(tmp_path / "data") == _manifest_files(as_jsonl)
    assert any(rel.startswith("tokenizer/") for rel in manifest["files"])
    want = read_manifest(as_jsonl)
    for name in TEXTS:
        stats = {k: v for k, v in manifest["datasets"][name].items() if k != "sources"}
        assert stats == {k: v for k, v in want["datasets"][name].items() if k != "sources"}
    assert [manifest["datasets"][n]["duplicates_removed"] for n in TEXTS] == [1, 1, 1]
    assert manifest["token_prior"] == want["token_prior"]


@pytest.mark.reliability
def test_gs_inputs_list_and_fetch_each_file_alone(corpus, as_jsonl, gcs, tmp_path, monkeypatch):
    """A saved folder on gs:// is its state.json's shards, in order; each group fetches only
    its own files and reads them alone; the result equals the local .jsonl curation."""
    from demix import gcs as gcs_io

    bucket = gcs_io.bucket(gcs.bucket)
    for path in sorted(p for p in corpus.rglob("*") if p.is_file() and "jsonl/" not in str(p)):
        gcs_io.upload_file(bucket, f"raw/{path.relative_to(corpus).as_posix()}", path)
    root = f"gs://{gcs.bucket}/raw"
    monkeypatch.setenv("DEMIX_CACHE", str(tmp_path / "planner"))
    plan = plan_curation(_config(_formats(root)), tmp_path / "plan", seed=0, groups=5)
    uris = [f["uri"] for files in plan["groups"] for f in files]
    assert uris == [
        f"{root}/parquet/part-0.parquet",
        f"{root}/parquet/part-1.parquet",
        f"{root}/z.jsonl.zst",
        f"{root}/saved/data-00000-of-00002.arrow",
        f"{root}/saved/data-00001-of-00002.arrow",
    ]
    for index, files in enumerate(plan["groups"]):
        cache = tmp_path / f"worker-{index}"
        monkeypatch.setenv("DEMIX_CACHE", str(cache))
        curate_group(tmp_path / "plan", index, tmp_path / f"group-{index}")
        fetched = sorted(p.name for p in cache.rglob("*") if p.is_file())
        assert fetched == sorted(f["uri"].rsplit("/", 1)[1] for f in files)
    groups = [tmp_path / f"group-{i}" for i in range(len(plan["groups"]))]
    merge_groups(tmp_path / "plan", groups, tmp_path / "data")
    assert _manifest_files(tmp_path / "data") == _manifest_files(as_jsonl)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


DOC = _docs("good", 1)[0]
ZSTD_OK = _zstd(_jsonl([DOC] * 3))

BAD = [
    (
        lambda p: _parquet(p / "f.parquet", [DOC], body=[DOC]),
        {"text_field": "content"},
        "{p}/f.parquet: no column 'content' (its columns: ['id', 'text', 'body'])",
    ),
    (
        lambda p: _saved(p / "saved", {"body": [DOC, DOC]}, shards=1),
        {},
        "{p}/saved/data-00000-of-00001.arrow: no column 'text' (its columns: ['body'])",
    ),
    (
        lambda p: _parquet(p / "null.parquet", [DOC] * 10 + [None] + [DOC]),
        {},
        "{p}/null.parquet:row 10: column 'text' is null, not a string",
    ),
    (
        lambda p: _saved(p / "ints", {"text": [DOC, DOC], "n": [1, 2]}, shards=1),
        {"text_field": "n"},
        "{p}/ints/data-00000-of-00001.arrow:row 0: column 'n' is of type int64, not a string",
    ),
    (
        lambda p: _write(p / "fake.parquet", b"PAR1 not really a parquet file"),
        {},
        "{p}/fake.parquet: not a readable Parquet file (Parquet magic bytes not found",
    ),
    (
        lambda p: _write(p / "junk.jsonl.zst", ZSTD_OK + b"not zstd at all" * 4),
        {},
        f"{{p}}/junk.jsonl.zst: corrupt zstd data near byte {len(ZSTD_OK)} (",
    ),
    (
        lambda p: _write(p / "cut.jsonl.zst", ZSTD_OK[:-7]),
        {},
        "{p}/cut.jsonl.zst: zstd data ends inside a frame near byte",
    ),
    (
        lambda p: _write(p / "num.jsonl.zst", _zstd(_jsonl([DOC]) + b'{"text": 7}\n')),
        {},
        "{p}/num.jsonl.zst:2: field 'text' is a number, not a string",
    ),
    (
        lambda p: (
            datasets.DatasetDict(
                train=datasets.Dataset.from_dict({"text": [DOC]}),
                test=datasets.Dataset.from_dict({"text": [DOC]}),
            ).save_to_disk(str(p / "dict"))
            or p / "dict"
        ),
        {},
        "dataset 'x': {p}/dict is a saved DatasetDict of splits ['train', 'test']; give one "
        "split's folder, e.g. {p}/dict/train",
    ),
]


@pytest.mark.parametrize(("make", "spec", "expected"), BAD)
def test_bad_files_are_one_line_errors_naming_the_file(corpus, tmp_path, make, spec, expected):
    bad = make(tmp_path)
    config = DataConfig(
        datasets=[
            DatasetSpec(name="a", paths=[str(corpus / "jsonl" / "p.jsonl")]),
            DatasetSpec(name="x", paths=[str(bad)], **spec),
        ],
        tokenizer={"vocab_size": 300},
    )
    with pytest.raises(DataError) as err:
        curate(config, tmp_path / "out", seed=0)
    message = str(err.value)
    assert expected.format(p=tmp_path) in message, message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()
