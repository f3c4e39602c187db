"""Curation fanned out over groups of input files (plan -> one task per group -> merge) gives
the single-task result, and both equal a direct single pass over the documents."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from demix.config import DataConfig, DatasetSpec
from demix.data.curate import (
    curate,
    curate_group,
    group_bounds,
    heldout_indices,
    merge_groups,
    normalize,
    plan_curation,
    read_documents,
)
from demix.data.shards import CuratedData
from demix.errors import DataError

TIMING_KEYS = {"seconds"}
curation = importlib.import_module("demix.data.sources")  # where documents are read


def _docs(prefix: str, n: int) -> list[str]:
    rng = random.Random(prefix)
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "du", "xo", "ge"]
    return [
        f"{prefix} document {i}:\n"
        + " ".join("".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(30))
        for i in range(n)
    ]


def _jsonl(path: Path, texts: list[str]) -> Path:
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three datasets over nine files, with duplicates inside a file, across the files of a
    dataset and across datasets, short documents, and a text file with CRLF line ends."""
    root = tmp_path_factory.mktemp("fanout")
    alpha, beta, gamma = _docs("alpha", 40), _docs("beta", 45), _docs("gamma", 12)
    _jsonl(root / "a0.jsonl", [*alpha[:20], "too short"])
    _jsonl(root / "a1.jsonl.gz", [*alpha[20:], alpha[4]])  # alpha[4] again, in another file
    (root / "a2.txt").write_bytes((alpha[7].replace("\n", "  \r\n") + " \r\n").encode())  # again
    (root / "b").mkdir()
    _jsonl(root / "b" / "0.jsonl", beta[:15])
    _jsonl(root / "b" / "1.jsonl", [*beta[15:30], alpha[11], "tiny"])  # a dataset-a document
    _jsonl(root / "b" / "2.jsonl", [*beta[30:40], beta[0], beta[33], beta[33]])
    _jsonl(root / "b" / "3.jsonl", beta[40:])
    _jsonl(root / "c0.jsonl", [*gamma[:6], beta[2]])
    _jsonl(root / "c1.jsonl", [*gamma[6:], gamma[0], alpha[30]])
    return root


def _config(corpus: Path, **kw) -> DataConfig:
    kw = {"heldout_fraction": 0.1, "tokenizer": {"vocab_size": 300}, **kw}
    return DataConfig(
        datasets=[
            DatasetSpec(
                name="a",
                paths=[
                    str(corpus / "a0.jsonl"),
                    str(corpus / "a1.jsonl.gz"),
                    str(corpus / "a2.txt"),
                ],
            ),
            DatasetSpec(name="b", paths=[str(corpus / "b")]),
            DatasetSpec(name="c", paths=[str(corpus / "c0.jsonl"), str(corpus / "c1.jsonl")]),
        ],
        **kw,
    )


def _contents(root: Path) -> dict[str, bytes | dict]:
    """Every file of an artifact; the manifest without its timing."""
    out: dict[str, bytes | dict] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == "manifest.json":
            out[rel] = {
                k: v for k, v in json.loads(path.read_text()).items() if k not in TIMING_KEYS
            }
        else:
            out[rel] = path.read_bytes()
    return out


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "data"
    curate(_config(corpus), out, seed=0, groups=1, fingerprint="fp")
    return out


def _group_of(plan: dict, name: str) -> int:
    """The group holding the input file called `name`."""
    return next(
        g for g, files in enumerate(plan["groups"]) for f in files if f["uri"].endswith(name)
    )


@pytest.mark.parametrize("groups", [2, 3, 4, 5, 9, 40])
def test_fanned_out_curation_equals_the_single_task(corpus, single, tmp_path, groups):
    plan = plan_curation(_config(corpus), tmp_path / "plan", seed=0, groups=groups)
    assert len(plan["groups"]) == min(groups, 9)
    if groups >= 5:  # what makes the fan-out matter here
        assert _group_of(plan, "a0.jsonl") != _group_of(plan, "a1.jsonl.gz")  # a dataset split
        assert _group_of(plan, "b/0.jsonl") != _group_of(plan, "b/2.jsonl")  # repeat of beta[0]
        assert _group_of(plan, "a0.jsonl") != _group_of(plan, "b/1.jsonl")  # repeat of alpha[11]
    fanned = curate(_config(corpus), tmp_path / "data", seed=0, groups=groups, fingerprint="fp")
    expected = _contents(single)
    assert _contents(tmp_path / "data") == expected
    assert fanned["datasets"] == expected["manifest.json"]["datasets"]
    assert fanned["fingerprint"] == "fp"


def test_single_task_equals_a_direct_single_pass(corpus, single):
    """The result the old one-task curation computed: every document in config and file order,
    a global set of content hashes (first kept), held-out by heldout_indices, one eos each."""
    data = CuratedData(single)
    tokenizer = data.load_tokenizer()
    config = _config(corpus)
    seen: set[str] = set()
    for spec in config.datasets:
        docs, hashes, short, dups = [], [], 0, 0
        for raw in read_documents(spec):
            text = normalize(raw)
            digest = hashlib.sha256(text.encode()).hexdigest()
            if len(text) < config.min_chars:
                short += 1
            elif digest in seen:
                dups += 1
            else:
                seen.add(digest)
                docs.append(text)
                hashes.append(digest)
        held = heldout_indices(hashes, config, 0)
        for split in ("train", "heldout"):
            ids = []
            for i, doc in enumerate(docs):
                if (i in held) == (split == "heldout"):
                    ids += [
                        *tokenizer(doc, add_special_tokens=False)["input_ids"],
                        data.eos_token_id,
                    ]
            assert np.array_equal(np.asarray(data.tokens(spec.name, split)), ids), (
                spec.name,
                split,
            )
        stats = data.manifest["datasets"][spec.name]
        assert (stats["documents"], stats["heldout_documents"]) == (
            len(docs) - len(held),
            len(held),
        )
        assert (stats["dropped_short"], stats["duplicates_removed"]) == (short, dups)
    stats = data.manifest["datasets"]
    # within a file, across the files of a dataset and across datasets
    assert [stats[n]["duplicates_removed"] for n in ("a", "b", "c")] == [2, 4, 3]
    assert [stats[n]["dropped_short"] for n in ("a", "b", "c")] == [1, 1, 0]


def test_merge_takes_groups_in_plan_order_and_refuses_missing_or_foreign_ones(
    corpus, single, tmp_path
):
    plan = plan_curation(_config(corpus), tmp_path / "plan", seed=0, groups=3, fingerprint="fp")
    parts = [tmp_path / f"group-{i}" for i in range(len(plan["groups"]))]
    for i, part in enumerate(parts):
        manifest = curate_group(tmp_path / "plan", i, part)
        assert manifest["group"] == i and manifest["kind"] == "demix.curation_group"
    merge_groups(tmp_path / "plan", parts[::-1], tmp_path / "data")  # as a fan-in may list them
    assert _contents(tmp_path / "data") == _contents(single)

    other = plan_curation(_config(corpus), tmp_path / "other-plan", seed=1, groups=3)
    assert other["groups"] == plan["groups"]
    curate_group(tmp_path / "other-plan", 1, tmp_path / "other-group-1")
    cases = [
        (parts[:1] + parts[2:], r"curated groups \[1\] of 3 are missing"),
        ([*parts, parts[1]], "group 1 is given twice"),
        ([parts[0], tmp_path / "other-group-1", parts[2]], "another curation plan"),
    ]
    for given, message in cases:
        with pytest.raises(DataError, match=message) as err:
            merge_groups(tmp_path / "plan", given, tmp_path / "failed")
        assert "\n" not in str(err.value)
        assert not (tmp_path / "failed").exists()
    with pytest.raises(DataError, match="no group 3; the curation plan has groups 0-2"):
        curate_group(tmp_path / "plan", 3, tmp_path / "group-3")


def test_a_group_refuses_an_input_changed_since_the_plan(corpus, tmp_path):
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    plan_curation(_config(copy), tmp_path / "plan", seed=0, groups=9)
    with open(copy / "c1.jsonl", "a") as f:
        f.write(json.dumps({"text": "appended after planning " * 5}) + "\n")
    with pytest.raises(DataError, match=r"c1.jsonl: \d+ bytes, \d+ bytes when the curation plan"):
        curate_group(tmp_path / "plan", 8, tmp_path / "group")
    assert not (tmp_path / "group").exists()


def test_tokenizer_sample_is_bounded_and_the_same_for_any_grouping(
    corpus, single, tmp_path, monkeypatch
):
    config = _config(corpus, tokenizer={"vocab_size": 300, "sample_chars": 2500})
    read: list[str] = []
    real = curation._file_chunks
    monkeypatch.setattr(curation, "_file_chunks", lambda p, d: read.append(p.name) or real(p, d))
    plan = plan_curation(config, tmp_path / "plan", seed=0, groups=1)
    sample = plan["tokenizer_sample"]
    assert 0 < len(read) < 9  # the plan reads a few of the 9 files, not the corpus
    longest = max(len(normalize(d)) for spec in config.datasets for d in read_documents(spec))
    assert 2500 <= sample["chars"] <= 2500 + 3 * longest  # each dataset's share, overshoot < 1 doc
    full = json.loads((single / "manifest.json").read_text())["tokenizer_sample"]
    assert sample["documents"] < full["documents"]

    monkeypatch.setattr(curation, "_file_chunks", real)
    curate(config, tmp_path / "one", seed=0, groups=1)
    curate(config, tmp_path / "four", seed=0, groups=4)
    assert _contents(tmp_path / "one") == _contents(tmp_path / "four")
    tokenizer = (tmp_path / "one" / "tokenizer" / "tokenizer.json").read_bytes()
    assert tokenizer != (single / "tokenizer" / "tokenizer.json").read_bytes()


def test_group_bounds_are_contiguous_and_balanced():
    assert group_bounds([10] * 10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert group_bounds([10] * 3, 8) == [(0, 1), (1, 2), (2, 3)]
    assert group_bounds([100, 1, 1], 3) == [(0, 1), (1, 2), (2, 3)]  # no group left empty
    assert group_bounds([1, 1, 100, 1, 1, 1], 3) == [(0, 3), (3, 4), (4, 6)]
    assert group_bounds([0, 0, 0, 0], 2) == [(0, 2), (2, 4)]
    assert group_bounds([5, 7], 1) == [(0, 2)]
