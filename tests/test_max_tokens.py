"""data.max_tokens: a large dataset is curated from a hash-chosen sample of about max_tokens
tokens, its token prior estimated for the whole of it; the other datasets are untouched."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from demix.config import DataConfig
from demix.data.curate import curate
from demix.data.shards import CuratedData
from demix.data.sources import clean_document
from demix.storage import read_manifest

SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "du", "xo", "ge"]


def _docs(prefix: str, n: int) -> list[str]:
    rng = random.Random(prefix)
    return [
        f"{prefix} {i}: "
        + " ".join(
            "".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(rng.randint(10, 60))
        )
        for i in range(n)
    ]


def _jsonl(path: Path, texts: list[str]) -> str:
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, list[str]]:
    """big: 9,600 documents in 8 gzipped files (sizes are compressed bytes), with repeats;
    mid and small: 300 documents each, some of them big's (so deduplicated against it)."""
    root = tmp_path_factory.mktemp("max_tokens")
    big, mid, small = _docs("big", 9600), _docs("mid", 300), _docs("small", 300)
    files = {
        "big": [
            _jsonl(root / f"big{k}.jsonl.gz", [*big[k * 1200 : (k + 1) * 1200], big[k]])
            for k in range(8)
        ],
        "mid": [_jsonl(root / "mid.jsonl", [*mid, *big[100:120]])],
        "small": [_jsonl(root / "small.jsonl", [*small[:150], *big[::240], *small[150:]])],
    }
    return files


def _config(corpus, max_tokens=None) -> DataConfig:
    return DataConfig(
        datasets=[{"name": n, "paths": paths} for n, paths in corpus.items()],
        max_tokens=max_tokens,
        tokenizer={"vocab_size": 300, "sample_chars": 300_000},
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


@pytest.fixture(scope="module")
def curated(corpus, tmp_path_factory):
    """Curated without max_tokens, then with about a quarter of big's tokens, in 1 and 4 groups."""
    root = tmp_path_factory.mktemp("curated")
    full = curate(_config(corpus), root / "full", seed=0, groups=1)
    limit = (
        full["datasets"]["big"]["train_tokens"] + full["datasets"]["big"]["heldout_tokens"]
    ) // 4
    # mid's max_tokens is above its size: counted in full, as without the key
    config = _config(corpus, {"big": limit, "mid": 10**9})
    sampled = {g: curate(config, root / f"sampled-{g}", seed=0, groups=g) for g in (1, 4)}
    return root, full, sampled, limit


def test_a_capped_dataset_curates_about_max_tokens_and_estimates_its_whole_size(curated):
    _, full, sampled, limit = curated
    truth, big = full["datasets"]["big"], sampled[1]["datasets"]["big"]
    assert big["prior_source"] == "estimated" and 0.2 < big["keep_fraction"] < 0.3
    # About a quarter of the 9,327 documents are kept, each with probability f whatever its
    # length: the kept tokens' relative error is about sqrt((1 - f) / 2,330 x (1 + cv^2)) = 2%
    # (cv 0.4: documents of 10-60 words), and the plan's bytes per token, measured on 3 of the
    # 8 files, adds about 1%; 10% is over 3 standard deviations of both
    kept = big["train_tokens"] + big["heldout_tokens"]
    assert abs(kept / limit - 1) < 0.10
    # the estimate of the whole, kept / f, has the same 2% error; 5% is 2.5 of it (the corpus
    # and the choice are fixed, so the test is deterministic: here it is 2.4% over)
    assert abs(big["full_train_tokens"] / truth["train_tokens"] - 1) < 0.05
    assert sampled[1]["token_prior"]["big"] == pytest.approx(full["token_prior"]["big"], rel=0.02)
    # every document is kept or left out, deduplicated as before; held out among the kept
    docs = ("documents", "heldout_documents")
    assert sum(big[k] for k in docs) + big["left_out_documents"] == sum(truth[k] for k in docs)
    assert big["duplicates_removed"] == truth["duplicates_removed"] == 8
    assert big["heldout_documents"] == round(0.02 * sum(big[k] for k in docs))
    # the full curation counts: nothing left out, its full count is its count
    assert truth["prior_source"] == "counted" and truth["keep_fraction"] == 1.0
    assert truth["full_train_tokens"] == truth["train_tokens"]


def test_the_sample_does_not_depend_on_the_grouping(curated):
    root, _, sampled, _ = curated
    assert _files(root / "sampled-1") == _files(root / "sampled-4")
    one, four = (read_manifest(root / f"sampled-{g}") for g in (1, 4))
    for manifest in (one, four):
        manifest.pop("seconds")
    assert one == four


def test_datasets_without_a_cap_are_byte_identical(curated):
    root, full, sampled, _ = curated
    before, after = _files(root / "full"), _files(root / "sampled-1")
    for name in ("mid", "small"):  # small deduplicated against big's left-out documents too
        for split in ("train", "heldout"):
            assert after[f"{name}/{split}.bin"] == before[f"{name}/{split}.bin"]
        assert sampled[1]["datasets"][name] == full["datasets"][name]
    assert sampled[1]["datasets"]["mid"]["keep_fraction"] == 1.0
    # big's documents in small are duplicates, left out of big or not (most are left out)
    f = sampled[1]["datasets"]["big"]["keep_fraction"]
    shared = [clean_document(doc, 64) for doc in _docs("big", 9600)[::240]]
    shared = [c[1] for c in shared if c]
    assert sampled[1]["datasets"]["small"]["duplicates_removed"] == len(shared)
    assert sum(int.from_bytes(h[:8], "big") >= f * 2**64 for h in shared) > len(shared) / 2
    assert before["tokenizer/tokenizer.json"] == after["tokenizer/tokenizer.json"]
    data = CuratedData(root / "sampled-1")
    assert len(data.tokens("big")) == sampled[1]["datasets"]["big"]["train_tokens"]
